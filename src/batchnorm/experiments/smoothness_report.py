"""The report's pages on the smoothness and noisy-BN experiments (``smoothness``).

Two figures, two tables and a one-sentence conclusion per part, for the terminal and
``report.html``; ``report`` calls these beside its own. Every sentence is computed from
the run's numbers: whether BN's loss is the smoother one (over every seed's probes), and whether the noisy network
trains fast although its layer inputs move, is whatever this run measured.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import numpy as np

from .batch_semantics_report import format_text_tables, html_table
from .words import num, pct

__all__ = [
    "CAPTIONS",
    "NOISY_OUTCOMES",
    "findings",
    "html_sections",
    "noisy_bn_sentence",
    "noisy_outcome",
    "noisy_verdict",
    "probe_bands",
    "seed_bands",
    "smoother_measures",
    "smoothness_sentence",
    "smoothness_verdict",
    "tables",
    "text_tables",
    "write_figures",
]  # fmt: skip

ARM_LABELS = {"plain": "without BN", "bn": "with BN", "noisy": "noisy BN"}
ARM_COLORS = {"plain": "tab:red", "bn": "tab:blue", "noisy": "tab:green"}
MEASURE_LABELS = {
    "loss_range": "loss range",
    "gradient_predictiveness": "gradient change",
    "beta_smoothness": "effective β-smoothness",
}

CAPTIONS = {
    "smoothness.png": "Smoothness of the loss along the gradient (Santurkar et al. 2018, Figure 4), the MLP with and "
    "without BN, each trained from several seeds (the number is in the text above), at evenly spaced training steps, "
    "on one fixed training batch per seed. From the parameters of that step, the loss and its gradient are probed at "
    "several step sizes along the gradient. Left: the band spans the lowest to the highest loss at that step over "
    "every seed and step size (the step's own point included; for one seed its height is the loss range); the line "
    "is the median over the seeds of the highest loss. Middle and right: the line is the median over the seeds of the "
    "largest l2 change of the gradient over the step sizes (the gradient predictiveness), and of the largest change "
    "per unit distance moved (the effective β-smoothness); the band spans the minimum to the maximum over the seeds "
    "of that same largest value (with one seed, the line alone). Lower: smoother. Log scale.",
    "noisy_bn.png": "Noisy BN (Santurkar et al. 2018, Figure 2): left, test accuracy of the MLP without BN, with BN, "
    "and with BN followed by noise that rescales and shifts every unit by random amounts drawn anew at every step; "
    "right, the batch mean of one unit of the last hidden layer's sigmoid input at the training steps (with noise: "
    "after the noise, what the sigmoid sees).",
}


def _steps(v: Any) -> str:
    return "never" if v is None else str(v)


# --- figures ----------------------------------------------------------------------


def write_figures(plt: Any, results: dict[str, Any], save: Callable[[Any, str], str]) -> list[str]:
    """Draw the parts that ran; ``save(fig, name)`` writes one and returns its file name."""
    names = []
    if "smoothness" in results:
        names.append(save(_smoothness_figure(plt, results["smoothness"]), "smoothness.png"))
    if "noisy_bn" in results:
        names.append(save(_noisy_bn_figure(plt, results["noisy_bn"]), "noisy_bn.png"))
    return names


def probe_bands(probe: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """One probe's (min, max) over the step sizes of each figure panel's quantity."""
    losses = [probe["loss"], *probe["losses"]]
    changes = probe["gradient_changes"]
    per_distance = [c / (eta * probe["grad_norm"]) for c, eta in zip(changes, probe["step_sizes"], strict=True)]
    return {
        "loss_range": (min(losses), max(losses)),
        "gradient_predictiveness": (min(changes), max(changes)),
        "beta_smoothness": (min(per_distance), max(per_distance)),
    }


def seed_bands(runs: list[dict[str, Any]], measure: str) -> tuple[list[int], np.ndarray]:
    """The probe steps any seed reached, and per step ``(band low, line, band high)`` over the seeds that reached it:
    for the loss, the lowest loss of any seed, the median over seeds of each seed's highest loss, and the highest
    loss of any seed; for the gradient measures, the minimum, median and maximum over seeds of the probe's largest
    value (its measure)."""
    by_step: dict[int, list[tuple[float, float]]] = {}
    for run in runs:
        for step, probe in zip(run["probe_steps"], run["probes"], strict=True):
            by_step.setdefault(step, []).append(probe_bands(probe)[measure])
    steps = sorted(by_step)
    rows = []
    for step in steps:
        lows, tops = np.asarray(by_step[step], float).T
        low = lows.min() if measure == "loss_range" else tops.min()
        rows.append((low, np.median(tops), tops.max()))
    return steps, np.asarray(rows, float).reshape(-1, 3)


def _smoothness_figure(plt: Any, r: dict[str, Any]) -> Any:
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    seeds = len(r["seeds"])
    titles = ("loss along the gradient", "gradient change (l2)", "gradient change per distance")
    for ax, measure, title in zip(axes, MEASURE_LABELS, titles, strict=True):
        for arm, a in r["arms"].items():
            steps, bands = seed_bands(a["runs"], measure)
            if not steps:
                continue
            ax.fill_between(steps, bands[:, 0], bands[:, 2], color=ARM_COLORS[arm], alpha=0.3, linewidth=0)
            ax.plot(steps, bands[:, 1], color=ARM_COLORS[arm], linewidth=1, marker="o", markersize=3,
                    label=ARM_LABELS[arm])  # fmt: skip
        ax.set(xlabel="training step", title=title, yscale="log")
    axes[0].legend(fontsize=8, title=f"{seeds} seed{'s' if seeds != 1 else ''}", title_fontsize=8)
    return fig


def _noisy_bn_figure(plt: Any, r: dict[str, Any]) -> Any:
    fig, (acc_ax, mean_ax) = plt.subplots(1, 2, figsize=(11, 3.6))
    for arm, a in r["arms"].items():
        steps, acc = a["steps"], a["test_acc"]
        if arm != "plain":  # BN's step-0 evaluation uses running statistics no batch has estimated yet
            steps, acc = steps[1:], acc[1:]
        acc_ax.plot(steps, acc, color=ARM_COLORS[arm], label=ARM_LABELS[arm])
        trace = a["unit_mean_trace"]
        mean_ax.plot(trace["steps"], trace["values"], color=ARM_COLORS[arm], linewidth=0.7, label=ARM_LABELS[arm])
    acc_ax.set(xlabel="step", ylabel="test accuracy", ylim=(0, 1), title=f"MLP at lr {r['lr']:g}")
    mean_ax.set(xlabel="training step", ylabel="batch mean", title=f"{r['layer']}, unit {r['unit']}: sigmoid input")
    acc_ax.legend(loc="lower right", fontsize=8)
    mean_ax.legend(fontsize=8)
    return fig


# --- words ------------------------------------------------------------------------


def findings(results: dict[str, Any]) -> list[str]:
    """One sentence per part that ran, from its numbers alone."""
    out = []
    if "smoothness" in results:
        out.append(smoothness_sentence(results["smoothness"], results["summary"]["smoothness"]))
    if "noisy_bn" in results:
        out.append(noisy_bn_sentence(results["noisy_bn"]))
    return out


def _over_seeds(n: int, seeds: int) -> str:
    return f"{n} probes over {seeds} seed{'s' if seeds != 1 else ''}"


def smoothness_sentence(r: dict[str, Any], s: dict[str, Any]) -> str:
    """At how many probes (over all seeds) BN's loss is the smoother by each measure, the medians, and what that
    adds up to."""
    n, seeds = s["probes_compared"], s["seeds"]
    etas = r["step_sizes"]
    head = (
        f"Smoothness along the gradient (the MLP at lr {r['lr']:g}, {_over_seeds(n, seeds)} at steps "
        f"{r['probe_steps'][0]} to {r['probe_steps'][-1]}, step sizes {min(etas):g} to {max(etas):g} on one fixed "
        f"batch per seed)"
    )
    if n == 0:
        return f"{head}: no probe to compare (an arm diverged before the first)."
    parts = [
        f"{MEASURE_LABELS[m]} smaller with BN at {s[m]['bn_smaller_at']} of {n} probes (median {s[m]['median_bn']:.3g}"
        f" with BN, {s[m]['median_plain']:.3g} without)"
        for m in MEASURE_LABELS
    ]
    return f"{head}: {'; '.join(parts)}; {smoothness_verdict(s, n)}."


def _bn_smoother(m: dict[str, Any], n: int) -> bool:
    """BN smaller at most probes and in the median."""
    return m["bn_smaller_at"] > n / 2 and m["median_bn"] < m["median_plain"]


def smoother_measures(s: dict[str, Any], n: int) -> list[str]:
    """The measures by which BN's loss is the smoother: smaller at most of the ``n`` probes and in the median."""
    return [m for m in MEASURE_LABELS if _bn_smoother(s[m], n)]


