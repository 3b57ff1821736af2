"""A study's models, each through its stages: weights resolved (or the model skipped), the head search, the
fine-tuning search when asked, the final model (fit, one evaluation on the test split, logged and registered as
`<study>-<model key>`), the floor, and the nested estimate when asked. Everything a model does is one MLflow parent
run with nested children: trials, final, baseline, nested-cv.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import mlflow
import numpy as np

from harness import schema, tracking
from harness.audit import audit
from harness.baseline import baseline
from harness.distributed import Distributed, LocalWorkers, serve
from harness.ensemble import build_ensembles
from harness.errors import HarnessError
from harness.finalize import FinalModel, finish, fit_best, log_final_fit, registered_name
from harness.finetune import finetune_stage
from harness.nested import nested_estimate
from harness.paths import get_paths
from harness.prepared import Prepared, prepare
from harness.recipe import ModelConfig, Recipe
from harness.resume import StudyLock, atomic_json, changed_parts, check_interrupt, fingerprint
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
# a search's stages after its trials, one run each
STAGE_RUNS = (schema.FINAL, schema.BASELINE, schema.AUDIT, schema.NESTED)


def search_model(
    recipe: Recipe,
    mcfg: ModelConfig,
    resume: bool = False,
    max_trials: int | None = None,
    restart: bool = False,
    dist: Distributed | None = None,
    supervise=None,
) -> dict:
    """Search (head, then fine-tuning when asked), fit the final model, evaluate once, log and register; the floor
    and the nested estimate follow. Returns a summary.

    Every stage can be resumed: a finished search is skipped; in an interrupted one the tuner continues from its
    last finished trial, a trial already recorded is not run again, and a final, floor or nested run that was cut
    short is discarded (with any model version it registered) and done again, so a finished search has exactly one
    of each."""
    space, tcfg = recipe.search, recipe.training_for(mcfg)
    max_trials = max_trials or space.max_trials
    tracking.setup(recipe.study)
    project_dir = get_paths().tuner_dir / recipe.study / mcfg.key
    state_file = project_dir.parent / f"{mcfg.key}.parent.json"
    if restart:
        forget_search(project_dir, state_file)
    state = json.loads(state_file.read_text()) if state_file.is_file() else None
    resumable = resume and state is not None and _run_exists(state["run_id"])
    if resumable:  # refuse a changed recipe before decoding a single image
        refuse_changes(recipe, mcfg, state, fingerprint(recipe, mcfg))
    log.info("Preparing %s: images and backbone features", mcfg.key)
    prep = prepare(recipe, mcfg)
    fp = fingerprint(recipe, mcfg, prep)
    parent_id = None
    if resumable:
        refuse_changes(recipe, mcfg, state, fp)  # and now the images themselves and the weights file
        parent_id = state["run_id"]
        done = finished(parent_id, prep)
        if done is not None:
            log.info("%s: finished already (final run %s): skipped", mcfg.key, done["final_run_id"])
            return done
        # Trial runs may belong to workers still running them (a restarted chief): those are left alone.
        mark_orphans_killed(parent_id, trials=dist is None)
        discard_unfinished(parent_id)
    elif state is not None and not resume:
        log.info("%s: starting a new search (an earlier one exists: --resume continues it instead)", mcfg.key)
    resuming = parent_id is not None
    mode = "single" if space.cv_folds == 1 else space.final
    ft_cfg = recipe.finetune_for(mcfg)
    tags = {
        schema.KIND: schema.SEARCH,
        **tracking.model_tags(recipe, mcfg),
        schema.WEIGHTS: mcfg.weights,
        "tuner": space.tuner,
        schema.FINAL_MODE: mode,
        "recipe.fingerprint": _fingerprint_digest(fp),
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
    with tracking.run(f"search {mcfg.key}", run_id=parent_id, tags=None if resuming else tags) as parent:
        pid = parent.info.run_id
        state_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_json(state_file, {"run_id": pid, "fingerprint": fp})
        if not resuming:
            tracking.log_context(prep)
            mlflow.log_params(
                {
                    **tracking.model_params(prep, recipe.head_for(mcfg), tcfg),
                    # the model's own fine-tuning stage where it overrides the recipe's
                    **tracking.flatten(
                        {
                            "search": {
                                **space.model_dump(mode="json"),
                                "finetune": ft_cfg and ft_cfg.model_dump(mode="json"),
                            }
                        }
                    ),
                    f"{schema.SEARCH_PREFIX}folds_used": len(folds),
                }
            )
        mlflow.log_metric(f"{schema.SEARCH_PREFIX}max_trials_run", max_trials)
        children = finished_children(pid)
        if schema.FINAL in children:
            result = summary_of(children[schema.FINAL])
            log.info("%s: final model recorded already (run %s)", mcfg.key, result["final_run_id"])
            params = children[schema.FINAL].data.params
            best = {k.removeprefix(schema.HP): v for k, v in params.items() if k.startswith(schema.HP)}
            t1 = t2 = time.perf_counter()
        else:
            tuner = make_tuner(
                HeadHyperModel(prep, space),
                space,
                project_dir,
                resuming,
                pid,
                tcfg.epochs,
                max_trials,
                folds,
                role="chief" if dist else None,
            )
            if dist is None:
                run_search(tuner)
            else:
                serve_search(tuner, dist, pid, mcfg.key, supervise)
            found = best_of(tuner, mcfg.key)
            best, score, epoch = found.values, found.score, found.epoch
            mlflow.set_tags({f"{schema.BEST}{k}": str(v) for k, v in best.items()})
            mlflow.log_metrics(
                {
                    "search_seconds": time.perf_counter() - t0,
                    "trials_completed": sum(t.status == "COMPLETED" for t in tuner.oracle.trials.values()),
                    "trials_total": len(tuner.oracle.trials),
                    f"{schema.BEST}{space.objective}": score,
                    f"{schema.BEST}epoch": epoch,
                    f"{schema.BEST}{schema.CV_STD}{space.objective}": found.std,
                    f"{schema.BEST}folds": len(folds),
                }
            )
            t1 = time.perf_counter()
            final = fit_best(prep, found, space, tcfg, folds, mode)
            stage, ft_best = "head", {}
            if ft_cfg is not None:
                final, stage, ft_best = finetune_stage(prep, final, ft_cfg, tcfg, folds, pid, project_dir, resuming)
            check_interrupt()
            result = record_final(prep, final, best, ft_best, stage, pid, score, epoch)
            best = {**best, **{k: v for k, v in ft_best.items() if k != "objective"}}
            t2 = time.perf_counter()
            mlflow.log_metric("refit_total_seconds", t2 - t1)
        check_interrupt()
        if prep.on_features and schema.BASELINE not in children:
            result["baseline"] = baseline(prep, pid)
            mlflow.log_metric("baseline_seconds", time.perf_counter() - t2)
        check_interrupt()
        if prep.on_features and schema.AUDIT not in children:
            result["audit"] = audit(prep, pid)
        check_interrupt()
        if space.nested_cv and schema.NESTED not in children:
            t3 = time.perf_counter()
            result["nested"] = nested_estimate(prep, pid, space.nested_cv, project_dir, resuming)
            mlflow.log_metric("nested_seconds", time.perf_counter() - t3)
        mlflow.log_metric("prepare_seconds", prep.info["prepare_seconds"])
    return {"model": mcfg.key, "parent_run_id": pid, "best": best, **result}


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


def work(
    recipe: Recipe, worker_id: str, oracle: str, only: list[str] | None = None, chief_timeout: float = 600.0
) -> int:
    """A worker: find the search a chief serves on `oracle` (through the store), run its trials, and go on to the
    chief's next search, until the chief says the study is done. Returns the number of searches it worked on."""
    import os

    from harness.distributed import Heartbeat, patient_stub, serving_search, study_done

    if "chief" in worker_id:  # Keras Tuner takes any id containing "chief" for the chief
        raise HarnessError(f"--worker {worker_id}: a worker's id must not contain 'chief'")
    host, _, port_text = oracle.rpartition(":")
    if not host or not port_text.isdigit():
        raise HarnessError(f"--oracle {oracle}: expected HOST:PORT")
    port = int(port_text)
    keys = {m.key for m in ([recipe.model(k) for k in only] if only else recipe.models)}
    tracking.setup(recipe.study)
    os.environ.update(KERASTUNER_ORACLE_IP=host, KERASTUNER_ORACLE_PORT=str(port), KERASTUNER_TUNER_ID=worker_id)
    searches, last = 0, time.monotonic()
    while not study_done(recipe.study, port):
        found = serving_search(recipe.study, port, keys)
        if found is None:
            if time.monotonic() - last > chief_timeout:
                raise HarnessError(
                    f"no chief has served a search of study '{recipe.study}' on {oracle} for {chief_timeout:.0f} s"
                )
            time.sleep(2.0)
            continue
        key, parent_id = found
        mcfg, space = recipe.model(key), recipe.search
        prep = prepare(recipe, mcfg)  # features from the shared store: the chief extracted them
        folds = search_folds(prep, space.cv_folds, space.seed)
        tuner = make_tuner(
            HeadHyperModel(prep, space),
            space,
            get_paths().tuner_dir / recipe.study / key,
            True,
            parent_id,
            recipe.training_for(mcfg).epochs,
            space.max_trials,
            folds,
            role=worker_id,
        )
        tuner.oracle.stub = patient_stub(host, port, chief_timeout)
        beat = Heartbeat(tuner.oracle.stub.raw, worker_id, chief_timeout=chief_timeout)
        beat.start()
        log.info(
            "worker %s: working on the %s search (%d images extracted here, the rest read from the store)",
            worker_id,
            key,
            prep.info["extracted"],
        )
        try:
            tuner.search(verbose=0)
        finally:
            beat.stopped.set()
        searches += 1
        last = time.monotonic()
        while serving_search(recipe.study, port, {key}) == found and not study_done(recipe.study, port):
            time.sleep(1.0)  # the chief is finishing this search (final model, floor): wait for its next one
    return searches


