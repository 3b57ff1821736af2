"""Evaluation: metrics with confidence intervals, McNemar's exact test, and confusion-matrix figures.

Accuracy gets a 95% percentile bootstrap CI (scipy.stats.bootstrap) and, because a bootstrap of a perfect score is the
degenerate [1, 1], also the exact Clopper-Pearson interval: on 36 test images one image is 2.8 points.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
from scipy import stats  # noqa: E402
from sklearn.metrics import confusion_matrix, f1_score, log_loss, precision_recall_fscore_support, roc_auc_score  # noqa: E402


def as_proba(raw: np.ndarray, n_classes: int) -> np.ndarray:
    """Model output -> (N, n_classes) probabilities (a sigmoid's single column becomes two)."""
    raw = np.asarray(raw, dtype=np.float64)
    if n_classes == 2 and (raw.ndim == 1 or raw.shape[1] == 1):
        p1 = raw.reshape(-1)
        return np.stack([1 - p1, p1], axis=1)
    return raw / raw.sum(axis=1, keepdims=True)  # float32 softmax rows sum to 1 only within ~1e-7


def accuracy_ci(correct: np.ndarray, seed: int = 0) -> dict:
    n, k = len(correct), int(correct.sum())
    cp = stats.binomtest(k, n).proportion_ci(0.95, method="exact") if n else None
    if n >= 2 and 0 < k < n:
        res = stats.bootstrap(
            (correct.astype(float),),
            np.mean,
            confidence_level=0.95,
            n_resamples=2000,
            method="percentile",
            random_state=seed,
            # In batches of 100 resamples: all 2000 at once held 2000 x n indices and values (410 MB at 12,800
            # images); batching draws the same resamples, so the interval is unchanged.
            batch=100,
        )
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    else:
        lo = hi = float(k / n) if n else float("nan")
    return {
        "accuracy": k / n if n else float("nan"),
        "accuracy_ci_low": lo,
        "accuracy_ci_high": hi,
        "accuracy_cp_low": float(cp.low) if cp else float("nan"),
        "accuracy_cp_high": float(cp.high) if cp else float("nan"),
        "n": n,
    }


def metrics(y_true: np.ndarray, proba: np.ndarray, classes: list[str], seed: int = 0) -> dict:
    """Accuracy (+CIs), macro F1, per-class precision/recall, ROC AUC (one-vs-rest), log loss."""
    y_pred = proba.argmax(axis=1)
    out = accuracy_ci(y_pred == y_true, seed)
    labels = list(range(len(classes)))
    out["macro_f1"] = float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))
    p, r, _, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    for i, c in enumerate(classes):
        out[f"precision.{c}"], out[f"recall.{c}"] = float(p[i]), float(r[i])
    present = np.unique(y_true)
    try:
        if len(classes) == 2:
            out["roc_auc"] = float(roc_auc_score(y_true, proba[:, 1])) if len(present) == 2 else float("nan")
        else:
            out["roc_auc"] = float(roc_auc_score(y_true, proba, multi_class="ovr", labels=labels))
    except ValueError:  # a class absent from a tiny test split
        out["roc_auc"] = float("nan")
    out["loss"] = float(log_loss(y_true, proba, labels=labels))
    return out


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """Exact McNemar test on the discordant pairs of two classifiers scored on the same images."""
    b = int((correct_a & ~correct_b).sum())  # A right, B wrong
    c = int((~correct_a & correct_b).sum())
    p = float(stats.binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0
    return {
        "both_right": int((correct_a & correct_b).sum()),
        "a_only": b,
        "b_only": c,
        "both_wrong": int((~correct_a & ~correct_b).sum()),
        "p_value": p,
    }


PREDICTIONS = "predictions.csv.gz"  # per-image predictions: a compressed table, readable at tens of thousands of rows


def log_predictions(rows: list[dict], name: str = PREDICTIONS) -> None:
    """The rows as a gzip-compressed CSV artifact of the active run."""
    import tempfile

    import mlflow
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        pd.DataFrame(rows).to_csv(path, index=False, compression="gzip")
        mlflow.log_artifact(str(path))


def read_predictions(client, run_id: str, folder: str, name: str = PREDICTIONS) -> list[dict]:
    import pandas as pd

    local = client.download_artifacts(run_id, name, folder)
    table = pd.read_csv(local, compression="gzip", keep_default_na=False)
    return table.to_dict(orient="records")


def prediction_rows(task, idx: np.ndarray, proba: np.ndarray, split: str) -> list[dict]:
    """Per-image predictions as logged (`predictions.csv.gz`) and read back by the report: file, split, true and
    predicted class, the original colour mode and one probability column per class."""
    pred = proba.argmax(axis=1)
    return [
        {
            "file": str(task.files[i]),
            "split": split,
            "true": task.classes[task.y[i]],
            "pred": task.classes[pred[j]],
            "mode": task.modes[i],
            **{f"p.{c}": round(float(proba[j, k]), 6) for k, c in enumerate(task.classes)},
        }
        for j, i in enumerate(idx)
    ]


def confusion_figure(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], title: str, path: Path) -> Path:
    labels = list(range(len(classes)))
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.nan_to_num(cm / cm.sum(axis=1, keepdims=True))
    fig, axes = plt.subplots(1, 2, figsize=(4 + 2.2 * len(classes), 1.5 + 1.1 * len(classes)))
    for ax, data, fmt, sub in ((axes[0], cm, "d", "counts"), (axes[1], norm, ".2f", "row-normalised (recall)")):
        sns.heatmap(
            data,
            annot=True,
            fmt=fmt,
            cmap="Blues",
            cbar=False,
            ax=ax,
            xticklabels=classes,
            yticklabels=classes,
            vmin=0,
            square=True,
        )
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(sub)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_split_metrics(prep, name: str, idx: np.ndarray, proba: np.ndarray, seed: int) -> dict:
    """The metric set of one split's probabilities, logged to the active run as `<name>.<metric>`."""
    import mlflow

    m = metrics(prep.task.y[idx], proba, prep.task.classes, seed=seed)
    mlflow.log_metrics({f"{name}.{k}": v for k, v in m.items() if np.isfinite(v)})
    return m
