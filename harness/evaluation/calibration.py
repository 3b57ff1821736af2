"""Calibration: temperature scaling, top-label expected calibration error (ECE) with a bootstrap CI, the Brier
score, and the reliability diagram.

Probabilities are (N, k) float arrays whose rows sum to 1 (k >= 2; a binary model is two columns, as
`metrics.as_proba` makes them); labels are ints in [0, k). Everything here is a plain function of those arrays:
logging and file paths belong to the callers.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import optimize, special, stats  # noqa: E402

# log(0) would make a confidently wrong image infinitely costly and the NLL flat in T; 1e-12 is far below any
# float32 softmax output that matters and still finite after division by the smallest T.
_EPS = 1e-12
T_BOUNDS = (0.05, 20.0)


def _checked(proba: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    proba = np.asarray(proba, dtype=np.float64)
    y = np.asarray(y).astype(np.int64, copy=False)
    if proba.ndim != 2 or proba.shape[1] < 2:
        raise ValueError(f"probabilities must be (N, k) with k >= 2, got shape {proba.shape}")
    if y.shape != (proba.shape[0],):
        raise ValueError(f"labels must be ({proba.shape[0]},), got shape {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= proba.shape[1]):
        raise ValueError(f"labels must lie in [0, {proba.shape[1]})")
    return proba, y


def _log(proba: np.ndarray) -> np.ndarray:
    return np.log(np.clip(proba, _EPS, 1.0))


def _nll(log_p: np.ndarray, y: np.ndarray, t: float) -> float:
    """Mean negative log-likelihood of softmax(log_p / t)."""
    return float(-special.log_softmax(log_p / t, axis=1)[np.arange(len(y)), y].mean())


def fit_temperature(proba: np.ndarray, y: np.ndarray) -> float:
    """The temperature T minimising the NLL of softmax(log(p) / T) (Guo et al. 2017), T in `T_BOUNDS`.

    Fit it on out-of-fold predictions only, never on the test split: a T chosen on the images it is then scored on
    makes the test calibration look better than it is. T > 1 softens an overconfident model, T < 1 sharpens an
    underconfident one; the argmax, and so accuracy, is unchanged. log(p) are the logits up to a per-row constant,
    which softmax ignores, so this is temperature scaling without access to the logits.
    """
    proba, y = _checked(proba, y)
    if not len(y):
        raise ValueError("no predictions to fit a temperature on")
    log_p = _log(proba)
    # Searched on log T: the NLL is convex in 1/T, so unimodal in log T, and the bounds are symmetric in ratio.
    res = optimize.minimize_scalar(
        lambda s: _nll(log_p, y, float(np.exp(s))),
        bounds=tuple(np.log(T_BOUNDS)),
        method="bounded",
        options={"xatol": 1e-5},
    )
    return float(np.exp(res.x))


def apply_temperature(proba: np.ndarray, t: float) -> np.ndarray:
    """softmax(log(p) / t): rows still sum to 1; t = 1 returns `proba` up to float error (and the clip at 1e-12)."""
    if not t > 0:
        raise ValueError(f"temperature must be positive, got {t}")
    proba = np.asarray(proba, dtype=np.float64)
    return special.softmax(_log(proba) / t, axis=1)


def _bin_index(conf: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bins (i/bins, (i+1)/bins]: confidence 1.0 falls in the last bin, 0.5 in the one ending at 0.5."""
    return np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)