def refuse_changes(recipe: Recipe, mcfg: ModelConfig, state: dict, fp: dict) -> None:
    changed = changed_parts(state.get("fingerprint", {}), fp)
    if changed:
        raise HarnessError(
            f"{recipe.source}: {mcfg.key}: the recipe changed since this search started ({', '.join(changed)}); "
            f"resuming it would mix two studies: run with --restart to start over, or give the study a new name"
        )


def _run_exists(run_id: str) -> bool:
    try:
        return tracking.client().get_run(run_id).info.lifecycle_stage == "active"
    except mlflow.exceptions.MlflowException:
        return False  # a state file from another store: nothing to continue there


def _fingerprint_digest(fp: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def forget_search(project_dir: Path, state_file: Path) -> None:
    """--restart: the tuner state of this model's searches goes; its MLflow runs stay, as history."""
    import shutil

    for d in project_dir.parent.glob(f"{project_dir.name}*"):
        if d.is_dir():
            shutil.rmtree(d)
    state_file.unlink(missing_ok=True)


def finished_children(parent_run_id: str) -> dict:
    """kind -> the FINISHED final / baseline / nested run of a search (at most one each survives a resume)."""
    exp = mlflow.get_run(parent_run_id).info.experiment_id
    runs = tracking.client().search_runs(
        [exp], filter_string=f"{schema.parent_filter(parent_run_id)} and attributes.status = 'FINISHED'"
    )
    return {r.data.tags[schema.KIND]: r for r in runs if r.data.tags.get(schema.KIND) in STAGE_RUNS}


def discard_unfinished(parent_run_id: str) -> None:
    """Final, floor and nested runs cut short are deleted, with any model version an unfinished final registered,
    so the resumed search ends with exactly one of each."""
    c = tracking.client()
    exp = mlflow.get_run(parent_run_id).info.experiment_id
    for r in c.search_runs([exp], filter_string=schema.parent_filter(parent_run_id)):
        kind = r.data.tags.get(schema.KIND)
        if kind in (*STAGE_RUNS, schema.FINETUNE) and r.info.status != "FINISHED":
            name = r.data.tags.get(schema.REGISTERED_MODEL)
            if name:
                for v in c.search_model_versions(f"name = '{name}' and run_id = '{r.info.run_id}'"):
                    c.delete_model_version(name, v.version)
            c.delete_run(r.info.run_id)
            log.info("discarded the %s run %s that was cut short; it is done again", kind, r.info.run_id)


def finished(parent_run_id: str, prep: Prepared) -> dict | None:
    """The summary of a search that has every stage the recipe asks for, or None."""
    parent = mlflow.get_run(parent_run_id)
    children = finished_children(parent_run_id)
    needed = (
        {schema.FINAL}
        | ({schema.BASELINE, schema.AUDIT} if prep.on_features else set())
        | ({schema.NESTED} if prep.recipe.search.nested_cv else set())
    )
    if parent.info.status != "FINISHED" or not needed <= set(children):
        return None
    best = {k.removeprefix(schema.BEST): v for k, v in parent.data.tags.items() if k.startswith(schema.BEST)}
    return {"model": prep.mcfg.key, "parent_run_id": parent_run_id, "best": best, **summary_of(children[schema.FINAL])}


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


def tune(
    recipe: Recipe,
    only: list[str] | None = None,
    resume: bool = False,
    max_trials: int | None = None,
    restart: bool = False,
    dist: Distributed | None = None,
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
            c.set_experiment_tag(exp_id, f"{schema.SKIPPED_PREFIX}{m.key}", skipped[m.key][:5000])
        elif f"{schema.SKIPPED_PREFIX}{m.key}" in c.get_experiment(exp_id).tags:
            c.delete_experiment_tag(exp_id, f"{schema.SKIPPED_PREFIX}{m.key}")
    out = []
    with StudyLock(get_paths().tuner_dir / recipe.study, recipe.study):
        local = start_local_workers(recipe, dist, only) if dist is not None and dist.workers else None
        try:
            for m in models:
                check_interrupt()
                out.append(
                    {"model": m.key, "skipped": skipped[m.key]}
                    if m.key in skipped
                    else search_model(
                        recipe,
                        m,
                        resume=resume,
                        max_trials=max_trials,
                        restart=restart,
                        dist=dist,
                        supervise=local.supervise if local else None,
                    )
                )
        finally:
            if dist is not None:
                c.set_experiment_tag(exp_id, f"{schema.ORACLE_DONE_PREFIX}{dist.port}", "done")  # workers leave
            if local is not None:
                local.stop()
        out += build_ensembles(recipe, out)  # the recipe's ensembles of the final models, candidates as well
    return out


def start_local_workers(recipe: Recipe, dist: Distributed, only: list[str] | None) -> LocalWorkers:
    """The chief's worker processes, each given the resolved recipe (overrides included) and its share of the
    cores; they find each search through the store as the chief serves it."""
    import yaml

    from harness.data import data_root
    from harness.distributed import worker_command

    raw = recipe.resolved()
    if recipe.data.synthetic is None:
        raw["data"]["root"] = str(data_root(recipe))
    path = get_paths().tuner_dir / recipe.study / ".worker-recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    dist.spawn = worker_command(path, "127.0.0.1" if dist.bind in ("0.0.0.0", "::") else dist.bind, dist.port, only)
    workers = LocalWorkers(dist)
    workers.start_all()
    log.info("%d local workers, %d threads each", dist.workers, workers.threads)
    return workers
