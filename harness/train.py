"""Training stage: prepare a recipe model (data, backbone, cached features), fit a head, evaluate once on the test
split and log everything to MLflow. `train()` runs one configuration; the tuner's final refit uses the same pieces.
"""
from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import keras
import mlflow
import numpy as np
import yaml

from harness import tracking
from harness.data import TaskData, prepare_task
from harness.evaluate import as_proba, confusion_figure, metrics
from harness.features import extract, features_for
from harness.models import assemble, build_backbone, build_head, compile_model
from harness.models.backbones import SPECS, WeightsInfo
from harness.models.heads import penultimate
from harness.recipe import HeadConfig, ModelConfig, Recipe, TrainingConfig


@dataclass
class Prepared:
    """Everything a fit needs that does not depend on the head's hyperparameters."""
    recipe: Recipe
    mcfg: ModelConfig
    task: TaskData
    backbone: keras.Model
    weights: WeightsInfo
    feats: Optional[np.ndarray]  # cached backbone outputs (frozen backbone) or None (fine-tuned: images go through)
    info: dict

    @property
    def n_classes(self) -> int:
        return len(self.task.classes)

    @property
    def feature_shape(self) -> tuple:
        return tuple(self.backbone.output.shape[1:])

    def inputs(self, split: str):
        idx = self.task.splits[split]
        x = self.feats[idx] if self.feats is not None else self.task.x[idx]
        y = self.task.y[idx]
        return x, (y.astype("float32") if self.n_classes == 2 else y)


def prepare(recipe: Recipe, mcfg: ModelConfig, task: Optional[TaskData] = None) -> Prepared:
    t0 = time.perf_counter()
    task = task or prepare_task(recipe, mcfg.task)
    t1 = time.perf_counter()
    backbone, winfo = build_backbone(mcfg.backbone, mcfg.weights, recipe.data.image_size)
    if mcfg.trainable or recipe.training_for(mcfg).augment:
        why = "trainable backbone" if mcfg.trainable else "augmentation"
        feats, info = None, {"feature_cache": f"bypassed ({why})", "extract_seconds": 0.0}
    else:
        feats, info = features_for(task, mcfg.backbone, backbone, winfo, recipe.data.image_size, recipe.data.colour)
    info.update(data_seconds=t1 - t0, prepare_seconds=time.perf_counter() - t0)
    return Prepared(recipe, mcfg, task, backbone, winfo, feats, info)


def build(prep: Prepared, head_cfg: HeadConfig, learning_rate: float) -> tuple[keras.Model, keras.Model]:
    """(model to fit, head): the head alone on cached features, or backbone + head on images when trainable."""
    head = build_head(prep.feature_shape, prep.n_classes, head_cfg.units, head_cfg.dropout, head_cfg.pooling)
    model = head if prep.feats is not None else full_model(prep, head)
    return compile_model(model, prep.n_classes, learning_rate), head


def full_model(prep: Prepared, head: keras.Model) -> keras.Model:
    return assemble(prep.backbone, head, SPECS[prep.mcfg.backbone].preprocess, prep.recipe.data.image_size,
                    trainable_backbone=prep.mcfg.trainable, augment=prep.recipe.training_for(prep.mcfg).augment)


def fit(model: keras.Model, prep: Prepared, epochs: int, batch_size: int, callbacks=(), initial_epoch: int = 0,
        restore_best: Optional[str] = None):
    x, y = prep.inputs("train")
    xv, yv = prep.inputs("val")
    cbs = list(callbacks)
    if restore_best:
        # Patience = all epochs: never stops early, only rolls back to the best validation epoch at the end.
        cbs.append(keras.callbacks.EarlyStopping(monitor=restore_best, patience=epochs, restore_best_weights=True,
                                                 mode="min" if restore_best.endswith("loss") else "max"))
    return model.fit(x, y, validation_data=(xv, yv) if len(xv) else None, epochs=epochs, initial_epoch=initial_epoch,
                     batch_size=batch_size, shuffle=True, verbose=0, callbacks=cbs)


def model_params(prep: Prepared, head_cfg: HeadConfig, tcfg: TrainingConfig) -> dict[str, str]:
    r, m = prep.recipe, prep.mcfg
    return tracking.flatten({
        "data": r.data.model_dump(mode="json"), "task": {"name": m.task, **r.tasks[m.task].model_dump(mode="json")},
        "model": m.model_dump(mode="json", exclude={"head", "training"}), "head": head_cfg.model_dump(mode="json"),
        "training": tcfg.model_dump(mode="json")})


def log_context(prep: Prepared) -> None:
    """Resolved recipe (artifact), data summary and duplicates, device and weights tags, feature-cache info."""
    t = prep.task
    mlflow.set_tags({**tracking.device_tags(), **prep.weights.tags(), "task": prep.mcfg.task,
                     "backbone": prep.mcfg.backbone, "model_key": prep.mcfg.key, "study": prep.recipe.study,
                     "test_source": t.test_source, "feature_cache": prep.info["feature_cache"]})
    mlflow.log_text(yaml.safe_dump(prep.recipe.resolved(), sort_keys=False), "recipe.yaml")
    summary = {"classes": t.classes, "counts": t.counts(), "test_source": t.test_source,
               "train_root": str(t.train_root), "skipped": t.skipped, "duplicates": t.duplicates,
               "modes": {c: dict(Counter(m for m, y in zip(t.modes, t.y) if y == k)) for k, c in enumerate(t.classes)}}
    mlflow.log_text(json.dumps(summary, indent=1, default=str), "data.json")
    mlflow.log_metrics({"data_seconds": prep.info["data_seconds"], "extract_seconds": prep.info["extract_seconds"]})


