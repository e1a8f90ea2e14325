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

from . import batch_semantics_report, population_report, smoothness_report, story
from .words import pct

__all__ = ["findings", "summary_table", "write_figures", "write_html", "write_json"]

PAGES = (batch_semantics_report, smoothness_report, population_report)  # the experiments' own report pages, in order
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
    for page in PAGES:
        names += page.write_figures(plt, results, lambda fig, name: _save(plt, fig, folder / name))
    return names


def _save(plt: Any, fig: Any, path: Path) -> str:
    # fixed margins: tight_layout measures every label and costs seconds per figure on a slow CPU
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.88, wspace=0.25, hspace=0.25)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def _title(part: str) -> str:
    return "MLP (3x100 sigmoid)" if part == "mlp" else "CNN (3 conv, ReLU)"


def _after_start(arm: str, steps: list[int], values: list[Any]) -> tuple[list[int], list[Any]]:
    """With BN, the evaluation at step 0 used running statistics no batch had estimated yet (0 and
    1): it says nothing about the network, so the curves start at the next evaluation."""
    if arm != "bn":
        return steps, values
    keep = [i for i, step in enumerate(steps) if step > 0]
    return [steps[i] for i in keep], [values[i] for i in keep]


def _curves(plt: Any, r: dict[str, Any], part: str) -> Any:
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.6))
    for arm, a in r["arms"].items():
        ax_acc.plot(*_after_start(arm, a["steps"], a["test_acc"]), color=COLORS[arm], label=LABELS[arm])
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
    what = "one sigmoid of the last hidden layer" if part == "mlp" else "one channel of the last conv layer"
    for ax, (arm, a) in zip(axes, r["arms"].items(), strict=True):
        last = a["inputs"]["last_hidden"]
        plot_percentiles(recs[arm], last, ax, label=LABELS[arm], color=COLORS[arm], after=0 if arm == "bn" else None)
        ax.set_title(f"{LABELS[arm]}\ninput to {what} ({last})", fontsize=10)
        if a["diverged_at"] is not None:
            ax.axvline(a["diverged_at"], color=COLORS[arm], linestyle=":", label=f"diverged at step {a['diverged_at']}")
        ax.legend(loc="best")
    return fig


def _drift(plt: Any, recs: dict[str, InputRecorder], part: str) -> Any:
    layers = list(next(iter(recs.values())).history)
    fig, axes = plt.subplots(1, len(layers), figsize=(3.6 * len(layers), 3.4), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], layers, strict=True):
        for arm, rec in recs.items():
            d = rec.drift(name)
            first = 2 if arm == "bn" else 1  # with BN, the step-0 record used untrained running statistics
            steps = d["steps"][first:]
            if len(steps) == 0:
                continue
            for key, style, what in (("mean_shift", "-", "mean"), ("std_shift", "--", "std")):
                ax.plot(steps, _smooth(d[key][first:]), color=COLORS[arm], linestyle=style,
                        label=f"{LABELS[arm]}: {what}")  # fmt: skip
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
    """One column per layer (the first has nothing upstream: G' = G), with and without BN in the
    same panel: the relative change of the gradient on top, its direction below."""
    names = [n for n in next(iter(r["arms"].values()))["ics"]["layers"]][1:]
    fig, axes = plt.subplots(2, max(len(names), 1), figsize=(3.4 * max(len(names), 1), 5.2), sharex=True,
                             squeeze=False)  # fmt: skip
    for col, name in enumerate(names):
        ax_diff, ax_cos = axes[0][col], axes[1][col]
        for arm, a in r["arms"].items():
            v = a["ics"]["layers"].get(name)
            if v is None or not a["ics"]["steps"]:
                continue
            steps = a["ics"]["steps"]
            rel = np.asarray(v["diff_norm"], float) / np.maximum(np.asarray(v["grad_norm"], float), 1e-30)
            ax_diff.plot(steps, rel, color=COLORS[arm], marker="o", markersize=3, label=LABELS[arm])
            ax_cos.plot(steps, np.asarray(v["cosine"], float), color=COLORS[arm], marker="o", markersize=3,
                        label=LABELS[arm])  # fmt: skip
        ax_diff.set(yscale="log", title=f"{name}")
        ax_cos.set(xlabel="step", ylim=(-1.05, 1.05))
    axes[0][0].set_ylabel("||G - G'|| / ||G||")
    axes[1][0].set_ylabel("cos(G, G')")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Gradient ICS (Santurkar et al. 2018): how much the earlier layers' step changes each gradient")
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


