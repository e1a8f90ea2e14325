"""The report's pages on the small-batch and distribution-shift experiments (``batch_semantics``).

Two figures, a table and a one-sentence conclusion per part, for the terminal and
``report.html``; ``report`` calls these beside its own. Every sentence is computed
from the run's numbers: which method comes out ahead, by how much, and whether that
is more than the seeds disagree, is whatever this run measured.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import numpy as np

from .words import count_seeds, pct, points

__all__ = [
    "CAPTIONS", "findings", "format_text_tables", "html_sections", "html_table", "tables", "text_tables",
    "write_figures",
]  # fmt: skip

METHOD_LABELS = {"bn": "BN", "renorm": "Batch Renorm", "ghost": "ghost batches", "precise": "precise statistics"}
METHOD_COLORS = {"bn": "tab:blue", "renorm": "tab:orange", "ghost": "tab:green", "precise": "tab:purple"}
ADAPTATION_LABELS = {"source": "as trained", "statistics": "statistics adapted", "affine": "+ γ/β adapted"}
ADAPTATION_COLORS = {"source": "tab:gray", "statistics": "tab:blue", "affine": "tab:orange"}

CAPTIONS = {
    "small_batch.png": "Small batches: test accuracy of the MLP (eval mode) per training batch size and method; "
    "lines: mean over seeds, dots: seeds, x: a diverged run. Every run sees the same number of training examples. "
    "Ghost batches: a larger batch (see the text), normalized in ghosts of the batch size on the axis.",
    "shift.png": "Distribution shift: test accuracy of the CNN trained on clean images, on shifted test images, as "
    "trained, with its batch-norm statistics recomputed on unlabeled shifted images (AdaBN), and with γ/β also "
    "adapted by entropy minimization (TENT). Dashed: accuracy on the clean test images.",
}


def _mean(v: Any) -> str:
    """A mean over seeds; None only where a seed diverged."""
    return "diverged (a seed)" if v is None else f"{v:.1%}"


# --- figures ----------------------------------------------------------------------


def write_figures(plt: Any, results: dict[str, Any], save: Callable[[Any, str], str]) -> list[str]:
    """Draw the parts that ran; ``save(fig, name)`` writes one and returns its file name."""
    names = []
    if "small_batch" in results:
        names.append(save(_small_batch_figure(plt, results["small_batch"]), "small_batch.png"))
    if "shift" in results and results["shift"]["shifts"]:
        names.append(save(_shift_figure(plt, results["shift"]), "shift.png"))
    return names


def _small_batch_figure(plt: Any, r: dict[str, Any]) -> Any:
    fig, ax = plt.subplots(figsize=(7, 3.8))
    sizes = r["batch_sizes"]
    for k, method in enumerate(r["methods"]):
        color, means = METHOD_COLORS[method], []
        offset = 1 + 0.03 * (k - 1.5)  # methods side by side at each size (log axis)
        for b in sizes:
            values = r["test_acc"][method][str(b)]
            done = [v for v in values if v is not None]
            ax.scatter([b * offset] * len(done), done, color=color, s=12, alpha=0.6)
            if len(done) < len(values):
                ax.scatter([b * offset], [0.0], color=color, marker="x", s=40)
            means.append(float(np.mean(values)) if values and len(done) == len(values) else np.nan)
        ax.plot([b * offset for b in sizes], means, color=color, marker="o", markersize=4, label=METHOD_LABELS[method])
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.minorticks_off()
    ax.set(xlabel="training batch size (normalization batch)", ylabel="test accuracy", ylim=(0, 1),
           title=f"MLP, {r['examples']} training examples per run, " + count_seeds(len(r["seeds"])))  # fmt: skip
    ax.legend(loc="lower right", fontsize=8)
    return fig


def _shift_figure(plt: Any, r: dict[str, Any]) -> Any:
    fig, ax = plt.subplots(figsize=(7, 3.8))
    names = list(r["shifts"])
    width = 0.27
    for k, adaptation in enumerate(ADAPTATION_LABELS):
        xs = np.arange(len(names)) + (k - 1) * width
        values = [r["shifts"][n][adaptation] for n in names]
        bars = ax.bar(xs, values, width, color=ADAPTATION_COLORS[adaptation], label=ADAPTATION_LABELS[adaptation])
        ax.bar_label(bars, [f"{v:.0%}" for v in values], fontsize=7)
    ax.axhline(r["clean_test_acc"], color="black", linestyle="--", linewidth=0.8, label="clean test images")
    ax.set_xticks(np.arange(len(names)), names)
    ax.set(ylabel="test accuracy", ylim=(0, 1.22), title="CNN trained on clean images, scored on shifted ones")
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.legend(loc="upper center", fontsize=7, ncols=4)  # above 100%, clear of the bars
    return fig


# --- words ------------------------------------------------------------------------


def findings(results: dict[str, Any]) -> list[str]:
    """One sentence per part that ran, from its numbers alone."""
    out = []
    if "small_batch" in results:
        out.append(small_batch_sentence(results["small_batch"], results["summary"]["small_batch"]))
    if "shift" in results:
        out.append(shift_sentence(results["shift"]))
    return out


def small_batch_sentence(r: dict[str, Any], s: dict[str, Any]) -> str:
    """What the smallest batch did to BN and how much each remedy gave back, against the seeds' spread."""
    sizes = sorted(r["batch_sizes"])
    small, large = str(sizes[0]), str(sizes[-1])
    mean, spread = s["mean_test_acc"], s["seed_range"]
    seeds = len(r["seeds"])
    head = (
        f"Small batches (the MLP, {r['examples']} training examples per run, "
        + (f"mean of {seeds} seeds" if seeds > 1 else "one seed")
        + f"): with BN, test accuracy is {_mean(mean['bn'][large])} at batch {large} and {_mean(mean['bn'][small])} "
        + f"at batch {small}"
    )
    others = [m for m in r["methods"] if m != "bn"]
    at_small = ", ".join(f"{METHOD_LABELS[m]} {_mean(mean[m][small])}" for m in others)
    return f"{head}; at batch {small}: {at_small}; {_small_batch_verdict(mean, spread, small, others, seeds)}."


