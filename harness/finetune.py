"""Fine-tuning stage, after the head is trained: unfreeze the backbone's top layers, lower learning rate, a few
epochs on images (the feature cache cannot apply), BatchNorm kept frozen and in inference mode — the Keras
transfer-learning guide's recipe. Logged as its own nested run with validation metrics before and after.
"""

from __future__ import annotations

import dataclasses

import keras
import mlflow

from harness import tracking
from harness.fit import fit_on, make_evaluator_for, make_optimizer
from harness.prepared import Prepared, full_model
from harness.recipe import FinetuneConfig, TrainingConfig


def unfreeze_top(backbone: keras.Model, n: int) -> list[str]:
    """Make the last `n` weighted non-BatchNorm layers trainable; return their names."""
    backbone.trainable = True
    weighted = [layer for layer in backbone.layers if layer.weights]
    chosen = [layer for layer in weighted if not isinstance(layer, keras.layers.BatchNormalization)][-n:]
    for layer in backbone.layers:
        layer.trainable = layer in chosen
    return [layer.name for layer in chosen]


def finetune(
    prep: Prepared, head: keras.Model, cfg: FinetuneConfig, tcfg: TrainingConfig, seed: int
) -> tuple[Prepared, keras.Model]:
    images = dataclasses.replace(prep, feats=None)
    model = full_model(images, head)  # assemble() sets backbone.trainable; per-layer flags are set after it
    names = unfreeze_top(prep.backbone, cfg.unfreeze_layers)
    splits = images.task.splits
    with tracking.run(
        f"finetune {prep.mcfg.key}",
        nested=True,
        tags={"harness.kind": "finetune", "feature_cache": "bypassed (fine-tuning)"},
    ):
        mlflow.log_params(
            {
                "finetune.unfreeze_layers": cfg.unfreeze_layers,
                "finetune.learning_rate": cfg.learning_rate,
                "finetune.epochs": cfg.epochs,
                "finetune.first_layer": names[0] if names else "",
            }
        )
        evaluate = make_evaluator_for(model, images.take(splits["val"], "maps"), prep.n_classes)
        before = evaluate() if evaluate else {}
        result = fit_on(
            images,
            model,
            "maps",
            splits["train"],
            splits["val"],
            cfg.epochs,
            tcfg.batch_size,
            make_optimizer(tcfg.optimizer, cfg.learning_rate),
            seed,
        )
        tracking.log_fit(result)
        after = evaluate() if evaluate else {}
        mlflow.log_metrics(
            {**{f"before.{k}": v for k, v in before.items()}, **{f"after.{k}": v for k, v in after.items()}}
        )
    return images, model