def _steps(v: Any, budget: int, first_eval: int, diverged_at: Any = None) -> str:
    if diverged_at is not None and v is None:
        return f"never (diverged at step {diverged_at})"
    if v is None:
        return f"not within {budget} steps"
    return f"at step {v}" + (", the first evaluation" if v == first_eval else "")


def _span(r: Any) -> str:
    return "-" if r is None else f"[{r[0]:.2f}, {r[1]:.2f}]"


def _lr(lr: float, tried: list[float]) -> str:
    """A learning rate, saying so where it is an end of the grid tried (the window may go on)."""
    if len(tried) > 1 and lr == min(tried):
        return f"{lr:g} (the lowest rate tried)"
    if len(tried) > 1 and lr == max(tried):
        return f"{lr:g} (the highest rate tried)"
    return f"{lr:g}"


def _lr_range(rng: Any, tried: list[float] | None = None) -> str:
    if not rng:
        return "none"
    tried = tried or []
    return f"{_lr(rng[0], tried)} to {_lr(rng[1], tried)}"


def findings(results: dict[str, Any]) -> list[str]:
    """What this run showed, one sentence per claim, from the numbers alone."""
    out = []
    cfg = results["config"]
    s, target = results["summary"], cfg["target"]
    first_eval = cfg["eval_every"]
    if cfg.get("smoke_run"):
        out.append("A smoke run (--quick): too few steps, rates and seeds for conclusions; run without --quick.")
    for part in ("mlp", "cnn"):
        if part not in s:
            continue
        r = results[part]
        p, b = s[part]["plain"], s[part]["bn"]
        steps = r["steps"]
        out.append(
            f"{_title(part)}, lr {r['lr']:g}: {target:.0%} test accuracy reached "
            + f"{_steps(b['steps_to_target'], steps, first_eval, b['diverged_at'])} with BN, "
            + f"{_steps(p['steps_to_target'], steps, first_eval, p['diverged_at'])} without; final accuracy "
            + f"{_final(b)} vs {_final(p)}."
        )
        if p["diverged_at"] is None and b["diverged_at"] is None:
            drift = [("-" if x["last_hidden_mean_drift_total"] is None else f"{x['last_hidden_mean_drift_total']:.2f}")
                     for x in (p, b)]  # fmt: skip
            out.append(
                f"{_title(part)}: after step 0, the median input of the tracked {_tracked(part)} moved over "
                f"{_span(p['last_hidden_median_range'])} without BN and {_span(b['last_hidden_median_range'])} with "
                f"BN; over the second half of training {_span(p['last_hidden_median_range_second_half'])} vs "
                f"{_span(b['last_hidden_median_range_second_half'])}. Summed record-to-record drift of that layer's "
                f"per-feature input means: {drift[0]} without BN, {drift[1]} with BN."
            )
        rel_p, rel_b = p["ics_mean_relative_diff"], b["ics_mean_relative_diff"]
        layers, verdict = story.gradient_ics_verdict(rel_p, rel_b)
        if verdict is not None:
            out.append(
                f"{_title(part)}: gradient ICS ||G - G'||/||G|| (mean over measured steps) per layer, without BN "
                + ", ".join(f"{n} {rel_p[n]:.3g}" for n in layers)
                + "; with BN "
                + ", ".join(f"{n} {rel_b[n]:.3g}" for n in layers)
                + f": {verdict} (Santurkar et al. 2018 report that BN does not reduce this measure)."
            )
        if "single_image_acc_batch_stats" in b:
            count = b.get("single_image_count")
            which = f"the first {count} test images" if count and count < results["dataset"]["test"] else (
                "every test image")  # fmt: skip
            out.append(
                f"{_title(part)} with BN, predicting one image at a time ({which}): "
                + f"{pct(b['single_image_acc_batch_stats'])} with batch statistics, "
                + f"{pct(b['single_image_acc_population'])} with population statistics; "
                + f"folded multiply-add gives {'the same' if b['folded_same_predictions'] else 'DIFFERENT'} "
                + "predictions as the eval-mode layer."
            )
    if "sweep" in s:
        sw = results["sweep"]
        tried = [float(lr) for lr in sw["lrs"]]
        out.append(
            f"LR sweep ({len(sw['lrs'])} rates, {len(sw['seeds'])} seeds, {sw['steps']} steps; 'trains' = every seed "
            f"reaches {target:.0%}): with BN trains at lr {_lr_range(s['sweep']['bn']['trains_lr_range'], tried)}, "
            f"without BN at lr {_lr_range(s['sweep']['plain']['trains_lr_range'], tried)}."
        )
        fast = {arm: s["sweep"][arm]["fastest"] for arm in ("plain", "bn")}

        def fastest(f: Any) -> str:
            return "never" if not f else f"{f['median_steps_to_target']:g} steps at lr {_lr(f['lr'], tried)}"

        out.append(
            f"Each arm at its own best learning rate (median steps to {target:.0%} over seeds): with BN "
            f"{fastest(fast['bn'])}, without BN {fastest(fast['plain'])}."
        )
    for page in PAGES:
        out += page.findings(results)
    return out


