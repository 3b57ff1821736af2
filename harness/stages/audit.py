"""Source audit: how far an image's source, rather than its content, explains a task's labels.

In the challenge data every COVID-19 image is an adult publication figure and every other image a paediatric archive
X-ray, so a classifier can score by recognising the source (DeGrave et al., Nature Machine Intelligence 2021). Two
numbers, both cross-validated on train+validation with the study's patient-grouped folds (the test split untouched):
(1) a random forest on the source signature alone (original colour mode, width, height, aspect, file format, bit
depth) predicting the class; (2) logistic regression on the backbone's pooled features predicting the source (the
original colour mode), against the majority share. The report compares (1) with the models' accuracy.
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from harness.data.splits import cv_folds
from harness.evaluation.metrics import accuracy_ci
from harness.features.prepared import Prepared
from harness.tracking import runs as tracking
from harness.tracking import schema

BITS = {
    "1": 1,
    "L": 8,
    "P": 8,
    "LA": 16,
    "I;16": 16,
    "I;16B": 16,
    "I;16L": 16,
    "RGB": 24,
    "YCbCr": 24,
    "RGBA": 32,
    "CMYK": 32,
    "I": 32,
    "F": 32,
}
REACHES = 0.05  # metadata "reaches" a model when its accuracy is within 5 points of the model's


def signature(task) -> tuple[np.ndarray, list[str]]:
    """Per image: one-hot colour mode and file format, log2 width and height, aspect ratio, bits per pixel."""
    modes, formats = sorted(set(task.modes)), sorted(set(task.formats))
    rows = []
    for mode, fmt, (w, h) in zip(task.modes, task.formats, task.sizes):
        rows.append(
            [mode == m for m in modes]
            + [fmt == f for f in formats]
            + [np.log2(max(w, 1)), np.log2(max(h, 1)), w / max(h, 1), BITS.get(mode, 8)]
        )
    names = (
        [f"mode={m}" for m in modes]
        + [f"format={f}" for f in formats]
        + ["log2 width", "log2 height", "aspect", "bits"]
    )
    return np.asarray(rows, dtype=np.float64), names


def audit(prep: Prepared, parent_run_id: str) -> dict:
    t, seed = prep.task, prep.recipe.data.seed
    pool = t.pool()
    # The study's grouped folds, as positions within the pool (sorted), which cross_val_predict partitions.
    folds = [
        (np.searchsorted(pool, tr), np.searchsorted(pool, va)) for tr, va in cv_folds(pool, t.y, t.groups, 5, seed)
    ]
    x, names = signature(t)
    # At most 256 leaves a tree: a handful of metadata columns needs no more, and unbounded trees on 16,000 images
    # held ~280 MB for a moment (200 trees of ~6,000 leaves); on a few hundred images the bound never binds.
    meta = RandomForestClassifier(n_estimators=200, min_samples_leaf=2, max_leaf_nodes=256, random_state=seed)
    pred = cross_val_predict(meta, x[pool], t.y[pool], cv=folds)
    m = accuracy_ci(pred == t.y[pool], seed)
    per_class = {}
    for k, c in enumerate(t.classes):
        truth, said = t.y[pool] == k, pred == k
        per_class[c] = {
            "recall": float((said & truth).sum() / max(1, truth.sum())),
            "precision": float((said & truth).sum() / max(1, said.sum())),
        }
    out = {"meta": m, "meta_per_class": per_class, "signature": names}
    source = np.array(t.modes)
    kinds, counts = np.unique(source[pool], return_counts=True)
    if len(kinds) > 1:
        lr = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
        said = cross_val_predict(lr, prep.pooled[pool], source[pool], cv=folds)
        out["source_from_features"] = accuracy_ci(said == source[pool], seed)
        out["source_majority"] = float(counts.max() / counts.sum())
    with tracking.run(
        f"audit {prep.mcfg.key}",
        nested=True,
        tags={
            schema.KIND: schema.AUDIT,
            schema.PARENT: parent_run_id,
            **tracking.model_tags(prep.recipe, prep.mcfg),
            "audit.signature": ", ".join(names),
        },
    ):
        mlflow.log_metrics({f"audit.meta.{k}": v for k, v in m.items() if np.isfinite(v)})
        mlflow.log_metrics({f"audit.meta.recall.{c}": v["recall"] for c, v in per_class.items()})
        if "source_from_features" in out:
            mlflow.log_metrics(
                {f"audit.source_from_features.{k}": v for k, v in out["source_from_features"].items() if np.isfinite(v)}
            )
            mlflow.log_metric("audit.source_majority", out["source_majority"])
        mlflow.log_text(json.dumps(out, indent=1, default=float), "audit.json")
    return out
