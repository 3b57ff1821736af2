"""Running a study: every recipe model through the stages of `harness.study.plan` under one MLflow search run
(trials, final, floor, audit and nested runs nested under it; resumed stage by stage), then the recipe's ensembles
and the champions; a worker's loop for distributed searches."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import mlflow

from harness.errors import HarnessError
from harness.features.prepared import Prepared, prepare
from harness.paths import get_paths
from harness.process import atomic_json, check_interrupt
from harness.recipe import ModelConfig, Recipe
from harness.stages.champion import crown_study
from harness.stages.ensemble import build_ensembles
from harness.stages.model_card import write_cards
from harness.stages.search import summary_of
from harness.study.plan import DISCARDED_KINDS, STAGE_KINDS, STAGES, Walk
from harness.study.resume import StudyLock, changed_parts, fingerprint
from harness.study.workers import LocalWorkers
from harness.tracking import runs as tracking
from harness.tracking import schema
from harness.training.distributed import Distributed
from harness.training.search import (
    HeadHyperModel,
    make_tuner,
    mark_orphans_killed,
    search_folds,
)

log = logging.getLogger(__name__)


def search_model(
    recipe: Recipe,
    mcfg: ModelConfig,
    *,
    resume: bool = False,
    max_trials: int | None = None,
    restart: bool = False,
    dist: Distributed | None = None,
    supervise=None,
) -> dict:
    """One recipe model through the stages of `harness.study.plan.STAGES` under one search run; returns a summary.

    Every stage can be resumed: a finished search is skipped; in an interrupted one the tuner continues from its
    last finished trial, a trial already recorded is not run again, and a stage's run that was cut short is
    discarded (with any model version it registered) and done again, so a finished search has exactly one of each."""
    space = recipe.search
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
    folds = search_folds(prep, space.cv_folds, space.seed)
    log.info(
        "Search %s: %s, up to %d trials, %s, feature cache %s",
        mcfg.key,
        space.tuner,
        max_trials,
        f"{len(folds)} folds" if len(folds) > 1 else "train/val split",
        prep.info["feature_cache"],
    )
    tags = None if parent_id else search_tags(prep, fp)
    with tracking.run(f"search {mcfg.key}", run_id=parent_id, tags=tags) as parent:
        pid = parent.info.run_id
        state_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_json(state_file, {"run_id": pid, "fingerprint": fp})
        if parent_id is None:
            tracking.log_context(prep)
            log_search_params(prep, len(folds))
        mlflow.log_metric(f"{schema.SEARCH_PREFIX}max_trials_run", max_trials)
        walk = Walk(prep, pid, project_dir, parent_id is not None, folds, max_trials, dist, supervise)
        walk_stages(walk)
        mlflow.log_metric("prepare_seconds", prep.info["prepare_seconds"])
    return {"model": mcfg.key, "parent_run_id": pid, "best": walk.best, **walk.result}


def walk_stages(walk: Walk) -> None:
    """Each stage the recipe asks for, in order: recalled when its run is recorded already, run otherwise."""
    children = finished_children(walk.parent_id)
    for stage in STAGES:
        if not stage.asked(walk.prep):
            continue
        if stage.kind in children:
            if stage.recall is not None:
                stage.recall(walk, children[stage.kind])
            continue
        check_interrupt()
        stage.run(walk)


def search_tags(prep: Prepared, fp: dict) -> dict:
    recipe, mcfg, space = prep.recipe, prep.mcfg, prep.recipe.search
    return {
        schema.KIND: schema.SEARCH,
        **tracking.model_tags(recipe, mcfg),
        schema.WEIGHTS: mcfg.weights,
        "tuner": space.tuner,
        schema.FINAL_MODE: "single" if space.cv_folds == 1 else space.final,
        "recipe.fingerprint": _fingerprint_digest(fp),
    }


def log_search_params(prep: Prepared, folds_used: int) -> None:
    recipe, mcfg, space = prep.recipe, prep.mcfg, prep.recipe.search
    ft_cfg = recipe.finetune_for(mcfg)
    mlflow.log_params(
        {
            **tracking.model_params(prep, recipe.head_for(mcfg), recipe.training_for(mcfg)),
            # the model's own fine-tuning stage where it overrides the recipe's
            **tracking.flatten(
                {"search": {**space.model_dump(mode="json"), "finetune": ft_cfg and ft_cfg.model_dump(mode="json")}}
            ),
            f"{schema.SEARCH_PREFIX}folds_used": folds_used,
        }
    )


def work(
    recipe: Recipe, worker_id: str, oracle: str, only: list[str] | None = None, chief_timeout: float = 600.0
) -> int:
    """A worker: find the search a chief serves on `oracle` (through the store), run its trials, and go on to the
    chief's next search, until the chief says the study is done. Returns the number of searches it worked on."""
    import os

    from harness.study.workers import serving_search, study_done
    from harness.training.distributed import Heartbeat, patient_stub

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
            parent_run_id=parent_id,
            resume=True,
            epochs=recipe.training_for(mcfg).epochs,
            max_trials=space.max_trials,
            folds=folds,
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
    """kind -> the FINISHED run of each of a search's stages (at most one each survives a resume)."""
    exp = mlflow.get_run(parent_run_id).info.experiment_id
    runs = tracking.client().search_runs(
        [exp], filter_string=f"{schema.parent_filter(parent_run_id)} and attributes.status = 'FINISHED'"
    )
    return {r.data.tags[schema.KIND]: r for r in runs if r.data.tags.get(schema.KIND) in STAGE_KINDS}


def discard_unfinished(parent_run_id: str) -> None:
    """Stage runs cut short are deleted, with any model version an unfinished final registered,
    so the resumed search ends with exactly one of each."""
    c = tracking.client()
    exp = mlflow.get_run(parent_run_id).info.experiment_id
    for r in c.search_runs([exp], filter_string=schema.parent_filter(parent_run_id)):
        kind = r.data.tags.get(schema.KIND)
        if kind in DISCARDED_KINDS and r.info.status != "FINISHED":
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
    needed = {s.kind for s in STAGES if s.asked(prep)}
    if parent.info.status != "FINISHED" or not needed <= set(children):
        return None
    best = {k.removeprefix(schema.BEST): v for k, v in parent.data.tags.items() if k.startswith(schema.BEST)}
    return {"model": prep.mcfg.key, "parent_run_id": parent_run_id, "best": best, **summary_of(children[schema.FINAL])}


def tune(
    recipe: Recipe,
    *,
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
        crown_study(recipe)
        write_cards(recipe.study)  # after the crown: the champion's new version carries its card too
    return out


def start_local_workers(recipe: Recipe, dist: Distributed, only: list[str] | None) -> LocalWorkers:
    """The chief's worker processes, each given the resolved recipe (overrides included) and its share of the
    cores; they find each search through the store as the chief serves it."""
    import yaml

    from harness.data import data_root
    from harness.study.workers import worker_command

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