def _small_batch_verdict(mean: dict, spread: dict, size: str, others: list[str], seeds: int) -> str:
    if mean["bn"][size] is None:
        return "BN diverged there, so there is no baseline to compare with"
    ranked = sorted((mean[m][size], m) for m in others if mean[m][size] is not None)
    if not ranked:
        return "every other method diverged there"
    best_acc, best = ranked[-1]
    gain = best_acc - mean["bn"][size]
    width = max(spread[m][size][1] - spread[m][size][0] for m in ("bn", best))
    if gain <= 0:
        return f"none beats BN there (the best, {METHOD_LABELS[best]}, is {points(gain)})"
    if seeds == 1:
        return f"{METHOD_LABELS[best]} gains the most over BN, {points(gain)} (one seed: no spread measured)"
    if gain > width:
        return (
            f"{METHOD_LABELS[best]} gains the most over BN, {points(gain)}, more than the seeds of either differ "
            f"({100 * width:.1f} points)"
        )
    return (
        f"{METHOD_LABELS[best]} comes out ahead of BN by {points(gain)}, within how much the seeds differ "
        f"({100 * width:.1f} points)"
    )


def shift_sentence(r: dict[str, Any]) -> str:
    """Accuracy per shift as trained, after AdaBN and after TENT, and what each step gave."""
    if r["diverged_at"] is not None:
        return f"Distribution shift: the CNN diverged at step {r['diverged_at']}; nothing to adapt."
    shifts = r["shifts"]
    arrows = ", ".join(f"{name} {' -> '.join(pct(s[a]) for a in ADAPTATION_LABELS)}" for name, s in shifts.items())
    stats_gain = {n: s["statistics"] - s["source"] for n, s in shifts.items()}
    affine_gain = [s["affine"] - s["statistics"] for s in shifts.values()]
    most, least = max(stats_gain, key=stats_gain.get), min(stats_gain, key=stats_gain.get)
    return (
        f"Distribution shift (the CNN, {pct(r['clean_test_acc'])} on clean test images; adapted on unlabeled "
        f"shifted images of one half of the test set, scored on the other): as trained -> statistics adapted -> "
        f"γ/β adapted, {arrows}; adapting the statistics changes accuracy most on {most} "
        f"({points(stats_gain[most])}) and least on {least} ({points(stats_gain[least])}), and adapting γ/β as well "
        f"changes it by a further {100 * min(affine_gain):+.1f} to {100 * max(affine_gain):+.1f} points."
    )


