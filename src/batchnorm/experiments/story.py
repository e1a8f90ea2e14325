"""The report's opening narrative: from the lecture's internal covariate shift to what the
field now believes about why batch normalization helps, one chapter per claim.

Each chapter states a claim (the lecture's or a paper's), what this run measured about
it, with the numbers, whether the run agrees, and the figure that shows it. The claims
and the closing paragraph are fixed text; the measurements and every verdict are
computed from the run's summary, so a run that comes out the other way says so. A
chapter whose part was skipped is left out.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from . import smoothness_report
from .words import pct

__all__ = ["Chapter", "chapters", "gradient_ics_verdict", "html_section", "to_json"]

AGREES, DISAGREES, MIXED = "agrees", "disagrees", "mixed"


@dataclass(frozen=True)
class Chapter:
    title: str
    claim: str  # what the lecture or a paper says
    measured: str  # what this run measured, with its numbers
    verdict: str  # AGREES, DISAGREES or MIXED: whether the run agrees with the claim
    verdict_text: str  # the verdict in words
    figure: str  # the figure that shows it


def gradient_ics_verdict(rel_plain: dict[str, float], rel_bn: dict[str, float]) -> tuple[list[str], str | None]:
    """The layers compared (all but the first, which has nothing upstream) and what BN does to their gradient ICS:
    "lower with BN in every layer" (each below 0.8x without BN), "slightly lower with BN in every layer" (each
    below 1x, not all below 0.8x), "higher with BN in every layer" (each above 1.25x), else "not consistently lower
    with BN"; None when there is no layer to compare."""
    layers = [n for n in list(rel_plain)[1:] if n in rel_bn]
    if not layers:
        return layers, None
    ratios = [rel_bn[n] / rel_plain[n] if rel_plain[n] > 0 else math.inf for n in layers]
    if all(r < 0.8 for r in ratios):
        return layers, LOWER
    if all(r < 1 for r in ratios):
        return layers, SLIGHTLY_LOWER
    if all(r > 1.25 for r in ratios):
        return layers, "higher with BN in every layer"
    return layers, "not consistently lower with BN"


LOWER, SLIGHTLY_LOWER = "lower with BN in every layer", "slightly lower with BN in every layer"


def _sentence(clauses: list[str]) -> str:
    text = "; ".join(clauses)
    return text[:1].upper() + text[1:] + "."


def _reached(arm: dict[str, Any]) -> str:
    if arm["steps_to_target"] is not None:
        return f"step {arm['steps_to_target']}"
    return f"never (diverged at step {arm['diverged_at']})" if arm["diverged_at"] is not None else "never"


def _faster(b: dict[str, Any], p: dict[str, Any]) -> bool | None:
    """Whether BN reached the target first; None when neither did."""
    if b["steps_to_target"] is None:
        return None if p["steps_to_target"] is None else False
    return p["steps_to_target"] is None or b["steps_to_target"] < p["steps_to_target"]


def _speed(results: dict[str, Any]) -> Chapter | None:
    s, target = results["summary"], results["config"]["target"]
    parts = [p for p in ("mlp", "cnn") if p in s]
    if not parts:
        return None
    names = {"mlp": "the MLP", "cnn": "the CNN"}
    measured = [f"{names[p]} reaches {target:.0%} test accuracy at {_reached(s[p]['bn'])} with BN and at "
                f"{_reached(s[p]['plain'])} without" for p in parts]  # fmt: skip
    faster = [_faster(s[p]["bn"], s[p]["plain"]) for p in parts]
    wider = None
    if "sweep" in s:
        bn, plain = (s["sweep"][a]["trains_lr_range"] for a in ("bn", "plain"))
        show = {a: "none" if not r else f"{r[0]:g} only" if r[0] == r[1] else f"{r[0]:g} to {r[1]:g}"
                for a, r in (("bn", bn), ("plain", plain))}  # fmt: skip
        measured.append(f"every seed reaches {target:.0%} at learning rates {show['bn']} with BN and {show['plain']} "
                        "without")  # fmt: skip
        trains = {a: {lr for lr, st in s["sweep"][a]["status"].items() if st == "trains"} for a in ("bn", "plain")}
        wider = trains["bn"] > trains["plain"]  # every rate that trains without BN, and more
    if all(faster) and wider is not False:
        verdict, text = AGREES, "agrees: BN reaches the target first" + (
            " and trains over a wider range of learning rates" if wider else "")  # fmt: skip
    elif not any(f for f in faster) and not wider:
        verdict, text = DISAGREES, "disagrees: BN is not faster here"
    else:
        verdict, text = MIXED, "partly: BN is faster in some of these measures only"
    return Chapter(
        "1. Batch norm trains faster and lets the learning rate be larger",
        "The lecture: with every layer's features on one scale, training is faster and the learning rate is easier "
        "to choose.",
        _sentence(measured),
        verdict,
        text,
        "lr_sweep.png" if "sweep" in s else f"{parts[0]}_curves.png",
    )


