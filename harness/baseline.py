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

from harness import tracking
from harness.data.splits import cv_folds
from harness.evaluate import log_predictions, metrics, prediction_rows
from harness.prepared import Prepared


def floor_model():
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))


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
            "harness.kind": "baseline",
            "mlflow.parentRunId": parent_run_id,
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
            mlflow.log_metrics({f"test.{k}": v for k, v in m.items() if np.isfinite(v)})
            rows = prediction_rows(t, test_idx, proba, "test")
        log_predictions(rows)
    return out
