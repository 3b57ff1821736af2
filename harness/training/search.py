"""Search stage: the Keras Tuner machinery of a head search (and, through its hypermodel, of the fine-tuning stage).

A trial trains one head on the train split and is scored on the validation split, or, with `search.cv_folds: K`,
trains K heads on K stratified, patient-grouped folds of train+validation at once and is scored by the fold-mean
validation curve at its best epoch (the epoch the folds agree on). Each trial is a nested MLflow run with its
per-fold values. `harness.study.run` chains the stages of a model: search, fine-tuning, final model, floor, nested.

Only public Keras Tuner hooks are used: `HyperModel.build` and `Tuner.run_trial` / `on_trial_end`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import keras
import keras_tuner as kt
import mlflow
import numpy as np

from harness.data.splits import cv_folds
from harness.errors import HarnessError
from harness.features.prepared import Prepared, refresh_backbone
from harness.process import STOP, atomic_json, check_interrupt
from harness.recipe import FloatRange, HeadConfig, SearchConfig, minimised
from harness.tracking import runs as tracking
from harness.tracking import schema
from harness.training.fit import FitResult, Fold, fit_on, optimizer_factory

log = logging.getLogger(__name__)
PRUNED = schema.PRUNED  # the tag of a trial run, and the metric of a Keras Tuner trial, that pruning stopped early


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


def search_folds(prep: Prepared, k: int, seed: int, pool: np.ndarray | None = None) -> list[Fold]:
    """The folds every trial of a search trains and validates on: the train/val split (k = 1), or k stratified,
    patient-grouped folds of `pool` (default train+validation)."""
    t = prep.task
    if k == 1 and pool is None:
        return [Fold(t.splits["train"], t.splits["val"])]
    if k == 1:  # a nested search's single split: validation carved from its own pool, as the recipe's fractions
        from harness.data.splits import carve

        train, val = carve(pool, t.y, t.groups, prep.recipe.data.val_fraction, seed)
        return [Fold(train, val)]
    try:
        return [Fold(tr, va) for tr, va in cv_folds(pool if pool is not None else t.pool(), t.y, t.groups, k, seed)]
    except ValueError as e:
        raise HarnessError(f"{prep.mcfg.key}: search.cv_folds {k}: {e}") from None


@dataclass
class FoldObjective:
    """A trial's score over its folds: the fold-mean validation curve at its best epoch."""

    value: float
    epoch: int
    per_fold: list[float]

    @property
    def std(self) -> float:
        return float(np.std(self.per_fold))


def fold_objective(results: list[FitResult], objective: str) -> FoldObjective:
    """For one fold this is the best epoch's value (as Keras' EarlyStopping would pick); for K folds the epoch where
    the mean curve is best, so the K heads are judged, and later trained, at one common epoch count."""
    curves = np.array([r.history[objective] for r in results])
    mean = curves.mean(axis=0)
    e = int(np.argmin(mean) if minimised(objective) else np.argmax(mean))
    return FoldObjective(float(mean[e]), e, [float(v) for v in curves[:, e]])


def mean_result(results: list[FitResult]) -> FitResult:
    """The folds' histories averaged epoch by epoch, for one metric history per trial in MLflow."""
    r0 = results[0]
    history = {k: list(np.mean([r.history[k] for r in results], axis=0)) for k in r0.history}
    return FitResult(
        history, r0.epoch_seconds, r0.seconds, sum(r.n_train for r in results), r0.monitor, r0.best_epoch, r0.jit
    )


class HeadHyperModel(kt.HyperModel):
    """Search space from the recipe. `units_i` lives in a conditional scope on depth, so it is absent (not logged)
    from trials whose head has fewer than i+1 layers."""

    stage = "head"

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
        if not self.prep.on_features:  # trainable backbone: every model starts from the same pretrained weights
            self.prep = refresh_backbone(self.prep)
        model, _ = self.prep.build(head)
        return model

    def build_folds(self, hp, n: int) -> list[keras.Model]:
        return [self.build(hp) for _ in range(n)]

    def fit_folds(self, hp, models, folds, epochs, seed, monitor, restore_best) -> list[FitResult]:
        tcfg = self.prep.recipe.training_for(self.prep.mcfg)
        head_cfg, lr = head_from_values(clean_values(hp.values), self.space)
        return fit_on(
            self.prep,
            models,
            head_cfg.pooling,
            folds,
            epochs,
            tcfg.batch_size,
            optimizer_factory(tcfg.optimizer, lr),
            seed,
            monitor=monitor,
            restore_best=restore_best,
        )