def _distributions(results: dict[str, Any]) -> Chapter | None:
    s = results["summary"]
    if "mlp" not in s:
        return None
    p, b = s["mlp"]["plain"], s["mlp"]["bn"]
    width = {a: None if x["last_hidden_median_range"] is None else x["last_hidden_median_range"][1] -
             x["last_hidden_median_range"][0] for a, x in (("plain", p), ("bn", b))}  # fmt: skip
    drift = {"plain": p["last_hidden_mean_drift_total"], "bn": b["last_hidden_mean_drift_total"]}
    if None in width.values() or None in drift.values():
        return None
    calmer = [width["bn"] < width["plain"], drift["bn"] < drift["plain"]]
    verdict = AGREES if all(calmer) else DISAGREES if not any(calmer) else MIXED
    text = {AGREES: "agrees: with BN the layer's input moves less", DISAGREES: "disagrees: with BN it moves as much "
            "or more", MIXED: "partly: one measure moves less with BN, the other does not"}[verdict]  # fmt: skip
    return Chapter(
        "2. With batch norm, a layer's input distribution moves less (internal covariate shift)",
        "The lecture: as the layers before it learn, the distribution of each layer's input keeps changing "
        "(internal covariate shift); batch norm fixes each feature's mean and variance, so it should change less. "
        "Ioffe & Szegedy show this with the percentiles of one sigmoid's input (their Figure 1).",
        f"The median input of one sigmoid of the MLP's last hidden layer (test images, eval mode) wanders over a "
        f"range of {width['plain']:.2f} without BN and {width['bn']:.2f} with BN after the first step; the summed "
        f"change of that layer's per-feature input means from record to record is {drift['plain']:.2f} without BN "
        f"and {drift['bn']:.2f} with BN.",
        verdict,
        text,
        "mlp_percentiles.png",
    )


def _gradient_ics(results: dict[str, Any]) -> Chapter | None:
    s = results["summary"]
    if "mlp" not in s:
        return None
    rel_p, rel_b = s["mlp"]["plain"]["ics_mean_relative_diff"], s["mlp"]["bn"]["ics_mean_relative_diff"]
    layers, found = gradient_ics_verdict(rel_p, rel_b)
    if found is None:
        return None
    verdict = {LOWER: DISAGREES, SLIGHTLY_LOWER: MIXED}.get(found, AGREES)
    text = {
        DISAGREES: "disagrees: here BN lowers the gradient ICS in every layer, by more than a fifth",
        MIXED: "partly: BN's gradient ICS is lower in every layer here, but by less than a fifth in some",
    }.get(verdict, f"agrees: the gradient ICS is {found}")
    return Chapter(
        "3. But covariate shift, measured by what it does to the gradient, is not smaller with batch norm",
        "Santurkar et al. (2018): if covariate shift were what slows training, it would show in how much a layer's "
        "gradient changes when the layers before it take their step (gradient ICS). They found batch norm does not "
        "reduce it, and often increases it.",
        "The MLP's relative gradient change ||G - G'||/||G|| (mean over the measured steps), per layer: "
        + ", ".join(f"{n} {rel_p[n]:.3g} without BN and {rel_b[n]:.3g} with" for n in layers)
        + ".",
        verdict,
        text,
        "mlp_ics.png",
    )


