"""Cross-backbone ensembles (the recipe's `ensembles:`): after a study's searches, the average of the final models of
several recipe models of one task becomes a final model of its own, a candidate for the task's `champion` alias like
any other. This module owns finding the members' final runs, the ensemble's validation objective (from the members'
logged validation predictions, averaged), the one averaged Keras model, its single test evaluation, and its final run
(logged and registered as `<study>-<ensemble key>`). The members' searches are `harness.study.run`'s.
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

import keras
import mlflow
import numpy as np
import yaml

from harness.data import TaskData, prepare_task
from harness.errors import HarnessError
from harness.evaluation.metrics import (
    as_proba,
    confusion_figure,
    log_predictions,
    log_split_metrics,
    prediction_rows,
    read_predictions,
)
from harness.features.prepared import Prepared
from harness.models.heads import average
from harness.process import check_interrupt
from harness.recipe import EnsembleConfig, ModelConfig, Recipe
from harness.serving.flavor import log_classifier
from harness.stages.calibrate import calibrate
from harness.stages.export import export_final
from harness.stages.finalize import log_gradcam
from harness.stages.search import summary_of
from harness.tracking import runs as tracking
from harness.tracking import schema

log = logging.getLogger(__name__)
FINAL_MODE = "members averaged"  # the `final.mode` tag of an ensemble's final run, as the report shows it


def build_ensembles(recipe: Recipe, results: list[dict]) -> list[dict]:
    """Each recipe ensemble whose members all have a final model (made by this run, `results`, or finished
    earlier), built once: a finished ensemble of the same member runs is not built again. An ensemble with a member
    this run skipped is skipped too, its reason kept on the study's experiment for the report; one with a member
    never tuned waits for it. Returns a summary per ensemble built, found finished, or skipped."""
    if not recipe.ensembles:
        return []
    exp_id = tracking.setup(recipe.study)
    ran = {r["model"]: r for r in results}
    out = []
    for e in recipe.ensembles:
        check_interrupt()
        skipped = [k for k in e.members if "skipped" in ran.get(k, {})]
        finals = None if skipped else member_finals(exp_id, e, ran)
        if skipped:
            out.append(skip(exp_id, e, f"its member {skipped[0]} was skipped"))
        elif finals is not None and not any(_val_rows(finals[k]) for k in e.members):
            # A refit keeps no validation images: nothing would choose the ensemble, so it does not compete.
            out.append(
                skip(exp_id, e, "its members' final models keep no validation predictions (search.final: refit)")
            )
        elif finals is not None:
            out.append(build(recipe, e, finals, exp_id))
    return out


def skip(exp_id: str, e: EnsembleConfig, why: str) -> dict:
    log.warning("skipping the ensemble %s: %s", e.key, why)
    tracking.client().set_experiment_tag(exp_id, f"{schema.SKIPPED_PREFIX}{e.key}", why)
    return {"model": e.key, "skipped": why}


def member_finals(exp_id: str, e: EnsembleConfig, ran: dict[str, dict]) -> dict | None:
    """Member key -> its final run: the one this run made or resumed, else the newest FINISHED one in the store;
    None (logged) while a member has none."""
    c, finals = tracking.client(), {}
    for k in e.members:
        if k in ran:
            finals[k] = c.get_run(ran[k]["final_run_id"])
            continue
        runs = c.search_runs(
            [exp_id],
            filter_string=f"{schema.kind_filter(schema.FINAL)} and {schema.tag_filter(schema.MODEL_KEY, k)} and "
            "attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
        )
        runs = [r for r in runs if r.data.tags.get(schema.REGISTERED_MODEL)]  # tuned finals only
        if not runs:
            log.info("the ensemble %s waits for its member %s: it has no final model yet", e.key, k)
            return None
        finals[k] = runs[0]
    return finals


def _val_rows(run) -> bool:
    """Whether a final run has a validation record (`val.*` metrics come with its 'val' prediction rows)."""
    return any(m.startswith(schema.VAL) for m in run.data.metrics)


def build(recipe: Recipe, e: EnsembleConfig, finals: dict, exp_id: str) -> dict:
    """The ensemble's final run, or the finished one of the same member runs (resumed: not built again)."""

    c = tracking.client()
    member_runs = ",".join(finals[k].info.run_id for k in e.members)
    summary = {"model": e.key, "best": {"members": list(e.members)}}
    at = f"{schema.kind_filter(schema.FINAL)} and {schema.tag_filter(schema.MODEL_KEY, e.key)}"
    for r in c.search_runs([exp_id], filter_string=at):
        if r.info.status == "FINISHED" and r.data.tags.get("ensemble.member_runs") == member_runs:
            log.info("%s: built already (final run %s): skipped", e.key, r.info.run_id)
            return {**summary, "parent_run_id": r.info.run_id, **summary_of(r)}
        if r.info.status != "FINISHED":
            discard(c, r)
    if f"{schema.SKIPPED_PREFIX}{e.key}" in c.get_experiment(exp_id).tags:
        c.delete_experiment_tag(exp_id, f"{schema.SKIPPED_PREFIX}{e.key}")
    prep = ensemble_prepared(recipe, e, finals)
    with tempfile.TemporaryDirectory() as tmp:
        tables = {k: read_predictions(c, finals[k].info.run_id, str(Path(tmp) / k)) for k in e.members}
        idx, val_proba = averaged_validation(e, prep.task, tables)
        model = averaged_model(e, finals)
        result = record(prep, e, finals, member_runs, idx, val_proba, model, Path(tmp))
    # No search of its own: its final run stands where a model's search run would (bench reads phases from it).
    return {**summary, "parent_run_id": result["final_run_id"], **result}


