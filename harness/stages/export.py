"""Export, part of the final-model stage: the final Keras model exported to ONNX, checked against Keras on the test
images (parity above 1e-4 fails the stage), logged beside it as the pyfunc `onnx` with the same calibration and
decision, optionally quantized to INT8 and scored, and its serving cost measured on this machine (`cost.*`)."""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import mlflow
import numpy as np

from harness.evaluation.metrics import as_proba, log_split_metrics, prediction_rows
from harness.features.prepared import Prepared
from harness.serving import onnx as ox
from harness.serving.flavor import log_onnx
from harness.tracking import schema

log = logging.getLogger(__name__)


def export_final(prep: Prepared, model: keras.Model, test: np.ndarray, config: dict, tmp: Path) -> list[dict]:
    """Export, check, log and time the final model; `config`: the model_config entries the Keras model is logged with
    (study, key, backbone, temperature, operating point). Returns the INT8 variant's test prediction rows (if asked)."""
    cfg, t, size = prep.recipe.export, prep.task, prep.image_size
    if not cfg.onnx:
        return []
    path = ox.export(model, size, tmp / "model.onnx")
    # the test images the stage already read (their pixels from the decode cache), else random ones of its size
    images = t.images(test).astype("float32") if len(test) else ox.random_images(size, 8)
    diff = ox.parity(model, ox.session(path), images)
    mlflow.log_metric(schema.ONNX_PARITY, diff)
    ox.check_parity(diff, path)
    log_onnx(path, t.classes, size, prep.colour, **config)
    rows, int8 = [], None
    if cfg.int8:
        int8 = ox.quantize_int8(path, tmp / "model.int8.onnx")
        if len(test):
            proba = as_proba(ox.run(ox.session(int8), images), prep.n_classes)
            name = f"test{schema.INT8}"
            log_split_metrics(prep, name, test, proba, prep.recipe.data.seed)
            rows = prediction_rows(t, test, proba, name)
    keras_file = tmp / "model.keras"
    model.save(keras_file)
    cost = ox.serving_cost(model, path, size, keras_path=keras_file, int8_path=int8, repeats=cfg.latency_repeats)
    mlflow.log_metrics(cost)
    log.info(
        "%s: ONNX parity %.1e; batch-1 median %.1f ms ONNX Runtime, %.1f ms Keras",
        prep.mcfg.key,
        diff,
        cost.get(f"{schema.COST}onnx.b1.median_ms", float("nan")),
        cost.get(f"{schema.COST}keras.b1.median_ms", float("nan")),
    )
    return rows