def _noisy(results: dict[str, Any]) -> Chapter | None:
    if "noisy_bn" not in results:
        return None
    r = results["noisy_bn"]
    arms = r["arms"]
    change = {a: arms[a]["instability"]["mean_step_change"] for a in arms}
    outcome = smoothness_report.noisy_outcome(arms, change)
    found = smoothness_report.NOISY_OUTCOMES[outcome]
    verdict = {"fast_despite_shift": AGREES, "never": DISAGREES, "not_faster": DISAGREES}.get(outcome, MIXED)
    moves = ", ".join(f"{smoothness_report.ARM_LABELS[a]} {'-' if change[a] is None else f'{change[a]:.3g}'}"
                      for a in ("noisy", "bn", "plain"))  # fmt: skip
    return Chapter(
        "4. Put the shift back in: batch norm followed by noise still trains fast",
        "Santurkar et al. (2018): add noise after every batch-norm layer that moves each unit's mean and scale by "
        "random amounts drawn anew at every step, so the layers' inputs are less stable than without batch norm, "
        "and the network still trains about as fast as with batch norm alone. Stable input distributions are not "
        "what makes it fast.",
        f"Steps to {r['target']:.0%} test accuracy: noisy BN {_reached(arms['noisy'])}, BN {_reached(arms['bn'])}, "
        f"without BN {_reached(arms['plain'])}; the batch mean of a {r['layer']} sigmoid input moves from step to "
        f"step by {moves} (RMS over units).",
        verdict,
        f"{'agrees' if verdict == AGREES else 'disagrees' if verdict == DISAGREES else 'inconclusive'}: "
        f"{found.removeprefix('so ')}",
        "noisy_bn.png",
    )


def _smoothness(results: dict[str, Any]) -> Chapter | None:
    if "smoothness" not in results:
        return None
    s = results["summary"]["smoothness"]
    n = s["probes_compared"]
    if n == 0:
        return None
    smoother = smoothness_report.smoother_measures(s, n)
    labels = smoothness_report.MEASURE_LABELS
    verdict = AGREES if len(smoother) == len(labels) else DISAGREES if not smoother else MIXED
    numbers = "; ".join(f"{labels[m]} {s[m]['median_plain']:.3g} without BN, {s[m]['median_bn']:.3g} with "
                        f"(BN smaller at {s[m]['bn_smaller_at']} of {n})" for m in labels)  # fmt: skip
    return Chapter(
        "5. What batch norm does change: the loss is smoother along the gradient",
        "Santurkar et al. (2018): with batch norm the loss changes less, and its gradient more predictably, as one "
        "steps along the gradient (their Figure 4); a smoother loss lets larger steps be taken safely, which is "
        "where the speed comes from.",
        f"Probing the MLP's loss along the gradient at {n} points of training over {s['seeds']} seed"
        f"{'s' if s['seeds'] != 1 else ''} (medians): {numbers}.",
        verdict,
        f"{verdict if verdict != MIXED else 'partly'}: {smoothness_report.smoothness_verdict(s, n)}",
        "smoothness.png",
    )


def _inference(results: dict[str, Any]) -> Chapter | None:
    s = results["summary"]
    if "mlp" not in s or "single_image_acc_batch_stats" not in s["mlp"]["bn"]:
        return None
    b = s["mlp"]["bn"]
    measured = [f"predicting one test image at a time, the MLP with BN scores {pct(b['single_image_acc_population'])}"
                f" with the population statistics and {pct(b['single_image_acc_batch_stats'])} with the statistics "
                "of the one image; folded into one multiply-add per feature it predicts "
                f"{'the same' if b['folded_same_predictions'] else 'differently'}"]  # fmt: skip
    good = b["single_image_acc_population"] > b["single_image_acc_batch_stats"] and b["folded_same_predictions"]
    estimated = "population" in s and s["population"]["seeds_estimated"]
    if estimated:
        measured += _population_measures(results["population"], s["population"])
    return Chapter(
        "6. At inference, statistics gathered in training stand in for the batch",
        "The lecture: at inference, mean and variance are fixed to averages gathered in training, and normalization, "
        "scale and shift collapse into one multiply and one add. Wu & Johnson (2021): how those averages are "
        "gathered, and how small the training batches were, decide how well eval mode matches training.",
        _sentence(measured),
        AGREES if good else DISAGREES,
        "agrees: population statistics make single-image prediction work, and the fold changes nothing"
        if good
        else "disagrees: population statistics do not beat one image's own here, or the fold differs",
        "population.png" if estimated else "mlp_curves.png",
    )


