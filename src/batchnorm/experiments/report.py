"""Everything the demo writes: PNG figures, ``results.json``, ``report.html``, and the terminal table.

Figures use matplotlib's Agg backend (no display needed); the HTML page embeds
them as base64 so the one file can be mailed or opened anywhere. The findings
sentences are computed from the numbers, so they say what this run showed,
including when an effect did not appear.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from batchnorm.ics import InputRecorder, plot_percentiles

__all__ = ["findings", "summary_table", "write_figures", "write_html", "write_json"]

LABELS = {"plain": "without BN", "bn": "with BN"}
COLORS = {"plain": "tab:red", "bn": "tab:blue"}


def _clean(value: Any) -> Any:
    """NaN/inf -> None, numpy -> Python, recursively (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def file_names() -> list[str]:
    """Every file name the demo may write into its run folder."""
    return [*_CAPTIONS, "results.json", "report.html"]


def write_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(_clean(results), indent=1, allow_nan=False))


# --- figures --------------------------------------------------------------------


def write_figures(results: dict[str, Any], recorders: dict[str, dict[str, InputRecorder]], folder: Path) -> list[str]:
    """Write every figure into ``folder``; returns the file names, in reading order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for part in ("mlp", "cnn"):
        if part not in results:
            continue
        r = results[part]
        names.append(_save(plt, _curves(plt, r, part), folder / f"{part}_curves.png"))
        names.append(_save(plt, _percentiles(plt, r, recorders[part], part), folder / f"{part}_percentiles.png"))
        names.append(_save(plt, _drift(plt, recorders[part], part), folder / f"{part}_drift.png"))
        names.append(_save(plt, _ics(plt, r, part), folder / f"{part}_ics.png"))
    if "sweep" in results:
        names.append(_save(plt, _sweep(plt, results["sweep"], results["config"]["target"]), folder / "lr_sweep.png"))
    return names


def _save(plt: Any, fig: Any, path: Path) -> str:
    # fixed margins: tight_layout measures every label and costs seconds per figure on a slow CPU
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.9, wspace=0.25)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def _title(part: str) -> str:
    return "MLP (3x100 sigmoid)" if part == "mlp" else "CNN (3 conv, ReLU)"


def _curves(plt: Any, r: dict[str, Any], part: str) -> Any:
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.6))
    for arm, a in r["arms"].items():
        ax_acc.plot(a["steps"], a["test_acc"], color=COLORS[arm], label=LABELS[arm])
        loss = [np.nan if v is None else v for v in a["train_loss"]]
        ax_loss.plot(a["steps"], loss, color=COLORS[arm], label=LABELS[arm])
        if a["diverged_at"] is not None:
            ax_acc.axvline(a["diverged_at"], color=COLORS[arm], linestyle=":", label=f"{LABELS[arm]}: diverged")
    ax_acc.set(xlabel="step", ylabel="test accuracy", ylim=(0, 1), title=f"{_title(part)}, lr {r['lr']:g}")
    ax_loss.set(xlabel="step", ylabel="training loss", yscale="log", title="training loss (mean between evaluations)")
    ax_acc.legend()
    ax_loss.legend()
    return fig


def _percentiles(plt: Any, r: dict[str, Any], recs: dict[str, InputRecorder], part: str) -> Any:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, (arm, a) in zip(axes, r["arms"].items(), strict=True):
        last = a["inputs"]["last_hidden"]
        plot_percentiles(recs[arm], last, ax, label=LABELS[arm], color=COLORS[arm])
        ax.set_title(f"{LABELS[arm]}: input to one unit of the last hidden layer")
        ax.legend(loc="best")
    return fig


def _drift(plt: Any, recs: dict[str, InputRecorder], part: str) -> Any:
    layers = list(next(iter(recs.values())).history)
    fig, axes = plt.subplots(1, len(layers), figsize=(3.6 * len(layers), 3.4), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], layers, strict=True):
        for arm, rec in recs.items():
            d = rec.drift(name)
            steps = d["steps"][1:]
            for key, style, what in (("mean_shift", "-", "mean"), ("std_shift", "--", "std")):
                ax.plot(steps, _smooth(d[key][1:]), color=COLORS[arm], linestyle=style, label=f"{LABELS[arm]}: {what}")
        ax.set(xlabel="step", yscale="log", title=f"input of {name}: change per record")
    axes[0][0].set_ylabel("RMS change over features (5-record mean)")
    axes[0][0].legend(fontsize=7)
    return fig


def _smooth(values: np.ndarray, width: int = 5) -> np.ndarray:
    """Trailing mean over up to ``width`` records (the first ones average what there is)."""
    values = np.asarray(values, dtype=float)
    sums = np.cumsum(np.concatenate([[0.0], values]))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - width, 0)
    return (sums[idx] - sums[lo]) / (idx - lo)


def _ics(plt: Any, r: dict[str, Any], part: str) -> Any:
    fig, (ax_diff, ax_cos) = plt.subplots(1, 2, figsize=(10, 3.6))
    for arm, a in r["arms"].items():
        steps = a["ics"]["steps"]
        layers = list(a["ics"]["layers"].items())[1:]  # the first layer has no upstream: G' = G
        for k, (name, v) in enumerate(layers):
            style = dict(color=COLORS[arm], alpha=1.0 - 0.25 * k, marker="o^sDv"[k % 5], markersize=3)
            rel = np.asarray(v["diff_norm"], float) / np.maximum(np.asarray(v["grad_norm"], float), 1e-30)
            ax_diff.plot(steps, rel, label=f"{LABELS[arm]} {name}", **style)
            ax_cos.plot(steps, np.asarray(v["cosine"], float), label=f"{LABELS[arm]} {name}", **style)
    ax_diff.set(xlabel="step", ylabel="||G - G'|| / ||G||", yscale="log", title="gradient ICS (Santurkar et al.)")
    ax_cos.set(xlabel="step", ylabel="cos(G, G')", title="gradient ICS: direction")
    ax_diff.legend(fontsize=7)
    return fig


def _sweep(plt: Any, sweep: dict[str, Any], target: float) -> Any:
    fig, (ax_acc, ax_steps) = plt.subplots(1, 2, figsize=(10, 3.8))
    budget = sweep["steps"]
    for arm, a in sweep["arms"].items():
        lrs, med_acc, med_steps = [], [], []
        for p in a["per_lr"]:
            accs = []
            for run in p["runs"]:
                if run["diverged_at"] is not None:
                    ax_acc.scatter(p["lr"], 0.0, marker="x", color=COLORS[arm], s=40)
                    ax_steps.scatter(p["lr"], budget * 1.6, marker="x", color=COLORS[arm], s=40)
                    continue
                accs.append(run["final_test_acc"])
                ax_acc.scatter(p["lr"], run["final_test_acc"], color=COLORS[arm], s=10, alpha=0.6)
                st = run["steps_to_target"]
                ax_steps.scatter(p["lr"], st if st is not None else budget * 1.25, color=COLORS[arm], s=10,
                                 alpha=0.6, marker="o" if st is not None else "^")  # fmt: skip
            lrs.append(p["lr"])
            med_acc.append(float(np.median(accs)) if accs else np.nan)
            reached = sorted(
                math.inf if run["steps_to_target"] is None else run["steps_to_target"] for run in p["runs"]
            )
            m = float(np.median(reached))
            med_steps.append(m if math.isfinite(m) else np.nan)
        ax_acc.plot(lrs, med_acc, color=COLORS[arm], label=LABELS[arm])
        ax_steps.plot(lrs, med_steps, color=COLORS[arm], label=LABELS[arm], marker="o", markersize=4)
    ax_acc.set(xscale="log", xlabel="learning rate", ylabel=f"test accuracy after {budget} steps", ylim=(-0.03, 1),
               title="LR sweep (dots: seeds, x: diverged)")  # fmt: skip
    ax_steps.axhline(budget * 1.25, color="gray", linewidth=0.5)
    ax_steps.axhline(budget * 1.6, color="gray", linewidth=0.5)
    axis_x = ax_steps.get_yaxis_transform()  # x in axes fraction, y in data
    ax_steps.text(0.01, budget * 1.27, "not reached", fontsize=7, color="gray", transform=axis_x)
    ax_steps.text(0.01, budget * 1.62, "diverged", fontsize=7, color="gray", transform=axis_x)
    ax_steps.set(xscale="log", yscale="log", xlabel="learning rate", ylabel=f"steps to {target:.0%} test accuracy",
                 title="speed (line: median over seeds)")  # fmt: skip
    ax_acc.legend()
    ax_steps.legend()
    return fig


# --- words ----------------------------------------------------------------------


def _steps(v: Any, budget: int) -> str:
    return f"at step {v}" if v is not None else f"not within {budget} steps"


def _span(r: Any) -> str:
    return "-" if r is None else f"[{r[0]:.2f}, {r[1]:.2f}]"


def _pct(v: Any) -> str:
    return "-" if v is None else f"{v:.1%}"


def _lr_range(rng: Any) -> str:
    return "none" if not rng else f"{rng[0]:g} to {rng[1]:g}"


def findings(results: dict[str, Any]) -> list[str]:
    """What this run showed, one sentence per claim, from the numbers alone."""
    out = []
    s, target = results["summary"], results["config"]["target"]
    for part in ("mlp", "cnn"):
        if part not in s:
            continue
        r = results[part]
        p, b = s[part]["plain"], s[part]["bn"]
        steps = r["steps"]
        out.append(
            f"{_title(part)}, lr {r['lr']:g}: {target:.0%} test accuracy reached "
            + f"{_steps(b['steps_to_target'], steps)} with BN, {_steps(p['steps_to_target'], steps)} without; "
            + f"final accuracy {_pct(b['final_test_acc'])} vs {_pct(p['final_test_acc'])}."
        )
        out.append(
            f"{_title(part)}: after step 0, the median input of the tracked last-hidden-layer unit moved over "
            f"{_span(p['last_hidden_median_range'])} without BN and {_span(b['last_hidden_median_range'])} with BN; "
            f"over the second half of training {_span(p['last_hidden_median_range_second_half'])} vs "
            f"{_span(b['last_hidden_median_range_second_half'])}. Summed record-to-record drift of that layer's "
            f"per-feature input means: {p['last_hidden_mean_drift_total']:.2f} without BN, "
            f"{b['last_hidden_mean_drift_total']:.2f} with BN."
        )
        rel_p, rel_b = p["ics_mean_relative_diff"], b["ics_mean_relative_diff"]
        layers = list(rel_p)[1:]  # the first layer has nothing upstream
        ratios = [rel_b[n] / rel_p[n] if rel_p[n] > 0 else math.inf for n in layers]
        if all(r < 0.8 for r in ratios):
            verdict = "lower with BN in every layer"
        elif all(r > 1.25 for r in ratios):
            verdict = "higher with BN in every layer"
        else:
            verdict = "not consistently lower with BN"
        out.append(
            f"{_title(part)}: gradient ICS ||G - G'||/||G|| (mean over measured steps) per layer, without BN "
            + ", ".join(f"{n} {rel_p[n]:.3g}" for n in layers)
            + "; with BN "
            + ", ".join(f"{n} {rel_b[n]:.3g}" for n in layers)
            + f": {verdict} (Santurkar et al. 2018 report that BN does not reduce this measure)."
        )
        if "single_image_acc_batch_stats" in b:
            out.append(
                f"{_title(part)} with BN, predicting one test image at a time: "
                + f"{_pct(b['single_image_acc_batch_stats'])} with batch statistics, "
                + f"{_pct(b['single_image_acc_population'])} with population statistics; "
                + f"folded multiply-add gives {'the same' if b['folded_same_predictions'] else 'DIFFERENT'} "
                + "predictions as the eval-mode layer."
            )
    if "sweep" in s:
        sw = results["sweep"]
        out.append(
            f"LR sweep ({len(sw['lrs'])} rates, {len(sw['seeds'])} seeds, {sw['steps']} steps; 'trains' = every seed "
            f"reaches {target:.0%}): with BN trains at lr {_lr_range(s['sweep']['bn']['trains_lr_range'])}, "
            f"without BN at lr {_lr_range(s['sweep']['plain']['trains_lr_range'])}."
        )
        fast = {arm: s["sweep"][arm]["fastest"] for arm in ("plain", "bn")}
        out.append(
            "Each arm at its own best learning rate (median steps to "
            f"{target:.0%} over seeds): with BN "
            + (f"{fast['bn']['median_steps_to_target']:g} steps at lr {fast['bn']['lr']:g}" if fast["bn"] else "never")
            + ", without BN "
            + (
                f"{fast['plain']['median_steps_to_target']:g} steps at lr {fast['plain']['lr']:g}"
                if fast["plain"]
                else "never"
            )
            + "."
        )
    return out


def summary_table(results: dict[str, Any]) -> list[str]:
    """The terminal summary: a small fixed-width table, then the findings."""
    s, target = results["summary"], results["config"]["target"]
    lines = [f"{'':24}{'without BN':>14}{'with BN':>14}"]
    for part in ("mlp", "cnn"):
        if part not in s:
            continue
        p, b = s[part]["plain"], s[part]["bn"]
        steps = results[part]["steps"]

        def fmt(v: Any, steps: int = steps) -> str:
            return str(v) if v is not None else f">{steps}"

        lines.append(
            f"{part.upper() + f' steps to {target:.0%}':24}"
            f"{fmt(p['steps_to_target']):>14}{fmt(b['steps_to_target']):>14}"
        )
        lines.append(
            f"{part.upper() + ' final test acc':24}{_pct(p['final_test_acc']):>14}{_pct(b['final_test_acc']):>14}"
        )
        if "single_image_acc_batch_stats" in b:
            lines.append(
                f"{part.upper() + ' 1-image, batch stats':24}{'':>14}{_pct(b['single_image_acc_batch_stats']):>14}"
            )
            lines.append(
                f"{part.upper() + ' 1-image, population':24}{'':>14}{_pct(b['single_image_acc_population']):>14}"
            )
    if "sweep" in s:
        lines.append(
            f"{'LR range that trains':24}{_lr_range(s['sweep']['plain']['trains_lr_range']):>14}"
            f"{_lr_range(s['sweep']['bn']['trains_lr_range']):>14}"
        )
    return lines


# --- HTML -----------------------------------------------------------------------

_CAPTIONS = {
    "mlp_curves.png": "Test accuracy (population statistics) and training loss of the paper's MLP, same init.",
    "mlp_percentiles.png": "15th/50th/85th percentiles of the input to one sigmoid of the last hidden layer, on test "
    "images in eval mode, over training (the paper's Figure 1 b, c).",
    "mlp_drift.png": "How much each hidden layer's input distribution moved between consecutive records: RMS over "
    "features of the change of the per-feature mean (solid) and std (dashed).",
    "mlp_ics.png": "Gradient ICS (Santurkar et al. 2018, Def. 2.1): change of each layer's weight gradient on the same "
    "batch when the layers before it take their step, relative to its size, and the cosine between the two.",
    "cnn_curves.png": "The small CNN (per-channel BN, ReLU): test accuracy and training loss.",
    "cnn_percentiles.png": "Percentiles of the input to one ReLU channel of the last conv layer (all positions).",
    "cnn_drift.png": "CNN: change of each conv layer's output (ReLU input) distribution between records.",
    "cnn_ics.png": "CNN: gradient ICS per layer.",
    "lr_sweep.png": "Learning-rate sweep of the MLP over several seeds: final accuracy and steps to the target. A run "
    "whose loss became non-finite (or above 1e4) is marked diverged; one stuck at chance is not.",
}


def write_html(results: dict[str, Any], figures: list[str], folder: Path) -> None:
    esc = html.escape
    cfg = results["config"]
    rows = "".join(
        "<tr>" + "".join(f"<td>{esc(c.strip())}</td>" for c in (line[:24], line[24:38], line[38:])) + "</tr>"
        for line in summary_table(results)[1:]
    )
    figs = "".join(
        f"<figure><img alt='{esc(name)}' src='data:image/png;base64,"
        f"{base64.b64encode((folder / name).read_bytes()).decode()}'><figcaption>{esc(_CAPTIONS.get(name, name))}"
        f"</figcaption></figure>"
        for name in figures
    )
    facts = "".join(f"<li>{esc(f)}</li>" for f in findings(results))
    d = results["dataset"]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>batchnorm demo: {esc(d["name"])}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 960px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 3px 10px; text-align: right; }}
td:first-child {{ text-align: left; }} figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }}
figcaption {{ color: #555; font-size: 0.9em; }} code {{ background: #f3f3f3; padding: 0 3px; }}
</style></head><body>
<h1>What batch normalization changes</h1>
<p>Dataset <b>{esc(d["name"])}</b>: {d["train"]} training and {d["test"]} test images of shape
{esc("x".join(map(str, d["image_shape"])))}. Plain SGD, batch {cfg["batch_size"]}, seed {cfg["seed"]};
the MLP is Ioffe &amp; Szegedy's (2015, sec. 4.1): {len(cfg["hidden"])} hidden layers of {cfg["hidden"][0]}
sigmoid units, weights N(0, {cfg["init_std"]}&sup2;), with and without BN before every sigmoid, from the same
initialization. Every number is in <code>results.json</code>.</p>
<h2>Key numbers</h2>
<table><tr><th></th><th>without BN</th><th>with BN</th></tr>{rows}</table>
<h2>What this run shows</h2><ul>{facts}</ul>
<h2>Figures</h2>{figs}
<h2>Why this configuration</h2>
<p>The paper gives no learning rate and no initialization scale. The weights are N(0, {cfg["init_std"]}&sup2;)
(&ldquo;small Gaussian&rdquo;, as in a public MNIST reproduction); with such an initialization the network
without BN first sits at chance on a plateau (its gradients shrink through every sigmoid layer, whose slope is at
most 1/4) and then learns. The MLP's learning rate, {cfg["mlp_lr"]:g}, is where the arm <i>without</i> BN learned
fastest in our sweeps; at smaller rates it stays on the plateau longer, so this choice favours the arm without BN.
The sweep shows the other rates. One test image is {1 / d["test"]:.2%} of the test set: differences of a few
images are noise.</p>
<h2>How to read it</h2>
<p>Accuracy is measured on the test set in eval mode (population statistics). Percentiles and input drift are
taken on up to {cfg["probe_size"]} test images in eval mode at every evaluation. The gradient ICS at a step
compares each layer's weight gradient <i>G</i> with <i>G'</i>, the gradient on the same batch after the earlier
layers (weights, biases, BN scale and shift) took their SGD step; the first layer has no earlier layers.
"Batch statistics, one image at a time" normalizes each BN layer with the statistics of a batch of one image
(what training mode would compute); with one value per feature, the MLP's BN output is then just its shift.</p>
</body></html>
"""
    (folder / "report.html").write_text(page, encoding="utf-8")