def tables(results: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """``(title, header, rows)`` per part that ran, for the terminal and the report."""
    return [t for t in (_small_batch_table(results), _shift_table(results)) if t is not None]


def _small_batch_table(results: dict[str, Any]) -> tuple[str, list[str], list[list[str]]] | None:
    if "small_batch" not in results:
        return None
    r, mean = results["small_batch"], results["summary"]["small_batch"]["mean_test_acc"]
    seeds = len(r["seeds"])
    title = "Small batches: test accuracy" + (f", mean of {seeds} seeds" if seeds > 1 else "")
    header = ["batch", *(METHOD_LABELS[m] for m in r["methods"])]
    rows = [[str(b), *(_mean(mean[m][str(b)]) for m in r["methods"])] for b in r["batch_sizes"]]
    return title, header, rows


def _shift_table(results: dict[str, Any]) -> tuple[str, list[str], list[list[str]]] | None:
    if "shift" not in results or not results["shift"]["shifts"]:
        return None
    r = results["shift"]
    header = ["shift", *ADAPTATION_LABELS.values()]
    rows = [["clean", pct(r["clean_test_acc"]), "", ""]]
    rows += [[n, *(pct(s[a]) for a in ADAPTATION_LABELS)] for n, s in r["shifts"].items()]
    return "Distribution shift: test accuracy of the CNN", header, rows


def text_tables(results: dict[str, Any]) -> list[str]:
    """The tables as fixed-width lines, a blank line before each."""
    return format_text_tables(tables(results))


def format_text_tables(titled_tables: list[tuple[str, list[str], list[list[str]]]]) -> list[str]:
    """``(title, header, rows)`` tables as fixed-width lines, a blank line before each."""
    lines = []
    for title, header, rows in titled_tables:
        first = max(len(row[0]) for row in [header, *rows]) + 2
        widths = [max(len(row[k]) for row in [header, *rows]) + 2 for k in range(1, len(header))]
        lines += ["", title]
        for row in [header, *rows]:
            lines.append(f"{row[0]:{first}}" + "".join(f"{cell:>{w}}" for cell, w in zip(row[1:], widths, strict=True)))
    return lines


# --- HTML -------------------------------------------------------------------------


def html_sections(results: dict[str, Any], figure: Callable[[str], str], figures: list[str]) -> str:
    """The report's sections on the parts that ran; ``figure(name)`` embeds one figure."""
    esc = html.escape
    parts = []
    if "small_batch" in results:
        r = results["small_batch"]
        table = html_table(_small_batch_table(results))
        parts.append(
            "<h2>Small batches</h2>"
            f"<p>The paper's MLP with batch norm, trained at batch sizes {', '.join(map(str, r['batch_sizes']))} "
            f"on {r['examples']} training examples per run (a smaller batch takes more steps), plain SGD at lr "
            f"{r['lr']:g} at every size, seeds {', '.join(map(str, r['seeds']))}. The MLP, because each of its "
            "features is normalized over the batch alone: at batch 2 every normalized value is about &plusmn;1 in "
            "training, far from what the population statistics give in eval (the CNN normalizes each channel over "
            "its positions too, so its batch statistics are less noisy). <b>BN</b>: torch's moving averages (momentum "
            f"0.1). <b>Batch Renorm</b>: <code>BatchRenorm1d</code>, rmax {r['renorm']['rmax']:g}, dmax "
            f"{r['renorm']['dmax']:g} from the first step. <b>Ghost batches</b>: batches of {r['ghost_batch']} cut "
            "into ghosts of the batch size (each sample normalized with as few others as with BN, the gradient "
            "averaged over the whole batch; the same examples, hence fewer steps). <b>Precise statistics</b>: the "
            "BN network, its running statistics recomputed over the training set "
            f"(<code>precise_statistics</code>, {r['precise_chunk']} images per batch). Eval mode on the test "
            f"set.</p>{table}<p><b>{esc(small_batch_sentence(r, results['summary']['small_batch']))}</b></p>"
            + (figure("small_batch.png") if "small_batch.png" in figures else "")
        )
    if "shift" in results:
        r = results["shift"]
        descriptions = "; ".join(f"<b>{esc(n)}</b>: {esc(s['description'])}" for n, s in r["shifts"].items())
        table = html_table(_shift_table(results))
        a = r["adapt"]
        parts.append(
            "<h2>Distribution shift: test-time adaptation</h2>"
            f"<p>The CNN with batch norm, trained on clean images ({r['steps']} steps, lr {r['lr']:g}), scored on "
            f"shifted test images: {descriptions}. <b>Statistics adapted</b> (AdaBN): "
            "<code>batchnorm.adapt(model, batches)</code>, the running statistics recomputed on unlabeled shifted "
            "images. <b>+ γ/β adapted</b> (TENT): <code>adapt(..., affine=True)</code>, "
            f"{a['tent_steps']} passes of Adam at lr {a['tent_lr']:g} on the entropy of the predictions, batches of "
            f"{a['batch']}, then the statistics. The test set is split in two halves of about "
            f"{a['images_per_fold']} images: each half is scored by the model adapted on the other half's shifted "
            f"images (no labels), so no scored image was seen in adaptation.</p>{table}"
            f"<p><b>{esc(shift_sentence(r))}</b></p>" + (figure("shift.png") if "shift.png" in figures else "")
        )
    return "".join(parts)


def html_table(table: tuple[str, list[str], list[list[str]]] | None) -> str:
    if table is None:
        return ""
    esc = html.escape
    _, header, rows = table
    head = "<tr>" + "".join(f"<th>{esc(c)}</th>" for c in header) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"