def _final(arm: dict[str, Any]) -> str:
    return f"diverged at step {arm['diverged_at']}" if arm["diverged_at"] is not None else pct(arm["final_test_acc"])


def _tracked(part: str) -> str:
    return "sigmoid of the last hidden layer" if part == "mlp" else "channel of the last conv layer"


def summary_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The key numbers: ``(what, without BN, with BN)`` rows, for the terminal and the report."""
    s, target = results["summary"], results["config"]["target"]
    rows = []
    for part in ("mlp", "cnn"):
        if part not in s:
            continue
        p, b = s[part]["plain"], s[part]["bn"]
        steps = results[part]["steps"]

        def reached(arm: dict[str, Any], steps: int = steps) -> str:
            if arm["steps_to_target"] is not None:
                return str(arm["steps_to_target"])
            return f"diverged at {arm['diverged_at']}" if arm["diverged_at"] is not None else f">{steps}"

        rows.append((f"{part.upper()} steps to {target:.0%}", reached(p), reached(b)))
        rows.append((f"{part.upper()} final test acc", _final(p), _final(b)))
        if "single_image_acc_batch_stats" in b:
            rows.append((f"{part.upper()} 1-image, batch stats", "", pct(b["single_image_acc_batch_stats"])))
            rows.append((f"{part.upper()} 1-image, population", "", pct(b["single_image_acc_population"])))
    if "sweep" in s:
        rows.append(("LR range that trains", _lr_range(s["sweep"]["plain"]["trains_lr_range"]),
                     _lr_range(s["sweep"]["bn"]["trains_lr_range"])))  # fmt: skip
    return rows


def summary_table(results: dict[str, Any]) -> list[str]:
    """The terminal summary: a small fixed-width table."""
    rows = [("", "without BN", "with BN"), *summary_rows(results)]
    lines = [f"{what:24}{plain:>16}{bn:>16}" for what, plain, bn in rows]
    return lines + [line for page in PAGES for line in page.text_tables(results)]


# --- HTML -----------------------------------------------------------------------

_CAPTIONS = {
    "mlp_curves.png": "Test accuracy (population statistics) and training loss of the paper's MLP, same init. With "
    "BN the accuracy curve starts at the first evaluation after step 0: at step 0 its running statistics are still "
    "their initial 0 and 1.",
    "mlp_percentiles.png": "15th/50th/85th percentiles of the input to one sigmoid of the last hidden layer, on test "
    "images in eval mode, over training (the paper's Figure 1 b, c).",
    "mlp_drift.png": "How much each hidden layer's input distribution moved between consecutive records: RMS over "
    "features of the change of the per-feature mean (solid) and std (dashed).",
    "mlp_ics.png": "Gradient ICS (Santurkar et al. 2018, Def. 2.1), one column per layer: the change of the layer's "
    "weight gradient G on the same batch when the layers before it take their step (G'), relative to its size "
    "(top), and the cosine between the two (bottom).",
    "cnn_curves.png": "The small CNN (per-channel BN, ReLU): test accuracy and training loss (with BN from the first "
    "evaluation after step 0).",
    "cnn_percentiles.png": "Percentiles of the input to one ReLU channel of the last conv layer (all positions).",
    "cnn_drift.png": "CNN: change of each conv layer's output (ReLU input) distribution between records.",
    "cnn_ics.png": "CNN: gradient ICS, one column per layer, as for the MLP.",
    "lr_sweep.png": "Learning-rate sweep of the MLP over several seeds: final accuracy and steps to the target. A run "
    "whose loss became non-finite (or above 1e4) is marked diverged; one stuck at chance is not.",
    **{name: caption for page in PAGES for name, caption in page.CAPTIONS.items()},
}


def write_html(results: dict[str, Any], figures: list[str], folder: Path) -> None:
    esc = html.escape
    cfg = results["config"]
    rows = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in summary_rows(results))

    def data(name: str) -> str:
        return f"data:image/png;base64,{base64.b64encode((folder / name).read_bytes()).decode()}"

    def figure(name: str) -> str:
        return (
            f"<figure id='{esc(name)}'><img alt='{esc(name)}' src='{data(name)}'><figcaption>"
            f"{esc(_CAPTIONS.get(name, name))}</figcaption></figure>"
        )

    def thumbnail(name: str) -> str:
        return f"<a class='thumb' href='#{esc(name)}'><img alt='{esc(name)}' src='{data(name)}'></a>"

    own = {name for page in PAGES for name in page.CAPTIONS}  # drawn in their own sections
    figs = "".join(figure(name) for name in figures if name not in own)
    semantics = "".join(page.html_sections(results, figure, figures) for page in PAGES)
    facts = "".join(f"<li>{esc(f)}</li>" for f in findings(results))
    d = results["dataset"]
    smoke = (
        "<p class='smoke'><b>A smoke run</b> (<code>--quick</code>): fewer steps, rates and seeds than the demo; "
        "the figures show that everything runs, not what batch norm does. Run <code>batchnorm demo</code> "
        "without <code>--quick</code> for that.</p>"
        if cfg.get("smoke_run")
        else ""
    )
    narrative = story.html_section(results, thumbnail, figures)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>batchnorm demo: {esc(d["name"])}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 960px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 3px 10px; text-align: right; }}
td:first-child {{ text-align: left; }} figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }}
figcaption {{ color: #555; font-size: 0.9em; }} code {{ background: #f3f3f3; padding: 0 3px; }}
.smoke {{ background: #fff3cd; border: 1px solid #e0c060; padding: 0.5em 1em; }}
.chapter {{ display: flex; gap: 1em; align-items: flex-start; border-top: 1px solid #ddd; padding: 0.3em 0; }}
.chapter .words {{ flex: 1; }} .chapter h3 {{ margin: 0.4em 0; font-size: 1.05em; }}
.thumb img {{ width: 300px; border: 1px solid #ccc; }}
.verdict.agrees {{ color: #1a6b1a; }} .verdict.disagrees {{ color: #a11; }} .verdict.mixed {{ color: #8a5a00; }}
</style></head><body>
<h1>What batch normalization changes</h1>
{smoke}
<p>Dataset <b>{esc(d["name"])}</b>: {d["train"]} training and {d["test"]} test images of shape
{esc("x".join(map(str, d["image_shape"])))}. Plain SGD, batch {cfg["batch_size"]}, seed {cfg["seed"]};
the MLP is Ioffe &amp; Szegedy's (2015, sec. 4.1): {len(cfg["hidden"])} hidden layers of {cfg["hidden"][0]}
sigmoid units, weights N(0, {cfg["init_std"]}&sup2;), with and without BN before every sigmoid, from the same
initialization. Every number is in <code>results.json</code>.</p>
<h2>Key numbers</h2>
<table><tr><th></th><th>without BN</th><th>with BN</th></tr>{rows}</table>
{narrative}
<h2>What this run shows</h2><ul>{facts}</ul>
<h2>How to read it</h2>
<p>Accuracy is measured on the test set in eval mode (population statistics); the arm with BN is plotted from
the first evaluation after step 0, since at step 0 its running statistics are still their initial values.
Percentiles and input drift are taken on up to {cfg["probe_size"]} test images in eval mode at every evaluation
(every {cfg["eval_every"]} steps). Layers are named alike everywhere: <code>hidden1</code>&ndash;<code>hidden3</code>
(the MLP's hidden layers; a figure about a layer's input means the input of its sigmoid),
<code>conv1</code>&ndash;<code>conv3</code> (the CNN's), <code>output</code> (the classifier). The gradient ICS at a
step compares each layer's weight gradient <i>G</i> with <i>G'</i>, the gradient on the same batch after the
earlier layers (weights, biases, BN scale and shift) took their SGD step; the first layer has no earlier layers.
"Batch statistics, one image at a time" normalizes each BN layer with the statistics of a batch of one image
(what training mode would compute); with one value per feature, the MLP's BN output is then just its shift.
A run whose loss became non-finite (or above 1e4) is reported as diverged at that step.</p>
<h2>Why this configuration</h2>
<p>The paper gives no learning rate and no initialization scale. The weights are N(0, {cfg["init_std"]}&sup2;)
(&ldquo;small Gaussian&rdquo;, as in a public MNIST reproduction); with such an initialization the network
without BN first sits at chance on a plateau (its gradients shrink through every sigmoid layer, whose slope is at
most 1/4) and then learns. The MLP's learning rate, {cfg["mlp_lr"]:g}, is where the arm <i>without</i> BN learned
fastest in our sweeps; at smaller rates it stays on the plateau longer, so this choice favours the arm without BN.
The sweep shows the other rates. One test image is {1 / d["test"]:.2%} of the test set: differences of a few
images are noise.</p>
{semantics}
<h2>Figures</h2>{figs}
</body></html>
"""
    (folder / "report.html").write_text(page, encoding="utf-8")