def _top_label(proba: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-label confidence and whether the top label is right, per image."""
    return proba.max(axis=1), (proba.argmax(axis=1) == y).astype(np.float64)


def _ece_rows(conf: np.ndarray, correct: np.ndarray, bins: int) -> np.ndarray:
    """ECE of each row of (m, n) arrays (one row per bootstrap resample).

    sum_b |B|/n * |acc_b - conf_b| = sum_b |sum_{i in b} (correct_i - conf_i)| / n, so one weighted bincount over
    (row, bin) cells computes every row at once.
    """
    m, n = conf.shape
    cell = _bin_index(conf, bins) + bins * np.arange(m)[:, None]
    gap = np.bincount(cell.ravel(), weights=(correct - conf).ravel(), minlength=m * bins).reshape(m, bins)
    return np.abs(gap).sum(axis=1) / n


def _check_bins(bins: int) -> None:
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")


def ece(proba: np.ndarray, y: np.ndarray, *, bins: int = 10) -> float:
    """Top-label expected calibration error with `bins` equal-width confidence bins (nan with no images)."""
    proba, y = _checked(proba, y)
    _check_bins(bins)
    if not len(y):
        return float("nan")
    conf, correct = _top_label(proba, y)
    return float(_ece_rows(conf[None, :], correct[None, :], bins)[0])


def ece_ci(proba: np.ndarray, y: np.ndarray, *, bins: int = 10, seed: int = 0, n_resamples: int = 2000) -> dict:
    """ECE with a 95% percentile bootstrap CI over images (confidence and correctness resampled together).

    ECE is biased upwards (a resample's per-bin noise only adds to |gap|), so for a nearly calibrated model the
    interval can sit above the point estimate; it is reported as computed, not re-centred. Fewer than 2 images: nan CI.
    """
    proba, y = _checked(proba, y)
    _check_bins(bins)
    point = ece(proba, y, bins=bins)
    n = len(y)
    if n < 2:
        return {"ece": point, "ece_ci_low": float("nan"), "ece_ci_high": float("nan")}
    conf, correct = _top_label(proba, y)

    def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        # Resampled indices keep each image's confidence paired with its correctness.
        rows = np.atleast_2d(idx)
        out = _ece_rows(conf[rows], correct[rows], bins)
        return out if np.ndim(idx) > 1 else out[0]

    res = stats.bootstrap(
        (np.arange(n),),
        statistic,
        vectorized=True,
        confidence_level=0.95,
        n_resamples=n_resamples,
        method="percentile",
        random_state=seed,
        batch=100,  # as metrics.accuracy_ci: bounds memory at 100 x n indices, same resamples
    )
    return {
        "ece": point,
        "ece_ci_low": float(res.confidence_interval.low),
        "ece_ci_high": float(res.confidence_interval.high),
    }


def brier(proba: np.ndarray, y: np.ndarray) -> float:
    """Multi-class Brier score: mean over images of sum over classes of (p_c - [y = c])^2, in [0, 2].

    The same definition for every k, so for k = 2 it is twice sklearn's binary `brier_score_loss` (which scores only
    the positive column). A one-hot correct prediction scores 0, the uniform 1/k prediction (k - 1) / k.
    """
    proba, y = _checked(proba, y)
    if not len(y):
        return float("nan")
    onehot = np.eye(proba.shape[1])[y]
    return float(((proba - onehot) ** 2).sum(axis=1).mean())


def calibration_metrics(proba: np.ndarray, y: np.ndarray, *, prefix: str = "", seed: int = 0) -> dict:
    """Flat {prefix + ece, ece_ci_low, ece_ci_high, brier} for mlflow.log_metrics; the prefix is used verbatim
    (pass "test." for "test.ece")."""
    out = {**ece_ci(proba, y, seed=seed), "brier": brier(proba, y)}
    return {f"{prefix}{k}": v for k, v in out.items()}


def _reliability(conf: np.ndarray, correct: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-empty bin: mean confidence, accuracy, image count."""
    idx = _bin_index(conf, bins)
    count = np.bincount(idx, minlength=bins)
    keep = count > 0
    mean_conf = np.bincount(idx, weights=conf, minlength=bins)[keep] / count[keep]
    acc = np.bincount(idx, weights=correct, minlength=bins)[keep] / count[keep]
    return mean_conf, acc, count[keep]


def reliability_figure(curves: dict[str, np.ndarray], y: np.ndarray, *, bins: int = 10, title: str = ""):
    """Reliability diagram: per-bin top-label confidence against accuracy, one line per named probability array
    (e.g. {"before": p, "after": p_T}), the diagonal, and below it each curve's confidence histogram (images per bin).

    Returns the matplotlib Figure (5 x 4 inches); the caller saves and closes it.
    """
    _check_bins(bins)
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(5, 4), sharex=True, gridspec_kw={"height_ratios": [3, 1], "hspace": 0.08}
    )
    top.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="perfectly calibrated")
    edges = np.linspace(0, 1, bins + 1)
    for name, proba in curves.items():
        proba, labels = _checked(proba, y)
        conf, correct = _top_label(proba, labels)
        mean_conf, acc, _ = _reliability(conf, correct, bins)
        (line,) = top.plot(mean_conf, acc, marker="o", ms=4, label=f"{name} (ECE {ece(proba, labels, bins=bins):.3f})")
        bottom.hist(conf, bins=edges, histtype="step", color=line.get_color(), lw=1.2)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.02)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize=8, frameon=False)
    if title:
        top.set_title(title, fontsize=10)
    bottom.set_xlabel("top-label confidence")
    bottom.set_ylabel("images", fontsize=8)
    bottom.tick_params(labelsize=8)
    fig.subplots_adjust(left=0.13, right=0.97, top=0.92 if title else 0.97, bottom=0.12)
    return fig