def smoothness_verdict(s: dict[str, Any], n: int) -> str:
    smoother = [MEASURE_LABELS[m] for m in smoother_measures(s, n)]
    if len(smoother) == len(MEASURE_LABELS):
        return "by every measure the loss is smoother with BN, as Santurkar et al. report"
    if not smoother:
        return "by no measure is the loss smoother with BN in this run"
    others = [label for label in MEASURE_LABELS.values() if label not in smoother]
    return (
        f"so BN is smoother by {' and '.join(smoother)} (at most probes and in the median) but not by "
        f"{' and '.join(others)}"
    )


def noisy_bn_sentence(r: dict[str, Any]) -> str:
    """How fast each arm reached the target, how much the layer inputs moved, and whether that supports the claim."""
    arms, noise = r["arms"], r["noise"]
    target = r["target"]
    reach = ", ".join(f"{ARM_LABELS[a]} {_steps(arms[a]['steps_to_target'])}" for a in ("noisy", "bn", "plain"))
    final = ", ".join(pct(arms[a]["final_test_acc"]) for a in ("noisy", "bn", "plain"))
    change = {a: arms[a]["instability"]["mean_step_change"] for a in arms}
    moves = ", ".join(f"{num(change[a])} {ARM_LABELS[a]}" for a in ("noisy", "bn", "plain"))
    return (
        f"Noisy BN (every BN output unit scaled by U({1 - noise['scale_spread']:g}, {1 + noise['scale_spread']:g}) "
        f"and shifted by N(0, {noise['shift_std']:g}²), drawn anew every step): steps to {target:.0%} test accuracy: "
        f"{reach} (final {final}); the batch mean of a {r['layer']} sigmoid input moves from step to step by {moves} "
        f"(RMS over units); {noisy_verdict(arms, change)}."
    )