def discard(c, run) -> None:
    """An ensemble run cut short goes, with any model version it registered: the ensemble is built again."""
    name = run.data.tags.get(schema.REGISTERED_MODEL)
    if name:
        for v in c.search_model_versions(f"name = '{name}' and run_id = '{run.info.run_id}'"):
            c.delete_model_version(name, v.version)
    c.delete_run(run.info.run_id)
    log.info("discarded the ensemble run %s that was cut short; it is built again", run.info.run_id)


def ensemble_prepared(recipe: Recipe, e: EnsembleConfig, finals: dict) -> Prepared:
    """What the finalize helpers (test metrics, Grad-CAM) read of a model: the recipe, the task's images at the
    members' size and colour policy, and a model config named after the ensemble. No backbone and no features: the
    ensemble runs on images, through its members' own backbones."""
    first = recipe.model(e.members[0])
    size, colour = recipe.image_size_for(first), recipe.colour_for(first)  # the same for every member (validated)
    mcfg = ModelConfig(task=e.task, backbone=first.backbone, name=e.key, image_size=size, colour=colour)
    task = prepare_task(recipe, e.task, size, colour)
    return Prepared(recipe, mcfg, task, backbone=None, weights=None, features=None, info={})


def averaged_validation(e: EnsembleConfig, task: TaskData, tables: dict[str, list[dict]]) -> tuple:
    """(task indices, probabilities): the members' validation records (rows of split 'val': the val split, or every
    image of train+validation out of fold) averaged per image. Members validated on different images cannot be
    averaged: one line says which."""
    where = {str(f): i for i, f in enumerate(task.files)}
    ref, files, probs = e.members[0], None, []
    for k, rows in tables.items():
        val = sorted((r for r in rows if r["split"] == "val"), key=lambda r: r["file"])
        names = [r["file"] for r in val]
        if files is None:
            files = names
        elif names != files:
            raise HarnessError(
                f"ensemble {e.key}: member {k} was validated on other images than {ref} ({len(names)} against "
                f"{len(files)} validation predictions): their validation records cannot be averaged"
            )
        probs.append(np.array([[float(r[f"p.{c}"]) for c in task.classes] for r in val]))
    unknown = [f for f in files if f not in where]
    if unknown:
        raise HarnessError(f"ensemble {e.key}: {ref}'s validation predictions name {unknown[0]}, not in {e.task} now")
    proba = np.mean(probs, axis=0)
    # The logged probabilities are rounded to 6 places: renormalised, as the report does with them.
    return np.array([where[f] for f in files]), proba / proba.sum(axis=1, keepdims=True)


def layer_name(key: str) -> str:
    return "member_" + re.sub(r"[^A-Za-z0-9_]", "_", key)


def averaged_model(e: EnsembleConfig, finals: dict) -> keras.Model:
    """The members' registered models (their Keras files, loaded as the served pyfunc loads them) averaged into one
    model of raw images. Each member gets its model key as its name: every member's model is called `final`."""
    c, members = tracking.client(), []
    for k in e.members:
        run = finals[k]
        name = run.data.tags[schema.REGISTERED_MODEL]
        versions = c.search_model_versions(f"name = '{name}' and run_id = '{run.info.run_id}'")
        if not versions:
            raise HarnessError(
                f"ensemble {e.key}: member {k} has no registered model of its final run {run.info.run_id}"
            )
        model = mlflow.pyfunc.load_model(f"models:/{name}/{versions[0].version}").unwrap_python_model().model
        model.name = layer_name(k)
        members.append(model)
    return average(members, name=layer_name(e.key).removeprefix("member_"))


