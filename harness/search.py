"""Search stage: one Keras Tuner search per recipe model (task x backbone), on cached features when the backbone is
frozen. The search is an MLflow parent run, each trial a nested child run; afterwards the best hyperparameters are
refit, evaluated once on the test split, logged once and registered as `<study>-<task>-<backbone>`.

Only public Keras Tuner hooks are used: `HyperModel.build` and `Tuner.run_trial` (wrapped, not replaced).
"""

from __future__ import annotations

import json
import logging
import os
import time

import keras
import keras_tuner as kt
import mlflow

from harness import tracking
from harness.errors import HarnessError
from harness.finalize import fit_and_finish, registered_name
from harness.fit import fit_on, make_optimizer
from harness.paths import get_paths
from harness.prepared import Prepared, prepare, refresh_backbone
from harness.recipe import FloatRange, HeadConfig, ModelConfig, Recipe, SearchConfig

log = logging.getLogger(__name__)
TUNERS = {"random": kt.RandomSearch, "bayesian": kt.BayesianOptimization, "hyperband": kt.Hyperband}


def clean_values(values: dict) -> dict:
    """Hyperparameters as logged: no `tuner/*` bookkeeping, floats rounded (0.30000000000000004 -> 0.3)."""
    out = {}
    for k, v in values.items():
        if k.startswith("tuner/") or v is None:
            continue
        out[k] = float(f"{v:.6g}") if isinstance(v, float) else v
    return out


def head_from_values(values: dict, space: SearchConfig) -> tuple[HeadConfig, float]:
    depth = int(values["depth"])
    units = [int(values[f"units_{i}"]) for i in range(depth)]
    head = HeadConfig(
        pooling=values.get("pooling", space.pooling[0]), units=units, dropout=round(float(values["dropout"]), 6)
    )
    return head, float(values["learning_rate"])


class HeadHyperModel(kt.HyperModel):
    """Search space from the recipe. `units_i` lives in a conditional scope on depth, so it is absent (not logged)
    from trials whose head has fewer than i+1 layers."""

    def __init__(self, prep: Prepared, space: SearchConfig):
        super().__init__()
        self.prep, self.space = prep, space

    def declare(self, hp: kt.HyperParameters) -> dict:
        s = self.space
        values = {"depth": hp.Int("depth", s.depth.min, s.depth.max)}
        for i in range(s.depth.max):
            if i < s.depth.min:
                values[f"units_{i}"] = hp.Choice(f"units_{i}", s.units)
            else:
                with hp.conditional_scope("depth", list(range(i + 1, s.depth.max + 1))):
                    values[f"units_{i}"] = hp.Choice(f"units_{i}", s.units)
        values["dropout"] = hp.Float(
            "dropout", s.dropout.min, s.dropout.max, step=s.dropout.step, sampling="log" if s.dropout.log else "linear"
        )
        if isinstance(s.learning_rate, FloatRange):
            values["learning_rate"] = hp.Float(
                "learning_rate",
                s.learning_rate.min,
                s.learning_rate.max,
                sampling="log" if s.learning_rate.log else "linear",
            )
        else:
            values["learning_rate"] = hp.Choice("learning_rate", s.learning_rate)
        if len(s.pooling) > 1:
            values["pooling"] = hp.Choice("pooling", s.pooling)
        return values

    def build(self, hp):
        head, _ = head_from_values(self.declare(hp), self.space)
        if not self.prep.on_features:  # trainable backbone: every trial starts from the same pretrained weights
            self.prep = refresh_backbone(self.prep)
        model, _ = self.prep.build(head)
        return model