def predict_raw(prep: Prepared, model_fit: keras.Model, split: str) -> np.ndarray:
    x, _ = prep.inputs(split)
    return model_fit.predict(x, batch_size=64, verbose=0) if len(x) else np.zeros((0, prep.n_classes))


def finish(prep: Prepared, model_fit: keras.Model, head: keras.Model, register_as: Optional[str] = None) -> dict:
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
            proba = as_proba(predict_raw(prep, model_fit, split), prep.n_classes)
            m = metrics(t.y[idx], proba, t.classes, seed=prep.recipe.data.seed)
            out[split] = m
            mlflow.log_metrics({f"{split}.{k}": v for k, v in m.items() if np.isfinite(v)})
            pred = proba.argmax(axis=1)
            if split == "test":
                confusion_figure(t.y[idx], pred, t.classes, f"{prep.mcfg.key} — test (n={len(idx)})",
                                 tmp / "confusion_test.png")
                mlflow.log_artifact(str(tmp / "confusion_test.png"))
            for j, i in enumerate(idx):
                rows.append({"file": str(t.files[i]), "split": split, "true": t.classes[t.y[i]],
                             "pred": t.classes[pred[j]], "mode": t.modes[i],
                             **{f"p.{c}": round(float(proba[j, k]), 6) for k, c in enumerate(t.classes)}})
        mlflow.log_text(json.dumps(rows, indent=0), "predictions.json")
        t1 = time.perf_counter()
        # Penultimate-layer features of every image, for the report's t-SNE.
        feats = prep.feats if prep.feats is not None else extract(
            prep.backbone, SPECS[prep.mcfg.backbone].preprocess, t.x, label="Embedding images")
        emb = penultimate(head).predict(feats, batch_size=256, verbose=0)
        split_of = np.empty(len(t.y), dtype=object)
        for s, idx in t.splits.items():
            split_of[idx] = s
        np.savez_compressed(tmp / "embeddings.npz", embedding=emb.astype(np.float32), y=t.y,
                            split=split_of.astype(str), mode=np.array(t.modes), classes=np.array(t.classes))
        mlflow.log_artifact(str(tmp / "embeddings.npz"))
    t2 = time.perf_counter()
    log_full_model(prep, full_model(prep, head), register_as)
    mlflow.log_metrics({"evaluate_seconds": t1 - t0, "embed_seconds": t2 - t1,
                        "log_model_seconds": time.perf_counter() - t2})
    return out


def log_full_model(prep: Prepared, model: keras.Model, register_as: Optional[str]) -> None:
    import tensorflow as tf
    from mlflow.models import infer_signature

    sample = prep.task.x[:2].astype("float32")
    signature = infer_signature(sample, np.asarray(model(sample, training=False)))
    mlflow.keras.log_model(model, name="model", signature=signature, registered_model_name=register_as,
                           pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"])


def fit_and_finish(prep: Prepared, head_cfg: HeadConfig, learning_rate: float, tcfg: TrainingConfig,
                   restore_best: Optional[str] = None, register_as: Optional[str] = None) -> dict:
    """Inside an active run: fit a head (the recipe's, or the best a search found), fine-tune when the model asks
    for it, then evaluate once, log and (optionally) register. Shared by `train` and the search's refit."""
    t0 = time.perf_counter()
    model, head = build(prep, head_cfg, learning_rate)
    logger = tracking.EpochLogger(len(prep.task.splits["train"]))
    fit(model, prep, tcfg.epochs, tcfg.batch_size, [logger, tracking.EpochProgress(tcfg.epochs, prep.mcfg.key)],
        restore_best=restore_best)
    train_s = time.perf_counter() - t0
    mlflow.log_metrics({"train_seconds": train_s, "seconds_per_epoch": float(np.mean(logger.epoch_seconds)),
                        "images_per_s": len(prep.task.splits["train"]) * len(logger.epoch_seconds) / train_s})
    if prep.mcfg.finetune is not None:
        from harness.finetune import finetune

        prep, model = finetune(prep, head, prep.mcfg.finetune, tcfg.batch_size)
    return finish(prep, model, head, register_as=register_as)


def train(recipe: Recipe, model_key: Optional[str] = None) -> str:
    """Train one configuration (the recipe's head and training settings) as one MLflow run; returns its run id."""
    mcfg = recipe.model(model_key)
    tracking.setup(recipe.study)
    prep = prepare(recipe, mcfg)  # data and weights problems surface here, before any run exists
    head_cfg, tcfg = recipe.head_for(mcfg), recipe.training_for(mcfg)
    with tracking.run(f"train {mcfg.key}", tags={"harness.kind": "train"}) as active:
        log_context(prep)
        mlflow.log_params(model_params(prep, head_cfg, tcfg))
        t0 = time.perf_counter()
        fit_and_finish(prep, head_cfg, tcfg.learning_rate, tcfg)
        mlflow.log_metric("total_seconds", time.perf_counter() - t0 + prep.info["prepare_seconds"])
    return active.info.run_id