ORACLES = {
    "random": kt.oracles.RandomSearchOracle,
    "bayesian": kt.oracles.BayesianOptimizationOracle,
    "hyperband": kt.oracles.HyperbandOracle,
}


def _atomic(base: type) -> type:
    """An oracle whose state files are replaced atomically: Keras Tuner truncates and rewrites `oracle.json` and
    `trial.json` in place, and a kill in between would leave a search that cannot be reloaded."""

    class AtomicOracle(base):
        def save(self):
            atomic_json(self._get_oracle_fname(), self.get_state())

        def _save_trial(self, trial):
            atomic_json(os.path.join(self._get_trial_dir(trial.trial_id), "trial.json"), trial.get_state())

    AtomicOracle.__name__ = f"Atomic{base.__name__}"
    return AtomicOracle


class TrackedTuner(kt.Tuner):
    """Runs each trial itself (the documented `run_trial` hook): builds a model per fold, trains them together with
    the harness's compiled loop, scores the fold-mean curve, records the trial as one nested MLflow run written in
    one batch, and returns the objective.

    Resumable: a trial whose run FINISHED is not trained again (its recorded objective is returned, so a trial
    whose end the tuner state missed is not run twice); a trial whose run was cut short gets a new run in its place.
    No per-epoch checkpoint files: only Hyperband reads a trial's weights back (to continue it in a later bracket),
    so only Hyperband trials save theirs, once per fold, at their best epoch."""

    def __init__(
        self,
        *args,
        folds: list[Fold],
        parent_run_id: str | None,
        trial_seed: int,
        epochs: int,
        deadline: float | None = None,
        worker: str | None = None,
        tuner_id: str | None = None,
        **kwargs,
    ):
        # Keras Tuner 1.4.8 looks for the state file to reload before it sets `tuner_id`: a resumed chief
        # ("chief.json") found nothing and started its oracle over, handing out again the trials it had given.
        self._state_name = tuner_id or "tuner0"
        super().__init__(*args, tuner_id=tuner_id, **kwargs)
        self.folds, self.parent_run_id, self.trial_seed, self.epochs = folds, parent_run_id, trial_seed, epochs
        self.deadline, self.worker = deadline, worker
        self.longest_trial = 0.0  # seconds; the time budget is judged by it before each new trial

    def save(self):
        atomic_json(self._get_tuner_fname(), self.get_state())

    def _get_tuner_fname(self):
        return os.path.join(str(self.project_dir), f"{self._state_name}.json")

    def checkpoint(self, trial_id: str, k: int) -> str:
        return os.path.join(self.get_trial_dir(trial_id), f"fold{k}.weights.h5")

    def run_trial(self, trial, *args, **kwargs):
        objective = self.oracle.objective.name
        try:
            if self.parent_run_id is None:  # an untracked search (the nested estimate's inner searches)
                return self._run(trial, None)
            # Asked afresh for every trial: with several workers, another process may have recorded it meanwhile.
            done = trial_runs(self.parent_run_id, self.hypermodel.stage).get(trial.trial_id)
            complete = done is not None and f"{schema.TRIAL_BEST}{objective}" in done.data.metrics
            if complete and done.info.status == "FINISHED":
                m = done.data.metrics
                log.info(
                    "%s trial %s: recorded already (%s %.4f), not run again",
                    self.hypermodel.stage,
                    trial.trial_id,
                    objective,
                    m[f"{schema.TRIAL_BEST}{objective}"],
                )
                return {
                    objective: m[f"{schema.TRIAL_BEST}{objective}"],
                    "best_epoch": m.get("best_epoch", 0.0),
                    "cv_std": m.get(f"{schema.CV_STD}{objective}", 0.0),
                    **({PRUNED: 1.0} if done.data.tags.get(PRUNED) == "true" else {}),
                }
            if done is not None:  # cut short by a kill or a failure: its partial record makes way for the rerun
                tracking.client().delete_run(done.info.run_id)
            tags = {
                schema.KIND: schema.TRIAL,
                schema.TRIAL_ID: trial.trial_id,
                schema.STAGE: self.hypermodel.stage,
                schema.PARENT: self.parent_run_id,
                schema.WORKER: self.worker or "local",
                **{k: str(v) for k, v in trial.hyperparameters.values.items() if k.startswith("tuner/")},
            }
            with tracking.run(f"{self.hypermodel.stage} trial {trial.trial_id}", nested=True, tags=tags) as active:
                return self._run(trial, active.info.run_id)
        except (HarnessError, OSError) as e:
            # Bad input or a full disk is not bad luck: another trial would fail the same way, so the search
            # stops (the trial stays open in the tuner's state and is run again on resume). A worker cannot stop
            # the chief's search: it reports the trial FAILED, and the chief's failure limit ends the search.
            if self.worker is not None:
                raise kt.errors.FailedTrialError(f"{type(e).__name__}: {e}") from e
            raise kt.errors.FatalError(str(e)) from e
        except Exception as e:
            # Recorded FAILED (by tracking.run) with its error; FailedTrialError makes the tuner count it
            # towards max_consecutive_failed_trials instead of retrying it forever.
            raise kt.errors.FailedTrialError(f"{type(e).__name__}: {e}") from e

    def _run(self, trial, run_id: str | None) -> dict:
        t0 = time.perf_counter()
        hp, objective = trial.hyperparameters, self.oracle.objective.name
        seed = self.trial_seed + int(trial.trial_id)
        keras.backend.clear_session()
        keras.utils.set_random_seed(seed)
        values = clean_values(hp.values)
        hyperband = "tuner/epochs" in hp.values
        initial = int(hp.values.get("tuner/initial_epoch", 0))
        epochs = int(hp.values.get("tuner/epochs", self.epochs))
        models = self.hypermodel.build_folds(hp, len(self.folds))
        if "tuner/trial_id" in hp.values:
            for k, m in enumerate(models):
                m.load_weights(self.checkpoint(hp.values["tuner/trial_id"], k))
        results = self.hypermodel.fit_folds(hp, models, self.folds, epochs - initial, seed, objective, hyperband)
        if hyperband:
            for k, m in enumerate(models):
                m.save_weights(self.checkpoint(trial.trial_id, k))
        score = fold_objective(results, objective)
        seconds = time.perf_counter() - t0
        self.longest_trial = max(self.longest_trial, seconds)
        pruned = any(r.stopped == "pruned" for r in results)
        if run_id is not None:
            if pruned:  # a finished run, marked: its objective is that of the epochs it ran, and it is never chosen
                mlflow.set_tag(PRUNED, "true")
            train_s = results[0].seconds
            mlflow.log_params({f"{schema.HP}{k}": v for k, v in values.items()})
            tracking.log_fit(mean_result(results), offset=initial, run_id=run_id)
            mlflow.log_metrics(
                {
                    "trial_seconds": seconds,
                    "best_epoch": initial + score.epoch,
                    "images_per_s": sum(r.n_train for r in results) * (epochs - initial) / train_s,
                    "folds": len(results),
                    f"{schema.CV_STD}{objective}": score.std,
                    **{f"fold{k}.{objective}": v for k, v in enumerate(score.per_fold)},
                }
            )
            # last: its presence marks a complete record
            mlflow.log_metric(f"{schema.TRIAL_BEST}{objective}", score.value)
        log.info(
            "%s trial %s: %s %.4f%s in %.1f s%s  %s",
            self.hypermodel.stage,
            trial.trial_id,
            objective,
            score.value,
            f" ± {score.std:.4f} over {len(results)} folds" if len(results) > 1 else "",
            seconds,
            f", pruned after {results[0].epochs} epochs" if pruned else "",
            values,
        )
        out = {objective: score.value, "best_epoch": float(initial + score.epoch), "cv_std": score.std}
        return {**out, PRUNED: 1.0} if pruned else out

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        if STOP.is_set():  # Ctrl-C: this trial is recorded; no new one starts
            self.oracle.max_trials = len(self.oracle.trials)
        elif self.deadline is not None and time.monotonic() + self.longest_trial > self.deadline:
            # The budget is honoured to the trial: no trial starts that the time left could not hold, judged by the
            # longest trial so far.
            self.oracle.max_trials = len(self.oracle.trials)
            log.info(
                "%s stage: the time budget holds no further trial after %d trials",
                self.hypermodel.stage,
                len(self.oracle.trials),
            )


