"""`harness train`: one configuration of a recipe (its head and training settings, no search) as one MLflow run."""

from __future__ import annotations

import time

import keras
import mlflow

from harness.features.prepared import prepare
from harness.recipe import Recipe
from harness.stages.finalize import fit_and_finish
from harness.tracking import runs as tracking
from harness.tracking import schema


def train(recipe: Recipe, model_key: str | None = None) -> str:
    """Train one configuration as one MLflow run; returns its run id."""
    mcfg = recipe.model(model_key)
    tracking.setup(recipe.study)
    prep = prepare(recipe, mcfg)  # data and weights problems surface here, before any run exists
    head_cfg, tcfg = recipe.head_for(mcfg), recipe.training_for(mcfg)
    with tracking.run(f"train {mcfg.key}", tags={schema.KIND: schema.TRAIN}) as active:
        tracking.log_context(prep)
        mlflow.log_params(tracking.model_params(prep, head_cfg, tcfg))
        t0 = time.perf_counter()
        keras.utils.set_random_seed(recipe.data.seed)
        fit_and_finish(prep, head_cfg, tcfg.learning_rate, tcfg, seed=recipe.data.seed)
        mlflow.log_metric("total_seconds", time.perf_counter() - t0 + prep.info["prepare_seconds"])
    return active.info.run_id