def _tracked(base: type) -> type:
    class Tracked(base):
        """Runs each trial itself (the documented `run_trial` hook): builds the head, trains it with the harness's
        compiled loop, records it as one nested MLflow run written in one batch, and returns the objective.

        No per-epoch checkpoint files: only Hyperband reads a trial's weights back (to continue it in a later
        bracket), so only Hyperband trials save theirs, once, at their best epoch."""

        def __init__(self, *args, prep: Prepared, parent_run_id: str, trial_seed: int, **kwargs):
            super().__init__(*args, **kwargs)
            self.prep, self.parent_run_id, self.trial_seed = prep, parent_run_id, trial_seed
            self.recorded = trial_runs(parent_run_id)  # trials with a run already (a resumed search)

        def checkpoint(self, trial_id: str) -> str:
            return os.path.join(self.get_trial_dir(trial_id), "head.weights.h5")

        def run_trial(self, trial, *args, **kwargs):
            t0 = time.perf_counter()
            hp, objective = trial.hyperparameters, self.oracle.objective.name
            recipe, mcfg = self.prep.recipe, self.prep.mcfg
            tcfg = recipe.training_for(mcfg)
            keras.backend.clear_session()
            keras.utils.set_random_seed(self.trial_seed + int(trial.trial_id))
            values = clean_values(hp.values)
            head_cfg, lr = head_from_values(values, self.hypermodel.space)
            tags = {
                "harness.kind": "trial",
                "trial_id": trial.trial_id,
                "mlflow.parentRunId": self.parent_run_id,
                **{k: str(v) for k, v in hp.values.items() if k.startswith("tuner/")},
            }
            try:
                with tracking.run(
                    f"trial {trial.trial_id}", nested=True, run_id=self.recorded.get(trial.trial_id), tags=tags
                ) as active:
                    model = self.hypermodel.build(hp)
                    initial = int(hp.values.get("tuner/initial_epoch", 0))
                    epochs = int(hp.values.get("tuner/epochs", tcfg.epochs))
                    if "tuner/trial_id" in hp.values:
                        model.load_weights(self.checkpoint(hp.values["tuner/trial_id"]))
                    splits = self.prep.task.splits
                    result = fit_on(
                        self.prep,
                        model,
                        head_cfg.pooling,
                        splits["train"],
                        splits["val"],
                        epochs - initial,
                        tcfg.batch_size,
                        make_optimizer(tcfg.optimizer, lr),
                        seed=self.trial_seed + int(trial.trial_id),
                        monitor=objective,
                        restore_best="tuner/epochs" in hp.values,
                    )
                    if "tuner/epochs" in hp.values:
                        model.save_weights(self.checkpoint(trial.trial_id))
                    best = result.best(objective)
                    seconds = time.perf_counter() - t0
                    mlflow.log_params({f"hp.{k}": v for k, v in values.items()})
                    tracking.log_fit(result, offset=initial, run_id=active.info.run_id)
                    mlflow.log_metrics({"trial_seconds": seconds, f"best_{objective}": best})
                    log.info("trial %s: %s %.4f in %.1f s  %s", trial.trial_id, objective, best, seconds, values)
                    return {objective: best}
            except HarnessError as e:
                # Bad input is not bad luck: retrying another trial would fail the same way, so the search stops.
                raise kt.errors.FatalError(str(e)) from e
            except Exception as e:
                # Recorded FAILED (by tracking.run) with its error; FailedTrialError makes the tuner count it
                # towards max_consecutive_failed_trials instead of retrying it forever.
                raise kt.errors.FailedTrialError(f"{type(e).__name__}: {e}") from e

    Tracked.__name__ = f"Tracked{base.__name__}"
    return Tracked