def trial_runs(parent_run_id: str, stage: str = "head") -> dict:
    """trial_id -> the run already recorded for that trial of one stage under a search run (deleted runs aside)."""
    runs = tracking.client().search_runs(
        [mlflow.get_run(parent_run_id).info.experiment_id],
        filter_string=f"{schema.parent_filter(parent_run_id)} and {schema.kind_filter(schema.TRIAL)}",
        max_results=50000,
    )
    return {r.data.tags[schema.TRIAL_ID]: r for r in runs if r.data.tags.get(schema.STAGE, "head") == stage}


def mark_orphans_killed(parent_run_id: str, trials: bool = True) -> int:
    """Child runs left RUNNING by a killed process (kill -9 leaves no chance to end them) become KILLED; with
    `trials` False, trial runs are left to the workers that may still be running them."""
    c, n = tracking.client(), 0
    exp = mlflow.get_run(parent_run_id).info.experiment_id
    for r in c.search_runs([exp], filter_string=schema.parent_filter(parent_run_id)):
        if r.info.status == "RUNNING" and (trials or r.data.tags.get(schema.KIND) != schema.TRIAL):
            c.set_terminated(r.info.run_id, "KILLED")
            n += 1
    return n


def make_tuner(
    hypermodel,
    space: SearchConfig,
    project_dir,
    *,
    parent_run_id: str | None,
    resume: bool,
    epochs: int,
    max_trials: int,
    folds: list[Fold],
    deadline: float | None = None,
    tuner: str | None = None,
    role: str | None = None,
):
    """A Keras Tuner search of the recipe's kind (its oracle built here, with atomic state files), tracked in MLflow
    under `parent_run_id`, its state in `project_dir` (reloaded when `resume`). `role` "chief" serves the oracle to
    workers (`harness.training.distributed.robust`); any other role is a worker's id: its oracle is the chief's, over
    gRPC (Keras Tuner swaps it in when KERASTUNER_ORACLE_IP is set), and its state is never overwritten."""
    kind = tuner or space.tuner
    kwargs = dict(
        objective=kt.Objective(space.objective, "min" if minimised(space.objective) else "max"),
        seed=space.seed,
        max_consecutive_failed_trials=space.max_consecutive_failures,
    )
    if kind == "hyperband":
        kwargs.update(max_epochs=epochs, factor=space.hyperband_factor)
    else:
        kwargs.update(max_trials=max_trials)
    cls = _atomic(ORACLES[kind])
    if role == "chief":
        from harness.training.distributed import robust

        # A lost worker's trial is handed to another worker once; failures are counted by the robust oracle,
        # which stops the search instead of raising inside the gRPC handler.
        cls = robust(cls)
        kwargs.update(max_retries_per_trial=1, max_consecutive_failed_trials=None)
    oracle = cls(**kwargs)
    if role == "chief":
        oracle.consecutive_failures_limit = space.max_consecutive_failures
        oracle.verbose = 0  # the harness logs trials itself; Keras Tuner's display would print them again
    return TrackedTuner(
        oracle=oracle,
        hypermodel=hypermodel,
        directory=str(project_dir.parent),
        project_name=project_dir.name,
        overwrite=not resume and role in (None, "chief"),
        worker=role if role not in (None, "chief") else None,
        tuner_id=role,
        folds=folds,
        parent_run_id=parent_run_id,
        trial_seed=space.seed,
        epochs=epochs,
        deadline=deadline,
    )


