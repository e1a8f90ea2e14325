"""The report's page on the population-statistics experiment (``population``).

One figure, two tables and two sentences, for the terminal and ``report.html``;
``report`` calls these beside its own. Every sentence is computed from the run's
numbers: how the error falls with the samples used, which moving average comes
closest, and whether the train/eval gap shrinks with the normalization batch, is
whatever this run measured.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import numpy as np

from .batch_semantics_report import format_text_tables, html_table
from .population import effective_samples
from .words import count_seeds, num, pct, points

__all__ = ["CAPTIONS", "estimation_sentence", "findings", "gap_sentence", "html_sections", "tables", "text_tables",
           "write_figures"]  # fmt: skip

CAPTIONS = {
    "population.png": "How well the population statistics are estimated (Wu & Johnson 2021), the BN MLP after "
    "training. Left: the statistics error, the RMS difference of every BN layer's normalized output between its "
    "estimated statistics and the true ones (the whole training set in one batch), averaged over the layers; "
    "middle: test accuracy with each estimate (dotted: with the true statistics). Purple: precise statistics from "
    "that many random training samples (line: median over draws and seeds, band: their range; x: the whole "
    "training set in batches as in training). Orange: moving averages at several momenta, at their effective "
    "sample count B(2-m)/m; the star is the momentum the layers used (0.1). Right: the MLP trained with each "
    "normalization (ghost) batch size, test accuracy normalizing by the statistics of batches of that size as in "
    "training (solid) and in eval mode with the population's statistics (dashed); mean over seeds.",
}


# --- figures ----------------------------------------------------------------------


def write_figures(plt: Any, results: dict[str, Any], save: Callable[[Any, str], str]) -> list[str]:
    """Draw the part if it ran; ``save(fig, name)`` writes one and returns its file name."""
    if "population" not in results:
        return []
    return [save(_figure(plt, results["population"], results["summary"]["population"]), "population.png")]


def _figure(plt: Any, r: dict[str, Any], s: dict[str, Any]) -> Any:
    fig, (err_ax, acc_ax, gap_ax) = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key in ((err_ax, "error"), (acc_ax, "test_acc")):
        if not r["estimates"]:
            continue
        samples = r["samples"]
        values = np.asarray([[d[key] for e in r["estimates"] for d in e["precise"][str(n)]] for n in samples])
        ax.fill_between(samples, values.min(1), values.max(1), color="tab:purple", alpha=0.25)
        ax.plot(samples, np.median(values, 1), color="tab:purple", marker="o", markersize=3,
                label="precise statistics")  # fmt: skip
        ax.scatter([r["whole_set"]], [s["precise_whole_set"][key]], color="tab:purple", marker="x", s=40)
        moving = s["moving_average"]
        xs = [m["effective_samples"] for m in moving.values()]
        ax.plot(xs, [m[key] for m in moving.values()], color="tab:orange", linestyle="--", marker="o", markersize=3,
                label="moving average")  # fmt: skip
        for momentum, m in moving.items():
            ax.annotate(f"{float(momentum):g}", (m["effective_samples"], m[key]), fontsize=7, color="tab:orange",
                        textcoords="offset points", xytext=(2, 3))  # fmt: skip
        ax.scatter([effective_samples(r["layer_momentum"], r["batch"])], [s["as_trained"][key]],
                   color="tab:orange", marker="*", s=120, zorder=3, label="as trained")  # fmt: skip
        ax.set(xscale="log", xlabel="samples used (moving average: effective)")
    err_ax.set(yscale="log", ylabel="statistics error", title="error of the estimated statistics")
    acc_ax.set(ylabel="test accuracy", title="test accuracy with them")
    if r["estimates"]:
        acc_ax.axhline(s["truth_test_acc"], color="gray", linestyle=":", linewidth=1)
    err_ax.legend(fontsize=7)
    sizes = [v for v in r["norm_batches"] if s["gaps"][str(v)]["test_gap"] is not None]
    for key, style, label in (("test_batch_statistics", "-", "batch statistics (as in training)"),
                              ("test_population_statistics", "--", "population statistics (eval)")):  # fmt: skip
        gap_ax.plot(sizes, [s["gaps"][str(v)][key] for v in sizes], linestyle=style, marker="o", markersize=3,
                    color="tab:blue", label=label)  # fmt: skip
    gap_ax.set(xscale="log", xlabel="normalization batch size", ylabel="test accuracy", ylim=(0, 1),
               title="batch vs population statistics")  # fmt: skip
    gap_ax.set_xticks(sizes, [str(v) for v in sizes])
    gap_ax.minorticks_off()  # the log axis' own minor labels would overlap the sizes
    gap_ax.legend(fontsize=7, loc="lower right")
    return fig


# --- words ------------------------------------------------------------------------


def findings(results: dict[str, Any]) -> list[str]:
    """Two sentences if the part ran: the estimates, the gap."""
    if "population" not in results:
        return []
    r, s = results["population"], results["summary"]["population"]
    return [estimation_sentence(r, s), gap_sentence(r, s)]


def estimation_sentence(r: dict[str, Any], s: dict[str, Any]) -> str:
    head = f"Population statistics (the BN MLP, {count_seeds(len(r['seeds']))}, {r['draws']} draws per sample count)"
    if not s["seeds_estimated"]:
        return f"{head}: no estimate (every run diverged)."
    first, last = str(r["samples"][0]), str(r["samples"][-1])
    lo, hi = s["precise"][first]["error"], s["precise"][last]["error"]
    trend = "falls" if hi < lo else "does not fall"
    moving = s["moving_average"]
    best = min(moving, key=lambda m: moving[m]["error"])
    longest = min(moving, key=float)  # the smallest momentum: the longest memory
    match = s["samples_to_match_moving_average"]
    matched = (f"precise statistics match it from {match} samples" if match is not None else
               f"no precise estimate of up to {last} samples matches it")  # fmt: skip
    memory = (
        f"the smallest momentum tried ({float(longest):g}, about {moving[longest]['effective_samples']:.0f} samples' "
        f"worth) has error {moving[longest]['error']:.3g}: it still remembers batches from earlier weights"
        if longest != best
        else f"the smallest momentum tried ({float(longest):g}) has the smallest error"
    )
    accs = [v["test_acc"] for v in s["precise"].values()] + [v["test_acc"] for v in moving.values()]
    return (
        f"{head}: the statistics error of precise statistics {trend} with the samples used, from {lo:.3g} at "
        f"{first} samples to {hi:.3g} at {last} ({s['precise_whole_set']['error']:.3g} over the whole training set "
        f"of {r['whole_set']}); the running statistics the layers kept (momentum {r['layer_momentum']:g}) have "
        f"error {s['as_trained']['error']:.3g} and {matched}; among moving averages the smallest error is at "
        f"momentum {float(best):g} ({moving[best]['error']:.3g}), and {memory}. Test accuracy with any of these "
        f"estimates lies between {min(accs):.1%} and {max(accs):.1%} (true statistics: {s['truth_test_acc']:.1%})."
    )


def gap_sentence(r: dict[str, Any], s: dict[str, Any]) -> str:
    gaps = s["gaps"]
    sizes = [v for v in r["norm_batches"] if gaps[str(v)]["test_gap"] is not None]
    head = ("Batch against population statistics (the MLP trained with normalization batches of "
            f"{', '.join(map(str, r['norm_batches']))}, {count_seeds(len(r['seeds']))}; test accuracy normalizing by "
            "the statistics of batches of that size, as in training, minus eval mode)")  # fmt: skip
    if not sizes:
        return f"{head}: nothing to compare (every run diverged, or the test set is smaller than every batch size)."
    parts = ", ".join(
        f"{v}: {pct(gaps[str(v)]['test_batch_statistics'])} vs {pct(gaps[str(v)]['test_population_statistics'])}"
        for v in sizes
    )
    small, large = gaps[str(sizes[0])]["test_gap"], gaps[str(sizes[-1])]["test_gap"]
    if len(sizes) == 1:
        verdict = f"one normalization batch size only, nothing to compare it with ({points(small)})"
    elif abs(small) > abs(large):
        verdict = (f"the two modes disagree most at normalization batch {sizes[0]} ({points(small)}) and least at "
                   f"{sizes[-1]} ({points(large)}): the smaller the batch the layers normalized with, the further "
                   "eval mode is from what training did")  # fmt: skip
    else:
        verdict = (f"the gap at normalization batch {sizes[0]} ({points(small)}) is no larger than at {sizes[-1]} "
                   f"({points(large)}) in this run")  # fmt: skip
    diverged = sum(gaps[str(v)]["diverged"] for v in r["norm_batches"])
    note = f" ({diverged} runs diverged and are left out)" if diverged else ""
    return f"{head}{note}: {parts}; {verdict}."


def tables(results: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """``(title, header, rows)`` if the part ran: the estimates, and the gap per normalization batch."""
    if "population" not in results:
        return []
    r, s = results["population"], results["summary"]["population"]
    out = []
    if s["seeds_estimated"]:
        rows = [[f"precise, {n} samples", str(n), num(s["precise"][str(n)]["error"]),
                 pct(s["precise"][str(n)]["test_acc"])] for n in r["samples"]]  # fmt: skip
        whole = s["precise_whole_set"]
        rows.append(["precise, whole training set", str(r["whole_set"]), num(whole["error"]), pct(whole["test_acc"])])
        for m, v in s["moving_average"].items():
            label = f"moving average, momentum {float(m):g}" + (" (as trained)" if float(m) == r["layer_momentum"]
                                                                  else "")  # fmt: skip
            rows.append([label, f"~{v['effective_samples']:.0f}", num(v["error"]), pct(v["test_acc"])])
        out.append(("Estimating the population statistics (medians over seeds and draws)",
                    ["estimate", "samples", "statistics error", "test accuracy"], rows))  # fmt: skip
    header = ["normalization batch", "test: batch stats", "test: population", "gap", "train: batch stats",
              "train: population", "gap"]  # fmt: skip
    rows = []
    for v in r["norm_batches"]:
        g = s["gaps"][str(v)]
        cells = []
        for split in ("test", "train"):
            cells += [pct(g[f"{split}_batch_statistics"]), pct(g[f"{split}_population_statistics"]),
                      points(g[f"{split}_gap"])]  # fmt: skip
        rows.append([str(v), *cells])
    out.append(("Batch against population statistics, per normalization batch size (mean over seeds)", header, rows))
    return out


def text_tables(results: dict[str, Any]) -> list[str]:
    return format_text_tables(tables(results))


# --- HTML -------------------------------------------------------------------------


def html_sections(results: dict[str, Any], figure: Callable[[str], str], figures: list[str]) -> str:
    if "population" not in results:
        return ""
    esc = html.escape
    r = results["population"]
    sentences = "".join(f"<p><b>{esc(line)}</b></p>" for line in findings(results))
    return (
        "<h2 id='population'>How well the population statistics estimate the truth</h2>"
        "<p>In eval mode a BN layer normalizes with statistics gathered in training, an estimate of the "
        "population's. Wu &amp; Johnson (2021) show two ways this goes wrong: the estimate itself (the usual moving "
        "average is taken while the weights move, so it mixes statistics of older networks), and the difference "
        "between normalizing with a batch's statistics, as training did, and with the population's. The BN MLP "
        f"(lr {r['lr']:g}, {r['steps']} steps, batch {r['batch']}) is trained, and every estimate of its statistics "
        "is compared with the truth: each layer's moments over the whole training set in one batch "
        "(<code>batchnorm.population_moments</code>). <b>Statistics error</b> "
        "(<code>batchnorm.ics.statistics_error</code>): the RMS over the population of the difference of a layer's "
        "normalized output between the estimated and the true statistics, averaged over the layers; 0.1 means eval "
        "mode moves each normalized value by a tenth of its std. <b>Precise statistics</b> "
        "(<code>batchnorm.precise_statistics</code>) from <i>N</i> random training samples, "
        f"{r['draws']} draws each; <b>moving averages</b> at momenta {', '.join(f'{m:g}' for m in r['momenta'])}, "
        "kept beside the layers' own during the same training (momentum changes no weight) and placed at the "
        "number of samples a plain average with the same noise would use. Then the MLP is trained with ghost "
        f"batches (normalization batch sizes {', '.join(map(str, r['norm_batches']))}; {r['batch']} is plain BN) "
        "and scored with batch statistics of that size and in eval mode after precise statistics "
        "(<code>batchnorm.ics.mode_gap</code>), on the test and the training set.</p>"
        + "".join(f"<p><i>{esc(t[0])}</i></p>{html_table(t)}" for t in tables(results))
        + sentences
        + (figure("population.png") if "population.png" in figures else "")
    )
