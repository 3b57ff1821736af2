"""The floor every tuned head must beat: logistic regression on globally pooled features of the same frozen
backbone, fitted on train+validation and scored once on the same test images as the tuned model (so the report can
pair them with McNemar), plus its 5-fold cross-validated accuracy on train+validation (the floor's own protocol,
with the same patient grouping as every other split)."""

from __future__ import annotations

import mlflow
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from harness.data.splits import cv_folds
from harness.evaluation.metrics import log_predictions, metrics, prediction_rows
from harness.features.prepared import Prepared
from harness.tracking import runs as tracking
from harness.tracking import schema


class ChunkedScaler(StandardScaler):
    """StandardScaler fitted over row chunks with `partial_fit`: the same float64 running mean and variance, without
    the float64 temporaries of the whole matrix that `fit` makes (~200 MB at 12,800 images x 1,280 features, the
    largest allocation of a real-size study; the floor's memory now stays flat as the data grows)."""

    CHUNK = 1024

    def fit(self, X, y=None, sample_weight=None):
        for fitted in ("n_samples_seen_", "mean_", "var_", "scale_"):  # a refit starts again, as fit() would
            self.__dict__.pop(fitted, None)
        for s in range(0, len(X), self.CHUNK):
            w = None if sample_weight is None else sample_weight[s : s + self.CHUNK]
            self.partial_fit(X[s : s + self.CHUNK], sample_weight=w)
        return self


def floor_model():
    """Scaling in place (`copy=False`) of the rows sklearn's indexing has already copied (`x[idx]`, and every CV
    fold): one copy of the data less; the task's pooled vectors themselves are read-only, so sklearn copies them
    rather than scale them if they are ever passed whole."""
    return make_pipeline(ChunkedScaler(copy=False), LogisticRegression(max_iter=3000))


def baseline(prep: Prepared, parent_run_id: str) -> dict:
    t, seed = prep.task, prep.recipe.data.seed
    x = prep.pooled
    fit_idx = t.pool()
    test_idx = t.splits["test"]
    model = floor_model()
    folds = cv_folds(fit_idx, t.y, t.groups, 5, seed)
    cv = cross_val_score(model, x, t.y, cv=[(tr, va) for tr, va in folds])
    model.fit(x[fit_idx], t.y[fit_idx])
    out = {"cv_accuracy": float(cv.mean()), "cv_accuracy_std": float(cv.std()), "cv_folds": len(folds)}
    with tracking.run(
        f"baseline {prep.mcfg.key}",
        nested=True,
        tags={
            schema.KIND: schema.BASELINE,
            schema.PARENT: parent_run_id,
            **tracking.model_tags(prep.recipe, prep.mcfg),
            "baseline": "StandardScaler + LogisticRegression on average-pooled backbone features",
        },
    ):
        mlflow.log_metrics(out)
        rows = []
        if len(test_idx):
            proba = model.predict_proba(x[test_idx])
            m = metrics(t.y[test_idx], proba, t.classes, seed=seed)
            out["test"] = m
            mlflow.log_metrics({f"{schema.TEST}{k}": v for k, v in m.items() if np.isfinite(v)})
            rows = prediction_rows(t, test_idx, proba, "test")
        log_predictions(rows)
    return out
