"""Search stage: the head search (Keras Tuner, on the feature store, scored on the study's folds), the fine-tuning
search when the recipe asks for one, and the final model they lead to (fit, one evaluation on the test split, logged
and registered as `<study>-<model key>`). Its `final` run marks it done."""

from __future__ import annotations

import logging
import time

import mlflow
import numpy as np

from harness.errors import HarnessError
from harness.features.prepared import Prepared
from harness.process import check_interrupt
from harness.stages.finalize import FinalModel, finish, fit_best, log_final_fit, registered_name
from harness.stages.finetune import finetune_stage
from harness.tracking import runs as tracking
from harness.tracking import schema
from harness.training.distributed import Distributed, serve
from harness.training.search import (
    HeadHyperModel,
    best_of,
    head_from_values,
    make_tuner,
    mark_orphans_killed,
    run_search,
)

log = logging.getLogger(__name__)


def search_and_finalize(walk) -> None:
    """Head search, fine-tuning when asked, then the final run; `walk` (a `harness.study.plan.Walk`) gets the
    summary and the chosen hyperparameters."""
    prep, space = walk.prep, walk.prep.recipe.search
    tcfg = prep.recipe.training_for(prep.mcfg)
    t0 = time.perf_counter()
    tuner = make_tuner(
        HeadHyperModel(prep, space),
        space,
        walk.project_dir,
        parent_run_id=walk.parent_id,
        resume=walk.resuming,
        epochs=tcfg.epochs,
        max_trials=walk.max_trials,
        folds=walk.folds,
        role="chief" if walk.dist else None,
    )
    if walk.dist is None:
        run_search(tuner)
    else:
        serve_search(tuner, walk.dist, walk.parent_id, prep.mcfg.key, walk.supervise)
    found = best_of(tuner, prep.mcfg.key)
    mlflow.set_tags({f"{schema.BEST}{k}": str(v) for k, v in found.values.items()})
    mlflow.log_metrics(
        {
            "search_seconds": time.perf_counter() - t0,
            "trials_completed": sum(t.status == "COMPLETED" for t in tuner.oracle.trials.values()),
            "trials_total": len(tuner.oracle.trials),
            f"{schema.BEST}{space.objective}": found.score,
            f"{schema.BEST}epoch": found.epoch,
            f"{schema.BEST}{schema.CV_STD}{space.objective}": found.std,
            f"{schema.BEST}folds": len(walk.folds),
        }
    )
    t1 = time.perf_counter()
    mode = "single" if space.cv_folds == 1 else space.final
    final = fit_best(prep, found, space, tcfg, walk.folds, mode)
    stage, ft_best = "head", {}
    ft_cfg = prep.recipe.finetune_for(prep.mcfg)
    if ft_cfg is not None:
        final, stage, ft_best = finetune_stage(
            prep, final, ft_cfg, tcfg, walk.folds, walk.parent_id, walk.project_dir, walk.resuming
        )
    check_interrupt()
    summary = record_final(prep, final, found.values, ft_best, stage, walk.parent_id, found.score, found.epoch)
    walk.result.update(summary)
    walk.best = {**found.values, **{k: v for k, v in ft_best.items() if k != "objective"}}
    mlflow.log_metric("refit_total_seconds", time.perf_counter() - t1)


def recall_final(walk, run) -> None:
    """A final run recorded already: the summary and hyperparameters it holds."""
    log.info("%s: final model recorded already (run %s)", walk.prep.mcfg.key, run.info.run_id)
    walk.result.update(summary_of(run))
    walk.best = {k.removeprefix(schema.HP): v for k, v in run.data.params.items() if k.startswith(schema.HP)}


def serve_search(tuner, dist: Distributed, parent_id: str, key: str, supervise=None) -> None:
    """The chief's part of a distributed search: serve the oracle until the last trial ends, tagging the search
    run so workers find it; afterwards no trial run is left RUNNING (a worker that died mid-trial leaves one)."""
    c = tracking.client()
    tuner.save()
    c.set_tag(parent_id, schema.ORACLE_PORT, str(dist.port))
    c.set_tag(parent_id, schema.ORACLE_STATE, "serving")
    log.info(
        "Serving the %s search on %s:%d to %s",
        key,
        dist.bind,
        dist.port,
        f"{dist.workers} local workers" if dist.workers else "workers",
    )
    try:
        summary = serve(tuner.oracle, dist, supervise)
    finally:
        c.set_tag(parent_id, schema.ORACLE_STATE, "done")
        mark_orphans_killed(parent_id)
    if summary["abort"]:
        raise HarnessError(
            f"{key}: the distributed search stopped ({summary['abort']}); fix the cause, then continue with --resume"
        )
    check_interrupt()


def summary_of(final_run) -> dict:
    m = final_run.data.metrics
    return {
        "final_run_id": final_run.info.run_id,
        "registered_model": final_run.data.tags.get(schema.REGISTERED_MODEL),
        "stage": final_run.data.tags.get(schema.FINAL_STAGE, "head"),
        "test": {k.removeprefix(schema.TEST): v for k, v in m.items() if k.startswith(schema.TEST)},
        "val": {k.removeprefix(schema.VAL): v for k, v in m.items() if k.startswith(schema.VAL)},
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
            schema.KIND: schema.FINAL,
            schema.PARENT: parent_run_id,
            **tracking.model_tags(recipe, mcfg),
            schema.REGISTERED_MODEL: register_as,
            schema.FINAL_STAGE: stage,
        },
    ) as run:
        tracking.log_context(prep)
        mlflow.log_params(tracking.model_params(prep, head_cfg, tcfg))
        mlflow.log_params({f"{schema.HP}{k}": v for k, v in {**best, **ft_best}.items() if k != "objective"})
        # The validation objective the search chose this model by (the champion rule reads it, never test).
        mlflow.log_metrics({f"{schema.SEARCH_PREFIX}{space.objective}": score, f"{schema.SEARCH_PREFIX}epoch": epoch})
        if ft_best:
            mlflow.log_metric(f"{schema.FINETUNE_PREFIX}{space.objective}", float(ft_best.get("objective", np.nan)))
        log_final_fit(final)
        results = finish(prep, final, register_as=register_as)
    return {
        "final_run_id": run.info.run_id,
        "registered_model": register_as,
        "stage": stage,
        "test": results.get("test", {}),
        "val": results.get("val", {}),
    }
