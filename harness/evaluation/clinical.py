"""Clinical readouts: an operating threshold for a target sensitivity, the sensitivity / specificity / PPV / NPV it
gives with exact Clopper-Pearson CIs, decision curves (net benefit, Vickers & Elkin 2006), and the images every model
or only the champion gets wrong.

A score is one class's probability per image, (N,); `positive` says which images truly are that class. The
threshold is chosen on out-of-fold predictions and then applied unchanged to the test split, so the test
sensitivity is an honest estimate of what the chosen threshold delivers.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402


def _checked(score: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    score = np.asarray(score, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    if score.ndim != 1 or positive.shape != score.shape:
        raise ValueError(f"score and positive must be equal-length 1-D arrays, got {score.shape} and {positive.shape}")
    return score, positive


def threshold_for_sensitivity(score: np.ndarray, positive: np.ndarray, target: float) -> float:
    """The largest t for which calling `score >= t` positive reaches sensitivity >= `target` on these predictions.

    Largest, because a higher threshold with the same sensitivity can only call fewer negatives positive. It is
    always one of the positives' scores (positives scoring exactly t are called). Raises ValueError with no positives
    or a target outside (0, 1].
    """
    score, positive = _checked(score, positive)
    if not 0 < target <= 1:
        raise ValueError(f"target sensitivity must lie in (0, 1], got {target}")
    pos = np.sort(score[positive])[::-1]  # descending: the threshold at pos[j] calls at least j + 1 positives
    if not len(pos):
        raise ValueError("no positives: sensitivity is undefined")
    # Positives called at t = pos[j], ties included; sensitivity computed as operating_metrics does (k / n).
    called = np.searchsorted(-pos, -pos, side="right")
    reached = called / len(pos) >= target
    return float(pos[np.argmax(reached)])  # target <= 1 is reached at the lowest positive score, so argmax is valid


def _proportion(name: str, k: int, n: int) -> dict:
    """k / n with its exact Clopper-Pearson 95% CI; nan for all three when n = 0."""
    if not n:
        return {name: float("nan"), f"{name}_ci_low": float("nan"), f"{name}_ci_high": float("nan")}
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return {name: k / n, f"{name}_ci_low": float(ci.low), f"{name}_ci_high": float(ci.high)}


def operating_metrics(score: np.ndarray, positive: np.ndarray, threshold: float) -> dict:
    """Sensitivity, specificity, PPV and NPV of calling `score >= threshold` positive, each with an exact
    Clopper-Pearson 95% CI (`<name>_ci_low`, `<name>_ci_high`), plus the counts tp, fp, tn, fn and the threshold."""
    score, positive = _checked(score, positive)
    call = score >= threshold
    tp, fp = int((call & positive).sum()), int((call & ~positive).sum())
    tn, fn = int((~call & ~positive).sum()), int((~call & positive).sum())
    return {
        **_proportion("sensitivity", tp, tp + fn),
        **_proportion("specificity", tn, tn + fp),
        **_proportion("ppv", tp, tp + fp),
        **_proportion("npv", tn, tn + fn),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "threshold": float(threshold),
    }


def decide(proba: np.ndarray, class_index: int, threshold: float) -> np.ndarray:
    """The decision column: True where the operating class's probability reaches the threshold."""
    return np.asarray(proba)[:, class_index] >= threshold


def _threshold_array(thresholds) -> np.ndarray:
    pt = np.asarray(thresholds, dtype=np.float64)
    if np.any((pt <= 0) | (pt >= 1)):
        raise ValueError("threshold probabilities must lie in (0, 1): the odds pt / (1 - pt) are undefined at 1")
    return pt


def net_benefit(score: np.ndarray, positive: np.ndarray, thresholds) -> np.ndarray:
    """Net benefit TP/N - FP/N * pt / (1 - pt) of calling `score >= pt` positive, at each threshold probability pt
    (Vickers & Elkin 2006); the result has the shape of `thresholds`."""
    score, positive = _checked(score, positive)
    pt = _threshold_array(thresholds)
    flat = pt.reshape(-1, 1)
    call = score[None, :] >= flat  # (thresholds, images)
    n = len(score)
    tp = (call & positive).sum(axis=1)
    fp = (call & ~positive).sum(axis=1)
    return (tp / n - fp / n * flat[:, 0] / (1 - flat[:, 0])).reshape(pt.shape)


def treat_all(positive: np.ndarray, thresholds) -> np.ndarray:
    """Net benefit of calling every image positive: prevalence - (1 - prevalence) * pt / (1 - pt). Treat-none is 0."""
    prevalence = float(np.mean(np.asarray(positive, dtype=bool)))
    pt = _threshold_array(thresholds)
    return prevalence - (1 - prevalence) * pt / (1 - pt)


DEFAULT_THRESHOLDS = np.round(np.arange(0.01, 1.0, 0.01), 2)


def decision_curve_figure(
    curves: dict[str, np.ndarray], positive: np.ndarray, *, thresholds=None, class_name: str = ""
):
    """Net benefit against threshold probability for each named score array, with treat-all and treat-none.

    The y-axis stops at -0.05: treat-all falls without bound as pt -> 1 and would otherwise flatten every model's
    curve. Returns the matplotlib Figure (5 x 4 inches); the caller saves and closes it.
    """
    pt = DEFAULT_THRESHOLDS if thresholds is None else _threshold_array(thresholds)
    positive = np.asarray(positive, dtype=bool)
    fig, ax = plt.subplots(figsize=(5, 4))
    top = float(np.mean(positive))  # no model beats the prevalence: that is a perfect model as pt -> 0
    for name, score in curves.items():
        nb = net_benefit(score, positive, pt)
        ax.plot(pt, nb, lw=1.5, label=name)
        top = max(top, float(np.nanmax(nb)))
    ax.plot(pt, treat_all(positive, pt), ls="--", color="0.5", lw=1, label="treat all")
    ax.plot(pt, np.zeros_like(pt), ls=":", color="black", lw=1, label="treat none")
    ax.set_xlim(float(pt.min()), float(pt.max()))
    ax.set_ylim(-0.05, max(top, 0.01) * 1.1 + 0.01)
    ax.set_xlabel("threshold probability")
    ax.set_ylabel("net benefit")
    ax.set_title(f"decision curve: {class_name}" if class_name else "decision curve", fontsize=10)
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def failures(correct: dict[str, np.ndarray], champion: str) -> dict:
    """Image indices every model gets wrong ("all_wrong") and those only the champion gets wrong
    ("only_champion_wrong": champion wrong, every other model right).

    With one model, "every other model right" holds vacuously, so both are that model's wrong images.
    """
    if champion not in correct:
        raise KeyError(f"champion {champion!r} is not among the models {sorted(correct)}")
    table = {name: np.asarray(c, dtype=bool) for name, c in correct.items()}
    if len({c.shape for c in table.values()}) != 1:
        raise ValueError("every model must be scored on the same images")
    right = np.stack(list(table.values()))
    others = np.stack([c for name, c in table.items() if name != champion] or [np.ones_like(table[champion])])
    return {
        "all_wrong": np.flatnonzero(~right.any(axis=0)),
        "only_champion_wrong": np.flatnonzero(~table[champion] & others.all(axis=0)),
    }
