"""Fine-tuning stage of a search: a second Keras Tuner search (the hypermodel of `harness.training.finetune`) from the
head search's final heads, with the same folds and objective, so "0 epochs of fine-tuning" is the bar: a fine-tuned
final model replaces the head-only one only when its objective beats the head-only model's on the same validation
images — by more than one standard error of its fold mean under the default `accept: one_se` (`acceptance_bar`).
"""

from __future__ import annotations

import logging
import time

import keras
import keras_tuner as kt
import mlflow
import numpy as np

from harness.features.prepared import Prepared
from harness.recipe import FinetuneSearch, TrainingConfig
from harness.stages.finalize import FinalModel
from harness.tracking import schema
from harness.training.finetune import FinetuneHyperModel
from harness.training.fit import (
    Fold,
    evaluate_on,
)
from harness.training.search import Best, best_of, make_tuner, run_search

log = logging.getLogger(__name__)


def acceptance_bar(start: float, best: Best, folds: int, objective: kt.Objective, rule: str) -> float:
    """The objective the stage's best trial must beat to replace the head-only model, whose objective is `start`.

    one_se: the head's objective moved by one standard error of the best trial's fold mean (sample standard deviation
    of its K fold values over sqrt(K); `best.std` is their population deviation). The best of several trials on the
    folds the head was chosen on looks better than it is; a gain within its own noise is not taken."""
    se = best.std / np.sqrt(folds - 1) if rule == "one_se" and folds > 1 else 0.0
    return start - se if objective.direction == "min" else start + se


def start_objective(prep: Prepared, final: FinalModel, objective: str) -> float:
    """The head-only final model's objective on its members' validation images: the bar fine-tuning must beat."""
    return float(
        np.mean([evaluate_on(prep, m, final.pooling, f.val)[objective] for m, f in zip(final.members, final.folds)])
    )


def finetune_stage(
    prep: Prepared,
    final: FinalModel,
    cfg: FinetuneSearch,
    tcfg: TrainingConfig,
    folds: list[Fold],
    parent_run_id: str | None,
    project_dir,
    resume: bool,
    prefix: str = schema.FINETUNE_PREFIX,
) -> tuple[FinalModel, str, dict]:
    """Search fine-tuning from `final`'s heads; return (the final model, "finetune" or "head", the chosen stage-2
    hyperparameters with their objective, empty when head-only stays). Its figures go to the active run under
    `prefix`, a dot at its end (the nested estimate runs one stage per outer fold in one run); `parent_run_id`
    None: trials untracked."""
    space = prep.recipe.search
    objective = space.objective
    start = start_objective(prep, final, objective)
    hm = FinetuneHyperModel(prep, cfg, tcfg, final.heads)
    deadline = time.monotonic() + cfg.time_budget_minutes * 60
    tuner = make_tuner(
        hm,
        space,
        project_dir.with_name(project_dir.name + "-finetune"),
        parent_run_id=parent_run_id,
        resume=resume,
        epochs=cfg.epochs,
        max_trials=cfg.max_trials,
        folds=folds,
        deadline=deadline,
        tuner="random" if space.tuner == "hyperband" else space.tuner,
    )
    log.info(
        "Fine-tuning %s: up to %d trials or %.0f min, from the head-only %s %.4f",
        prep.mcfg.key,
        cfg.max_trials,
        cfg.time_budget_minutes,
        objective,
        start,
    )
    run_search(tuner)
    found = best_of(tuner, prep.mcfg.key)
    best, score, epoch = found.values, found.score, found.epoch
    # the bar and the comparison both take their direction from the objective the tuner ranked the trials by
    bar = acceptance_bar(start, found, len(folds), tuner.oracle.objective, cfg.accept)
    better = tuner.oracle.objective.better_than(score, bar)
    mlflow.log_metrics(
        {
            f"{prefix}start_{objective}": start,
            f"{prefix}best_{objective}": score,
            f"{prefix}bar_{objective}": bar,
            f"{prefix}trials": len(tuner.oracle.trials),
        }
    )
    mlflow.set_tag(f"{prefix}chosen", str(better).lower())  # FINETUNE_CHOSEN by default
    if not better:
        log.info(
            "Fine-tuning did not beat the head-only model's %.4f by the %s rule (best %.4f, bar %.4f): the final "
            "model stays head-only",
            start,
            cfg.accept,
            score,
            bar,
        )
        return final, "head", {}
    best = hm.complete(best)
    return (
        refit(hm, best, final, cfg.epochs if final.mode == "single" else epoch + 1, objective),
        "finetune",
        {
            **best,
            "objective": score,
        },
    )


def refit(hm: FinetuneHyperModel, best: dict, final: FinalModel, epochs: int, objective: str) -> FinalModel:
    """The chosen fine-tuning trial refitted on the final model's own folds (every fold member from its head)."""
    seed = hm.prep.recipe.search.seed
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    members = [hm.member(best, k) for k in range(len(final.members))]
    single = final.mode == "single"
    results = hm.fit_members(
        best, members, final.folds, epochs, seed, objective if single else None, single, search=False
    )
    return FinalModel(
        [m.model for m in members],
        [m.head for m in members],
        [m.backbone for m in members],
        final.folds,
        results,
        final.mode,
        final.pooling,
        on_images=True,
        augment=float(best["ft_augment"]),
    )