def _population_measures(r: dict[str, Any], pop: dict[str, Any]) -> list[str]:
    """The estimate's error, and how far apart batch and population statistics are at the smallest and largest
    normalization batch."""
    error, whole = pop["as_trained"]["error"], pop["precise_whole_set"]["error"]
    out = [f"the running average the layers kept has a statistics error of {error:.3g} (precise statistics over the "
           f"whole training set: {whole:.3g})"]  # fmt: skip
    gaps = pop["gaps"]
    sizes = [v for v in r["norm_batches"] if gaps[str(v)]["test_gap"] is not None]
    if not sizes:
        return out
    small, large = gaps[str(sizes[0])], gaps[str(sizes[-1])]
    if abs(small["test_gap"]) > abs(large["test_gap"]):
        out.append(
            f"trained with normalization batches of {sizes[0]}, the network scores "
            f"{pct(small['test_batch_statistics'])} normalizing by batch statistics as in training and "
            f"{pct(small['test_population_statistics'])} in eval mode ({pct(large['test_batch_statistics'])} and "
            f"{pct(large['test_population_statistics'])} at {sizes[-1]}): the two modes differ more the smaller the "
            "batch"
        )
    else:
        out.append(f"trained with normalization batches of {sizes[0]} and {sizes[-1]}, the two modes differ by "
                   f"{100 * small['test_gap']:+.1f} and {100 * large['test_gap']:+.1f} points")  # fmt: skip
    return out


BELIEF = (
    "Batch norm works, and the lecture's account of it (training is faster and tolerates larger learning rates; "
    "population statistics at inference) holds. Its explanation, reduced internal covariate shift, did not survive "
    "measurement: Santurkar et al. (2018) showed that batch norm does not reduce covariate shift measured on the "
    "gradient, that training stays fast when the shift is put back by noise, and that what batch norm does change "
    "is the smoothness of the loss, which lets larger learning rates be used (Bjorck et al. 2018 reached the same "
    "conclusion from the learning rate's side). Their smoothness analysis is itself a partial account, and the "
    "question of why normalization helps is still studied. What is settled is where batch norm is weak: everything "
    "that depends on the batch, that is small batches, moving averages taken while the weights change, and the "
    "mismatch between training's batch statistics and eval's population statistics (Wu & Johnson 2021). This is "
    "why group and layer normalization, Batch Renorm, ghost batches and precise statistics exist."
)


def chapters(results: dict[str, Any]) -> list[Chapter]:
    """Every chapter whose parts ran, in the order of the argument."""
    found = (_speed(results), _distributions(results), _gradient_ics(results), _noisy(results),
             _smoothness(results), _inference(results))  # fmt: skip
    return [c for c in found if c is not None]


def to_json(results: dict[str, Any]) -> list[dict[str, str]]:
    return [asdict(c) for c in chapters(results)]


def html_section(results: dict[str, Any], thumbnail: Callable[[str], str], figures: list[str]) -> str:
    """The narrative as one HTML section; ``thumbnail(name)`` embeds a small copy of a figure linking to it."""
    esc = html.escape
    found = chapters(results)
    if not found:
        return ""
    rows = []
    for c in found:
        figure = thumbnail(c.figure) if c.figure in figures else ""
        rows.append(
            f"<div class='chapter'><div class='words'><h3>{esc(c.title)}</h3><p><b>The claim.</b> {esc(c.claim)}</p>"
            f"<p><b>This run.</b> {esc(c.measured)}</p><p class='verdict {c.verdict}'><b>Verdict:</b> "
            f"{esc(c.verdict_text)}.</p></div>{figure}</div>"
        )
    tally = {v: sum(c.verdict == v for c in found) for v in (AGREES, MIXED, DISAGREES)}
    return (
        "<h2 id='story'>The story: from internal covariate shift to why batch norm helps</h2>"
        "<p>The lecture explains batch norm by internal covariate shift. Below, the argument as the field made it, "
        "one claim at a time: what was claimed, what this run measured, and whether it agrees. The verdicts are "
        f"computed from this run's numbers: {tally[AGREES]} agree, {tally[MIXED]} partly, {tally[DISAGREES]} "
        "disagree. Each figure links to its full size below.</p>"
        + "".join(rows)
        + f"<h3>7. What the field believes now</h3><p>{esc(BELIEF)}</p>"
    )