NOISY_OUTCOMES = {
    "never": "the noisy network never reached the target: here the noise undoes BN's fast training",
    "not_faster": "the noisy network trains no faster than the one without BN: here the noise undoes BN's speed-up",
    "untested": "it trains faster than without BN, but its layer inputs do not move more than the other networks', "
    "so this run does not test training despite unstable distributions",
    "fast_despite_shift": "so training is still faster than without BN although the noisy network's layer inputs move "
    "more from step to step than either other network's",
}


def noisy_outcome(arms: dict[str, Any], change: dict[str, Any]) -> str:
    """What the noisy-BN run showed, one of :data:`NOISY_OUTCOMES`' keys: the noisy network never reached the
    target, reached it no faster than the one without BN, was faster without moving more than the others, or was
    faster although its inputs moved more (the claim)."""
    noisy, plain = arms["noisy"]["steps_to_target"], arms["plain"]["steps_to_target"]
    if noisy is None:
        return "never"
    if not (plain is None or noisy < plain):
        return "not_faster"
    if None in change.values() or change["noisy"] <= max(change["plain"], change["bn"]):
        return "untested"
    return "fast_despite_shift"


def noisy_verdict(arms: dict[str, Any], change: dict[str, Any]) -> str:
    return NOISY_OUTCOMES[noisy_outcome(arms, change)]