def record(
    prep: Prepared,
    e: EnsembleConfig,
    finals: dict,
    member_runs: str,
    idx: np.ndarray,
    val_proba: np.ndarray,
    model: keras.Model,
    tmp: Path,
) -> dict:
    """The ensemble's final run: its validation objective (logged as `search.<objective>`, what the champion rule
    reads), its one test evaluation, the members' data summary and embeddings, the logged and registered model."""
    recipe, t = prep.recipe, prep.task
    objective, seed = recipe.search.objective, recipe.data.seed
    register_as = f"{recipe.study}-{e.key}"
    backbones = "+".join(recipe.model(k).backbone for k in e.members)
    tags = {
        schema.KIND: schema.FINAL,
        schema.STUDY: recipe.study,
        schema.TASK: e.task,
        schema.BACKBONE: backbones,
        schema.MODEL_KEY: e.key,
        schema.REGISTERED_MODEL: register_as,
        schema.FINAL_MODE: FINAL_MODE,
        schema.FINAL_STAGE: "ensemble",
        schema.FINAL_MEMBERS: str(len(e.members)),
        schema.ENSEMBLE_MEMBERS: ",".join(e.members),
        "ensemble.member_runs": member_runs,
        **tracking.device_tags(),
    }
    with tracking.run(f"final {e.key}", tags=tags) as run:
        mlflow.log_text(yaml.safe_dump(recipe.resolved(), sort_keys=False), "recipe.yaml")
        mlflow.log_params(
            {
                schema.ENSEMBLE_MEMBERS: ",".join(e.members),
                schema.SEARCH_OBJECTIVE: objective,
                "data.seed": seed,
                "data.colour": recipe.data.colour,
                "model.image_size": prep.image_size,
                "model.colour": prep.colour,
            }
        )
        tracking.log_datasets(prep)
        val = log_split_metrics(prep, "val", idx, val_proba, seed)
        score = val[objective.removeprefix("val_")]  # val_loss: the log loss, val_accuracy: the accuracy
        mlflow.log_metric(f"{schema.SEARCH_PREFIX}{objective}", score)
        test, test_rows, (test_idx, test_proba) = evaluate_test(prep, model, tmp)
        calibrated_rows, served = calibrate(prep, idx, val_proba, test_idx, test_proba)
        # the one model_config of the Keras model and its ONNX export
        config = {
            "study": recipe.study,
            "model_key": e.key,
            "backbone": backbones,
            "members": list(e.members),
            **served,
        }
        calibrated_rows += export_final(prep, model, test_idx, config, tmp)
        log_predictions(prediction_rows(t, idx, val_proba, "val") + test_rows + calibrated_rows)
        log_member_artifacts(e, finals, tmp)
        log_classifier(model, t.classes, prep.image_size, prep.colour, register_as, **config)
    log.info("ensemble %s: %s %.4f on its members' validation images", e.key, objective, score)
    return {
        "final_run_id": run.info.run_id,
        "registered_model": register_as,
        "stage": "ensemble",
        "test": test,
        "val": val,
    }


def evaluate_test(prep: Prepared, model: keras.Model, tmp: Path) -> tuple[dict, list[dict], tuple]:
    """The ensemble model run once on the test split (read once, counted), logged as a member's final model is:
    `test.*` metrics, the confusion matrix, Grad-CAM (the members' maps averaged); returns metrics, rows and
    (test images, probabilities)."""
    from harness.training.fit import predict

    t = prep.task
    test = prep.read_test()
    mlflow.log_metric("test_reads", prep.test_reads)
    if not len(test):
        return {}, [], (test, None)
    proba = as_proba(predict(model, t.images(test)), prep.n_classes)
    out = log_split_metrics(prep, "test", test, proba, prep.recipe.data.seed)
    title = f"{prep.mcfg.key} — test (n={len(test)})"
    mlflow.log_artifact(
        str(confusion_figure(t.y[test], proba.argmax(axis=1), t.classes, title, tmp / "confusion_test.png"))
    )
    log_gradcam(prep, model, test, proba, tmp)
    return out, prediction_rows(t, test, proba, "test"), (test, proba)


def log_member_artifacts(e: EnsembleConfig, finals: dict, tmp: Path) -> None:
    """What the report reads of every final model: the data summary (the members' task: the first one's) and the
    penultimate features, the members' side by side (as a fold ensemble's are): every member embedded the same
    stratified sample of the task's images."""
    c = tracking.client()
    parts = []
    for k in e.members:
        sub = tmp / "members" / k
        sub.mkdir(parents=True, exist_ok=True)
        parts.append(dict(np.load(c.download_artifacts(finals[k].info.run_id, "embeddings.npz", str(sub)))))
        if k == e.members[0]:
            mlflow.log_artifact(c.download_artifacts(finals[k].info.run_id, "data.json", str(sub)))
    if any(
        not np.array_equal(p["y"], parts[0]["y"]) or not np.array_equal(p["split"], parts[0]["split"]) for p in parts
    ):
        raise HarnessError(f"ensemble {e.key}: its members embedded different images; rerun them with one recipe")
    joined = {**parts[0], "embedding": np.concatenate([p["embedding"] for p in parts], axis=1)}
    np.savez_compressed(tmp / "embeddings.npz", **joined)
    mlflow.log_artifact(str(tmp / "embeddings.npz"))