def run_search(tuner) -> None:
    """Run (or continue) a search; bad input and failed writes surface as themselves, and a Ctrl-C that asked for a
    graceful stop ends it here, after the trial that was running."""
    try:
        tuner.search(verbose=0)  # the tuner holds the prepared data; its trials read their folds from it
    except kt.errors.FatalError as e:
        if isinstance(e.__cause__, HarnessError | OSError):
            raise e.__cause__ from None
        raise
    check_interrupt()


@dataclass
class Best:
    """A finished search's best trial: its hyperparameters, objective (fold mean), the epoch the folds chose (its
    index) and the spread of the objective over the folds."""

    values: dict
    score: float
    epoch: int
    std: float


def is_pruned(trial) -> bool:
    return trial.metrics.exists(PRUNED) and bool(trial.metrics.get_last_value(PRUNED))


def best_of(tuner, key: str) -> Best:
    """The best completed trial that was not pruned."""
    completed = [t for t in tuner.oracle.trials.values() if t.status == "COMPLETED" and not is_pruned(t)]
    if not completed:
        raise HarnessError(f"{key}: no trial completed; see the failed trial runs in MLflow for errors")
    best = next(t for t in tuner.oracle.get_best_trials(len(tuner.oracle.trials)) if not is_pruned(t))
    return Best(
        clean_values(best.hyperparameters.values),
        float(best.score),
        int(best.metrics.get_last_value("best_epoch")),
        float(best.metrics.get_last_value("cv_std") or 0.0),
    )