def trial_runs(parent_run_id: str) -> dict[str, str]:
    """trial_id -> child run id of the trials already recorded under a search run."""
    runs = tracking.client().search_runs(
        [mlflow.get_run(parent_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`harness.kind` = 'trial'",
    )
    return {r.data.tags["trial_id"]: r.info.run_id for r in runs}


def mark_orphans_killed(parent_run_id: str) -> int:
    """Child runs left RUNNING by a killed process (kill -9 leaves no chance to end them) become KILLED."""
    c, n = tracking.client(), 0
    for run_id in trial_runs(parent_run_id).values():
        if c.get_run(run_id).info.status == "RUNNING":
            c.set_terminated(run_id, "KILLED")
            n += 1
    return n


def make_tuner(
    prep: Prepared, space: SearchConfig, project_dir, resume: bool, parent_run_id: str, epochs: int, max_trials: int
):
    """The recipe's Keras Tuner kind, wrapped by `_tracked`, its state in `project_dir` (resumable)."""
    base = TUNERS[space.tuner]
    kwargs = dict(
        objective=kt.Objective(space.objective, "min" if space.objective.endswith("loss") else "max"),
        seed=space.seed,
        directory=str(project_dir.parent),
        project_name=project_dir.name,
        overwrite=not resume,
        max_consecutive_failed_trials=space.max_consecutive_failures,
    )
    if space.tuner == "hyperband":
        kwargs.update(max_epochs=epochs, factor=space.hyperband_factor)
    else:
        kwargs.update(max_trials=max_trials)
    return _tracked(base)(
        HeadHyperModel(prep, space), prep=prep, parent_run_id=parent_run_id, trial_seed=space.seed, **kwargs
    )


def search_model(recipe: Recipe, mcfg: ModelConfig, resume: bool = False, max_trials: int | None = None) -> dict:
    """Search, refit the best, evaluate once, log and register. Returns a summary of the search."""
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
    tags = {
        "harness.kind": "search",
        **tracking.model_tags(recipe, mcfg),
        "weights": mcfg.weights,
        "tuner": space.tuner,
    }
    t0 = time.perf_counter()
    log.info(
        "Search %s: %s, up to %d trials, feature cache %s",
        mcfg.key,
        space.tuner,
        max_trials,
        prep.info["feature_cache"],
    )
    with tracking.run(f"search {mcfg.key}", run_id=parent_id, tags=None if parent_id else tags) as parent:
        state_file.parent.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps({"run_id": parent.info.run_id}))
        if not parent_id:
            tracking.log_context(prep)
            mlflow.log_params(
                {
                    **tracking.model_params(prep, recipe.head_for(mcfg), tcfg),
                    **tracking.flatten({"search": space.model_dump(mode="json")}),
                    "search.max_trials_run": max_trials,
                }
            )
        tuner = make_tuner(prep, space, project_dir, resume, parent.info.run_id, tcfg.epochs, max_trials)
        try:
            tuner.search(verbose=0)  # the tuner holds the prepared data; its trials read their splits from it
        except kt.errors.FatalError as e:
            if isinstance(e.__cause__, HarnessError):
                raise e.__cause__ from None
            raise
        search_s = time.perf_counter() - t0
        completed = [t for t in tuner.oracle.trials.values() if t.status == "COMPLETED"]
        if not completed:
            raise HarnessError(f"{mcfg.key}: no trial completed; see the failed trial runs in MLflow for errors")
        best = clean_values(tuner.get_best_hyperparameters(1)[0].values)
        mlflow.set_tags({f"best.{k}": str(v) for k, v in best.items()})
        mlflow.log_metrics(
            {
                "search_seconds": search_s,
                "trials_completed": len(completed),
                "trials_total": len(tuner.oracle.trials),
                f"best.{space.objective}": float(tuner.oracle.get_best_trials(1)[0].score),
            }
        )
        t1 = time.perf_counter()
        final = refit(prep, best, parent.info.run_id)
        t2 = time.perf_counter()
        if prep.on_features:
            from harness.baseline import baseline

            final["baseline"] = baseline(prep, parent.info.run_id)
        mlflow.log_metrics(
            {
                "refit_total_seconds": t2 - t1,
                "baseline_seconds": time.perf_counter() - t2,
                "prepare_seconds": prep.info["prepare_seconds"],
            }
        )
    return {"model": mcfg.key, "parent_run_id": parent.info.run_id, "best": best, **final}


def refit(prep: Prepared, best: dict, parent_run_id: str) -> dict:
    """Retrain the best hyperparameters from scratch on the train split for the recipe's epochs, keep the weights of
    the best validation epoch, then evaluate once on test. Validation stays held out: with a few dozen images it is
    the only honest signal for picking the epoch, and the training curves it gives go into the report."""
    recipe, mcfg = prep.recipe, prep.mcfg
    space, tcfg = recipe.search, recipe.training_for(mcfg)
    head_cfg, lr = head_from_values(best, space)
    keras.backend.clear_session()
    keras.utils.set_random_seed(space.seed)
    if not prep.on_features:
        prep = refresh_backbone(prep)
    register_as = registered_name(prep)
    with tracking.run(
        f"final {mcfg.key}",
        nested=True,
        tags={
            "harness.kind": "final",
            "mlflow.parentRunId": parent_run_id,
            **tracking.model_tags(recipe, mcfg),
            "registered_model": register_as,
        },
    ) as final:
        tracking.log_context(prep)
        mlflow.log_params(tracking.model_params(prep, head_cfg, tcfg))
        mlflow.log_params({f"hp.{k}": v for k, v in best.items()})
        results = fit_and_finish(
            prep, head_cfg, lr, tcfg, seed=space.seed, restore_best=space.objective, register_as=register_as
        )
    return {
        "final_run_id": final.info.run_id,
        "registered_model": register_as,
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