def tables(results: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """``(title, header, rows)`` per part that ran, for the terminal and the report."""
    return [t for t in (_smoothness_table(results), _noisy_bn_table(results)) if t is not None]


def _smoothness_table(results: dict[str, Any]) -> tuple[str, list[str], list[list[str]]] | None:
    if "smoothness" not in results:
        return None
    s = results["summary"]["smoothness"]
    n = s["probes_compared"]
    header = ["measure", "median without BN", "median with BN", "BN smaller at (probes)"]
    rows = [[MEASURE_LABELS[m], num(s[m]["median_plain"]), num(s[m]["median_bn"]), f"{s[m]['bn_smaller_at']}/{n}"]
            for m in MEASURE_LABELS]  # fmt: skip
    return f"Smoothness along the gradient, {_over_seeds(n, s['seeds'])}", header, rows


def _noisy_bn_table(results: dict[str, Any]) -> tuple[str, list[str], list[list[str]]] | None:
    if "noisy_bn" not in results:
        return None
    r = results["noisy_bn"]
    header = ["arm", "steps to target", "final acc", "mean step change", "std step change", "mean spread"]
    rows = []
    for arm, a in r["arms"].items():
        moves = [num(a["instability"][k]) for k in ("mean_step_change", "std_step_change", "mean_spread")]
        rows.append([ARM_LABELS[arm], _steps(a["steps_to_target"]), pct(a["final_test_acc"]), *moves])
    return f"Noisy BN: training, and how the {r['layer']} sigmoid input moves", header, rows


def text_tables(results: dict[str, Any]) -> list[str]:
    """The tables as fixed-width lines, a blank line before each."""
    return format_text_tables(tables(results))


# --- HTML -------------------------------------------------------------------------


def html_sections(results: dict[str, Any], figure: Callable[[str], str], figures: list[str]) -> str:
    """The report's sections on the parts that ran; ``figure(name)`` embeds one figure."""
    esc = html.escape
    parts = []
    if "smoothness" in results:
        r = results["smoothness"]
        etas = ", ".join(f"{eta:g}" for eta in r["step_sizes"])
        seeds = r["seeds"]
        parts.append(
            "<h2>Smoothness of the loss along the gradient</h2>"
            f"<p>Santurkar et al. (2018) argue that BN helps by making the loss smoother rather than by reducing "
            f"internal covariate shift. The MLP with and without BN, trained at lr {r['lr']:g} for {r['steps']} "
            f"steps from each of {len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))}: "
            "the initialization, the order of the batches and the probe batch; both networks share them); before the "
            f"update of steps {', '.join(map(str, r['probe_steps']))}, "
            "<code>batchnorm.ics.loss_landscape</code> probes the loss on that seed's fixed training batch of "
            f"{r['batch']} images at the parameters <i>&theta; &minus; &eta; g</i>, &eta; = {etas} "
            "(<i>g</i> the gradient at &theta;; every point starts from the same &theta;, the model is left as it "
            "was). <b>Loss range</b>: max minus min of the loss over these points; <b>gradient change</b> "
            "(predictiveness): the largest l2 change of the gradient; <b>effective &beta;-smoothness</b>: the largest "
            "gradient change per unit distance moved. Smaller is smoother. The table compares the two networks at "
            "every probe step of every seed (the medians and counts are over these pairs).</p>"
            f"{html_table(_smoothness_table(results))}"
            f"<p><b>{esc(smoothness_sentence(r, results['summary']['smoothness']))}</b></p>"
            + (figure("smoothness.png") if "smoothness.png" in figures else "")
        )
    if "noisy_bn" in results:
        r = results["noisy_bn"]
        noise = r["noise"]
        parts.append(
            "<h2>Noisy BN: fast training with unstable distributions?</h2>"
            f"<p>The BN network with a noise layer after every BN layer: in training, every unit is multiplied by a "
            f"scale drawn from U({1 - noise['scale_spread']:g}, {1 + noise['scale_spread']:g}) and shifted by a value "
            f"drawn from N(0, {noise['shift_std']:g}&sup2;), one draw per unit for the whole batch, drawn anew at "
            "every step: the distribution each sigmoid sees moves from step to step (eval: no noise). Trained like "
            f"the other two networks (lr {r['lr']:g}, {r['steps']} steps, the same initialization and batches). "
            f"<b>Mean step change</b>: the RMS over units and steps of the change of each unit's batch mean of the "
            f"{esc(r['layer'])} sigmoid input between consecutive training steps (with BN alone it moves only with "
            "&beta;; without BN also with the batch); <b>std step change</b>: the same for each unit's batch std; "
            "<b>mean spread</b>: the std over all steps of each unit's batch mean, averaged over units.</p>"
            f"{html_table(_noisy_bn_table(results))}<p><b>{esc(noisy_bn_sentence(r))}</b></p>"
            + (figure("noisy_bn.png") if "noisy_bn.png" in figures else "")
        )
    return "".join(parts)
