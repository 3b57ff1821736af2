"""A final model's calibration and operating point, part of the final-model stage: both fitted on its out-of-fold
validation predictions (the `val` rows: every train+validation image predicted by the fold member that did not train
on it, or the validation split of a single model), never on the test split, and both carried into the logged model's
`model_config`, so `harness predict`, `mlflow models serve` and a Python client make the same call.

Test predictions are the ones the stage already made (the test split is read once per final model); this module only
transforms and scores them.
"""

from __future__ import annotations

import logging

import mlflow
import numpy as np

from harness.evaluation.calibration import T_BOUNDS, apply_temperature, calibration_metrics, fit_temperature
from harness.evaluation.clinical import operating_metrics, threshold_for_sensitivity
from harness.evaluation.metrics import log_split_metrics, prediction_rows
from harness.features.prepared import Prepared
from harness.tracking import schema

log = logging.getLogger(__name__)
# Fewer out-of-fold images than this and no temperature is fitted (T = 1): one scalar from a handful of images
# would move the probabilities on noise.
MIN_CALIBRATION_IMAGES = 20


def calibrate(
    prep: Prepared, val_idx: np.ndarray, val_proba: np.ndarray, test_idx: np.ndarray, test_proba: np.ndarray | None
) -> tuple[list[dict], dict]:
    """Fit, log and apply the temperature and the operating point. Returns the prediction rows of the calibrated
    splits and the `model_config` entries the logged model applies (`temperature`, `operating_point`)."""
    t, ev, seed = prep.task, prep.recipe.evaluation, prep.recipe.data.seed
    y_val = t.y[val_idx]
    temperature = fitted_temperature(prep, val_proba, y_val) if ev.calibrate else 1.0
    mlflow.log_metric(schema.TEMPERATURE, temperature)
    scored = {"val": (val_idx, val_proba)}
    if test_proba is not None and len(test_idx):
        scored["test"] = (test_idx, test_proba)
    rows, served = [], {}
    for split, (idx, proba) in list(scored.items()):
        mlflow.log_metrics(calibration_metrics(proba, t.y[idx], prefix=f"{split}.", seed=seed))
        if ev.calibrate:
            cal = apply_temperature(proba, temperature)
            name = f"{split}{schema.CALIBRATED}"
            log_split_metrics(prep, name, idx, cal, seed)
            mlflow.log_metrics(calibration_metrics(cal, t.y[idx], prefix=f"{name}.", seed=seed))
            rows += prediction_rows(t, idx, cal, name)
            scored[split] = (idx, cal)
    if ev.calibrate:
        served["temperature"] = temperature
    op = operating_point(prep, scored)
    if op is not None:
        served["operating_point"] = op
    return rows, served


def fitted_temperature(prep: Prepared, proba: np.ndarray, y: np.ndarray) -> float:
    """The temperature of the out-of-fold predictions, or 1 (said in the log and a tag) where none is defined: too
    few images, or no image wrong — then the log loss falls without end as T shrinks, and a fit would run to its bound
    and turn every probability into 0 or 1."""
    why = None
    if len(y) < MIN_CALIBRATION_IMAGES:
        why = f"{len(y)} out-of-fold images (fewer than {MIN_CALIBRATION_IMAGES})"
    elif (proba.argmax(axis=1) == y).all():
        why = f"all {len(y)} out-of-fold predictions right: no temperature is defined"
    else:
        t = fit_temperature(proba, y)
        if not T_BOUNDS[0] * 1.1 < t < T_BOUNDS[1] / 1.1:  # the bounded search stops near, not at, the bound
            why = f"the fit ran to its bound ({t:.3g})"
        else:
            log.info("%s: temperature %.3f (fitted on %d out-of-fold images)", prep.mcfg.key, t, len(y))
            return t
    log.warning("%s: no temperature fitted (T = 1): %s", prep.mcfg.key, why)
    mlflow.set_tag(f"{schema.TEMPERATURE}.skipped", why)
    return 1.0


def operating_point(prep: Prepared, scored: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict | None:
    """The recipe's operating point on this task's (calibrated) probabilities: the threshold from the out-of-fold
    `val` predictions, its figures there and on the test split (exact CIs). None when none is asked, or the task
    lacks the class, or no out-of-fold image is of it (said in the log and a tag)."""
    want, t = prep.recipe.evaluation.operating_point, prep.task
    if want is None:
        return None
    if want.class_ not in t.classes:
        log.info("%s: no operating point: class %r is not one of %s", prep.mcfg.key, want.class_, t.classes)
        return None
    k = t.classes.index(want.class_)
    val_idx, val_p = scored["val"]
    positive = t.y[val_idx] == k
    if not positive.any():
        log.warning("%s: no operating point: no out-of-fold image of class %r", prep.mcfg.key, want.class_)
        mlflow.set_tag(f"{schema.OP}skipped", f"no out-of-fold image of class {want.class_}")
        return None
    threshold = threshold_for_sensitivity(val_p[:, k], positive, want.sensitivity)
    mlflow.set_tag(schema.OP_CLASS, want.class_)
    mlflow.log_metrics({f"{schema.OP}threshold": threshold, f"{schema.OP}target_sensitivity": want.sensitivity})
    for split, (idx, proba) in scored.items():
        figures = operating_metrics(proba[:, k], t.y[idx] == k, threshold)
        mlflow.log_metrics(
            {f"{schema.OP}{split}.{m}": float(v) for m, v in figures.items() if m != "threshold" and np.isfinite(v)}
        )
    log.info(
        "%s: operating point P(%s) >= %.4f (sensitivity %.2f out of fold)",
        prep.mcfg.key,
        want.class_,
        threshold,
        want.sensitivity,
    )
    return {"class": want.class_, "threshold": float(threshold), "sensitivity": want.sensitivity}
