"""Final model: fit a head (the recipe's, or the best a search found), fine-tune it when the model asks for it, then
evaluate it once on validation and test, log predictions, embeddings and the full model, and register it.
Shared by `harness train` and the search's refit, so both produce the same run.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import keras
import mlflow
import numpy as np

from harness import tracking
from harness.evaluate import as_proba, confusion_figure, metrics, prediction_rows
from harness.features import extract
from harness.fit import fit_on, make_optimizer, predict
from harness.models.backbones import SPECS
from harness.models.heads import penultimate
from harness.prepared import Prepared, full_model
from harness.recipe import HeadConfig, TrainingConfig


def registered_name(prep: Prepared) -> str:
    """`<study>-<model key>`: the key is unique within a recipe (task-backbone unless the model is named)."""
    return f"{prep.recipe.study}-{prep.mcfg.key}"


def head_inputs(prep: Prepared, pooling: str) -> np.ndarray:
    """What the head sees for every image of the task: cached features, or the backbone's output on the images."""
    if prep.on_features:
        return prep.take(np.arange(len(prep.task.y)), pooling)[0]
    maps = extract(prep.backbone, SPECS[prep.mcfg.backbone].preprocess, prep.task.x, label="Embedding images")
    return maps.mean(axis=(1, 2)) if len(prep.head_input_shape(pooling)) == 1 else maps


def finish(
    prep: Prepared, model_fit: keras.Model, head: keras.Model, pooling: str, register_as: str | None = None
) -> dict:
    """Evaluate once on val and test, log figures, predictions, embeddings and the full model (once)."""
    t, out = prep.task, {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = []
        for split in ("val", "test"):
            idx = t.splits[split]
            if not len(idx):
                continue
            x, _ = prep.take(idx, pooling)
            proba = as_proba(predict(model_fit, x), prep.n_classes)
            m = metrics(t.y[idx], proba, t.classes, seed=prep.recipe.data.seed)
            out[split] = m
            mlflow.log_metrics({f"{split}.{k}": v for k, v in m.items() if np.isfinite(v)})
            if split == "test":
                confusion_figure(
                    t.y[idx],
                    proba.argmax(axis=1),
                    t.classes,
                    f"{prep.mcfg.key} — test (n={len(idx)})",
                    tmp / "confusion_test.png",
                )
                mlflow.log_artifact(str(tmp / "confusion_test.png"))
            rows += prediction_rows(t, idx, proba, split)
        mlflow.log_text(json.dumps(rows, indent=0), "predictions.json")
        t1 = time.perf_counter()
        # Penultimate-layer features of every image, for the report's t-SNE.
        emb = predict(penultimate(head), head_inputs(prep, pooling))
        split_of = np.empty(len(t.y), dtype=object)
        for s, idx in t.splits.items():
            split_of[idx] = s
        np.savez_compressed(
            tmp / "embeddings.npz",
            embedding=emb.astype(np.float32),
            y=t.y,
            split=split_of.astype(str),
            mode=np.array(t.modes),
            classes=np.array(t.classes),
        )
        mlflow.log_artifact(str(tmp / "embeddings.npz"))
    t2 = time.perf_counter()
    log_full_model(prep, full_model(prep, head), register_as)
    mlflow.log_metrics(
        {"evaluate_seconds": t1 - t0, "embed_seconds": t2 - t1, "log_model_seconds": time.perf_counter() - t2}
    )
    return out


def log_full_model(prep: Prepared, model: keras.Model, register_as: str | None) -> None:
    import tensorflow as tf
    from mlflow.models import infer_signature

    sample = prep.task.x[:2].astype("float32")
    signature = infer_signature(sample, np.asarray(model(sample, training=False)))
    mlflow.keras.log_model(
        model,
        name="model",
        signature=signature,
        registered_model_name=register_as,
        pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"],
    )


def fit_and_finish(
    prep: Prepared,
    head_cfg: HeadConfig,
    learning_rate: float,
    tcfg: TrainingConfig,
    seed: int,
    restore_best: str | None = None,
    register_as: str | None = None,
) -> dict:
    """Inside an active run: fit, fine-tune when the model asks for it, evaluate once, log and (optionally) register."""
    model, head = prep.build(head_cfg)
    splits = prep.task.splits
    with tracking.EpochProgress(tcfg.epochs, prep.mcfg.key) as progress:
        result = fit_on(
            prep,
            model,
            head_cfg.pooling,
            splits["train"],
            splits["val"],
            tcfg.epochs,
            tcfg.batch_size,
            make_optimizer(tcfg.optimizer, learning_rate),
            seed,
            monitor=restore_best,
            restore_best=restore_best is not None,
            on_epoch=progress,
        )
    tracking.log_fit(result)
    mlflow.set_tag("fit.jit", str(result.jit).lower())
    if result.best_epoch is not None:
        mlflow.log_metric("best_epoch", result.best_epoch)
    if prep.mcfg.finetune is not None:
        from harness.finetune import finetune

        prep, model = finetune(prep, head, prep.mcfg.finetune, tcfg, seed)
    return finish(prep, model, head, head_cfg.pooling, register_as=register_as)
