"""A study's models, each through its stages: weights resolved (or the model skipped), the head search, the
fine-tuning search when asked, the final model (fit, one evaluation on the test split, logged and registered as
`<study>-<model key>`), the floor, and the nested estimate when asked. Everything a model does is one MLflow parent
run with nested children: trials, final, baseline, nested-cv.
"""

from __future__ import annotations

import json
import logging
import time

import keras
import mlflow
import numpy as np

from harness import tracking
from harness.baseline import baseline
from harness.errors import HarnessError
from harness.finalize import FinalModel, finish, fit_final, log_final_fit, registered_name
from harness.finetune import finetune_stage
from harness.nested import nested_estimate
from harness.paths import get_paths
from harness.prepared import Prepared, prepare
from harness.recipe import ModelConfig, Recipe
from harness.search import (
    HeadHyperModel,
    best_of,
    head_from_values,
    make_tuner,
    mark_orphans_killed,
    run_search,
    search_folds,
)

log = logging.getLogger(__name__)


def search_model(recipe: Recipe, mcfg: ModelConfig, resume: bool = False, max_trials: int | None = None) -> dict:
    """Search (head, then fine-tuning when asked), fit the final model, evaluate once, log and register; the floor
    and the nested estimate follow. Returns a summary."""
    space, tcfg = recipe.search, recipe.training_for(mcfg)
    max_trials = max_trials or space.max_trials
    tracking.setup(recipe.study)
    prep = prepare(recipe, mcfg)
    project_dir = get_paths().tuner_dir / recipe.study / mcfg.key
    state_file = project_dir.parent / f"{mcfg.key}.parent.json"
    parent_id = None
    if resume and state_file.is_file():
        parent_id = json.loads(state_file.read_text())["run_id"]
        mark_orphans_killed(parent_id)
    elif resume:
        raise HarnessError(f"nothing to resume for {mcfg.key} in study '{recipe.study}' ({state_file} not found)")
    mode = "single" if space.cv_folds == 1 else space.final
    ft_cfg = recipe.finetune_for(mcfg)
    tags = {
        "harness.kind": "search",
        **tracking.model_tags(recipe, mcfg),
        "weights": mcfg.weights,
        "tuner": space.tuner,
        "final.mode": mode,
    }
    t0 = time.perf_counter()
    folds = search_folds(prep, space.cv_folds, space.seed)
    log.info(
        "Search %s: %s, up to %d trials, %s, feature cache %s",
        mcfg.key,
        space.tuner,
        max_trials,
        f"{len(folds)} folds" if len(folds) > 1 else "train/val split",
        prep.info["feature_cache"],
    )
    with tracking.run(f"search {mcfg.key}", run_id=parent_id, tags=None if parent_id else tags) as parent:
        state_file.parent.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps({"run_id": parent.info.run_id}))
        pid = parent.info.run_id
        if not parent_id:
            tracking.log_context(prep)
            mlflow.log_params(
                {
                    **tracking.model_params(prep, recipe.head_for(mcfg), tcfg),
                    **tracking.flatten({"search": space.model_dump(mode="json")}),
                    "search.max_trials_run": max_trials,
                    "search.folds_used": len(folds),
                }
            )
        tuner = make_tuner(HeadHyperModel(prep, space), space, project_dir, resume, pid, tcfg.epochs, max_trials, folds)
        run_search(tuner)
        found = best_of(tuner, mcfg.key)
        best, score, epoch = found.values, found.score, found.epoch
        search_s = time.perf_counter() - t0
        mlflow.set_tags({f"best.{k}": str(v) for k, v in best.items()})
        mlflow.log_metrics(
            {
                "search_seconds": search_s,
                "trials_completed": sum(t.status == "COMPLETED" for t in tuner.oracle.trials.values()),
                "trials_total": len(tuner.oracle.trials),
                f"best.{space.objective}": score,
                "best.epoch": epoch,
                f"best.cv_std_{space.objective}": found.std,
                "best.folds": len(folds),
            }
        )
        t1 = time.perf_counter()
        head_cfg, lr = head_from_values(best, space)
        keras.backend.clear_session()
        keras.utils.set_random_seed(space.seed)
        final = fit_final(
            prep,
            head_cfg,
            lr,
            tcfg,
            folds,
            space.seed,
            space.objective,
            epochs=epoch + 1 if mode != "single" else None,
            mode=mode,
        )
        stage, ft_best = "head", {}
        if ft_cfg is not None:
            final, stage, ft_best = finetune_stage(prep, final, ft_cfg, tcfg, folds, pid, project_dir, resume)
        result = record_final(prep, final, best, ft_best, stage, pid, score, epoch)
        t2 = time.perf_counter()
        if prep.on_features:
            result["baseline"] = baseline(prep, pid)
        t3 = time.perf_counter()
        if space.nested_cv:
            result["nested"] = nested_estimate(prep, pid, space.nested_cv, project_dir, resume)
        mlflow.log_metrics(
            {
                "refit_total_seconds": t2 - t1,
                "baseline_seconds": t3 - t2,
                "nested_seconds": time.perf_counter() - t3,
                "prepare_seconds": prep.info["prepare_seconds"],
            }
        )
    return {
        "model": mcfg.key,
        "parent_run_id": pid,
        "best": {**best, **{k: v for k, v in ft_best.items() if k != "objective"}},
        **result,
    }


