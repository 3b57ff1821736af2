"""The model registry: each task's registered model `<study>-<task>` and its `champion` alias, given to the final
model with the best validation objective (test metrics are never read)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import mlflow

from harness.recipe import minimised
from harness.tracking import runs as tracking
from harness.tracking import schema

log = logging.getLogger(__name__)

CHAMPION = "champion"


@dataclass
class Candidate:
    """A registered final model competing for its task's champion alias."""

    task: str
    model_key: str
    name: str  # its registered model
    version: str
    run_id: str
    objective: str
    value: float

    def better_than(self, other: Candidate) -> bool:
        return self.value < other.value if minimised(self.objective) else self.value > other.value


def choose(candidates: list[Candidate]) -> Candidate:
    """The best validation objective; ties keep the first (sorted by model key). Test metrics are never read."""
    best = candidates[0]
    for c in candidates[1:]:
        if c.better_than(best):
            best = c
    return best


def candidates(finals: list) -> dict[str, list[Candidate]]:
    """Per task, the registered final models among `finals` with the validation objective their search chose them
    by (a `harness train` run is neither registered nor chosen: left out)."""
    c = tracking.client()
    by_task: dict[str, list[Candidate]] = {}
    for run in finals:
        name = run.data.tags.get(schema.REGISTERED_MODEL)
        found = (
            k.removeprefix(schema.SEARCH_PREFIX)
            for k in run.data.metrics
            if k.startswith(f"{schema.SEARCH_PREFIX}val_")
        )
        objective = next(found, None)
        if not name or objective is None:
            continue  # a `harness train` run: not registered, nothing chose it
        versions = c.search_model_versions(f"name = '{name}' and run_id = '{run.info.run_id}'")
        if not versions:
            continue
        by_task.setdefault(run.data.tags[schema.TASK], []).append(
            Candidate(
                run.data.tags[schema.TASK],
                run.data.tags[schema.MODEL_KEY],
                name,
                versions[0].version,
                run.info.run_id,
                objective,
                float(run.data.metrics[f"{schema.SEARCH_PREFIX}{objective}"]),
            )
        )
    return by_task


def crown_champions(study: str, finals: list, *, barred: frozenset[str] = frozenset()) -> dict[str, dict]:
    """Per task, give the final model with the best validation objective the alias `champion` on the task's
    registered model `<study>-<task>` (a version pointing at that model). The alias moves only when a strictly
    better model exists, or when its holder's run is `barred` (over the study's latency budget; `finals` then holds
    only the models within it); returns per task what holds it and why."""
    c = tracking.client()
    by_task = candidates(finals)
    out = {}
    for task, cands in sorted(by_task.items()):
        best = choose(sorted(cands, key=lambda x: x.model_key))
        task_name = f"{study}-{task}"
        current = _current(c, task_name)
        moved = current is None or current.run_id in barred
        moved = moved or (current.run_id != best.run_id and best.better_than(current))
        if moved:
            if c.search_registered_models(f"name = '{task_name}'") == []:
                c.create_registered_model(
                    task_name,
                    description=f"The champion of study {study}, {task}: the final "
                    "model with the best validation objective (the champion stage of `harness tune`).",
                )
            v = c.create_model_version(
                task_name,
                f"models:/{best.name}/{best.version}",
                run_id=best.run_id,
                tags={
                    "model_key": best.model_key,
                    "source_model": f"{best.name}/{best.version}",
                    "selection.objective": best.objective,
                    "selection.value": str(best.value),
                },
            )
            c.set_registered_model_alias(task_name, CHAMPION, v.version)
            current = _current(c, task_name)
            log.info("champion of %s: %s (%s %.4f)", task, best.model_key, best.objective, best.value)
        out[task] = {**held(task_name, current, len(cands)), "moved": moved}
    return out


def held(task_name: str, current: Candidate, candidates: int) -> dict:
    """What holds a task's `champion` alias, as the report and the log tell it."""
    return {
        "uri": f"models:/{task_name}@{CHAMPION}",
        "version": current.version,
        "model_key": current.model_key,
        "source": current.name,
        "objective": current.objective,
        "value": current.value,
        "candidates": candidates,
    }


def _current(c, task_name: str) -> Candidate | None:
    """The version that holds the alias now, as a candidate (what chose it is recorded on its tags); `name` is the
    registered model version it points at."""
    try:
        v = c.get_model_version_by_alias(task_name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None
    return Candidate(
        task_name,
        v.tags.get("model_key", "?"),
        v.tags.get("source_model", "?"),
        v.version,
        v.run_id,
        v.tags.get("selection.objective", "val_loss"),
        float(v.tags.get("selection.value", "nan")),
    )


def champions(study: str, finals: list) -> dict[str, dict]:
    """Per task, what holds the `champion` alias now and whether it is the best of `finals` (read-only: the report
    reads this; `harness.stages.champion` moves the alias)."""
    c = tracking.client()
    out = {}
    for task, cands in sorted(candidates(finals).items()):
        current = _current(c, f"{study}-{task}")
        if current is None:
            continue
        best = choose(sorted(cands, key=lambda x: x.model_key))
        best_now = current.run_id == best.run_id or not best.better_than(current)
        out[task] = {**held(f"{study}-{task}", current, len(cands)), "best_now": best_now}
    return out


def latest_finals(study: str) -> list:
    """The newest FINISHED final run of each model of a study (a resumed or repeated search leaves older ones)."""
    c = tracking.client()
    exp = c.get_experiment_by_name(study)
    if exp is None:
        return []
    runs = c.search_runs(
        [exp.experiment_id],
        filter_string=f"{schema.kind_filter(schema.FINAL)} and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=5000,
    )
    newest: dict[str, object] = {}
    for r in runs:
        newest.setdefault(r.data.tags.get(schema.MODEL_KEY, "?"), r)
    return list(newest.values())


def drop_champion(study: str, task: str) -> None:
    """No model of the task is eligible (all over the budget): no version holds `champion`."""
    c = tracking.client()
    with contextlib.suppress(mlflow.exceptions.MlflowException):  # no alias (or no registered model) to drop
        c.delete_registered_model_alias(f"{study}-{task}", CHAMPION)