def record_final(
    prep: Prepared,
    final: FinalModel,
    best: dict,
    ft_best: dict,
    stage: str,
    parent_run_id: str,
    score: float,
    epoch: int,
) -> dict:
    """The final run: the final model's fit, its one evaluation, the logged and registered model."""
    recipe, mcfg = prep.recipe, prep.mcfg
    space, tcfg = recipe.search, recipe.training_for(mcfg)
    head_cfg, _ = head_from_values(best, space)
    register_as = registered_name(prep)
    with tracking.run(
        f"final {mcfg.key}",
        nested=True,
        tags={
            "harness.kind": "final",
            "mlflow.parentRunId": parent_run_id,
            **tracking.model_tags(recipe, mcfg),
            "registered_model": register_as,
            "final.stage": stage,
        },
    ) as run:
        tracking.log_context(prep)
        mlflow.log_params(tracking.model_params(prep, head_cfg, tcfg))
        mlflow.log_params({f"hp.{k}": v for k, v in {**best, **ft_best}.items() if k != "objective"})
        # The validation objective the search chose this model by (the champion rule reads it, never test).
        mlflow.log_metrics({f"search.{space.objective}": score, "search.epoch": epoch})
        if ft_best:
            mlflow.log_metric(f"finetune.{space.objective}", float(ft_best.get("objective", np.nan)))
        log_final_fit(final)
        results = finish(prep, final, register_as=register_as)
    return {
        "final_run_id": run.info.run_id,
        "registered_model": register_as,
        "stage": stage,
        "test": results.get("test", {}),
        "val": results.get("val", {}),
    }


def tune(
    recipe: Recipe, only: list[str] | None = None, resume: bool = False, max_trials: int | None = None
) -> list[dict]:
    """One search per recipe model (or those named in `only`, as `task-backbone` or `task/backbone`).

    Every model's weights are resolved first (fetched when missing), so a missing file stops the study before an
    hour of work, not after it; a model marked `required: false` is skipped instead, with its reason recorded on
    the study's experiment for the report. Skipped models come back as {"model", "skipped"}."""
    from harness.models.backbones import resolve_weights

    models = [recipe.model(k) for k in only] if only else recipe.models
    skipped: dict[str, str] = {}
    for m in models:
        try:
            resolve_weights(m.backbone, m.weights, recipe.weights_mirror)
        except HarnessError as e:
            if m.required:
                raise HarnessError(f"{m.key}: {e} (or skip it: --only another model)") from None
            skipped[m.key] = str(e)
            log.warning("skipping %s (required: false): %s", m.key, e)
    exp_id = tracking.setup(recipe.study)
    c = tracking.client()
    for m in models:  # the report says why a model of the recipe has no result, or no longer says it
        if m.key in skipped:
            c.set_experiment_tag(exp_id, f"harness.skipped.{m.key}", skipped[m.key][:5000])
        elif f"harness.skipped.{m.key}" in c.get_experiment(exp_id).tags:
            c.delete_experiment_tag(exp_id, f"harness.skipped.{m.key}")
    return [
        {"model": m.key, "skipped": skipped[m.key]}
        if m.key in skipped
        else search_model(recipe, m, resume=resume, max_trials=max_trials)
        for m in models
    ]
