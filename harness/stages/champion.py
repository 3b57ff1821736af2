"""Champion stage, the study's last before its report: each task's `champion` alias moves to the final model with
the best validation objective among the study's newest final runs (ensembles included), never by a test metric.
With `registry.max_latency_ms` only models whose measured batch-1 latency is within the budget compete; what the
budget excluded, and why, is kept on the study's experiment for the report. The report only reads where the alias
is (`harness.tracking.registry.champions`)."""

from __future__ import annotations

import logging

from harness.recipe import Recipe, RegistryConfig
from harness.tracking import runs as tracking
from harness.tracking import schema
from harness.tracking.registry import crown_champions, drop_champion, latest_finals

log = logging.getLogger(__name__)


def latency_of(run, runtime: str) -> float | None:
    """The run's batch-1 median latency on `runtime` (ms), None when its export did not measure it."""
    return run.data.metrics.get(f"{schema.COST}{runtime}.b1.median_ms")


def within_budget(finals: list, budget: RegistryConfig) -> tuple[list, dict[str, list[str]]]:
    """(the final runs within the budget, per task a line per excluded model saying why)."""
    if budget.max_latency_ms is None:
        return finals, {}
    kept, excluded = [], {}
    for run in finals:
        ms = latency_of(run, budget.runtime)
        if ms is not None and ms <= budget.max_latency_ms:
            kept.append(run)
            continue
        why = "no latency measured" if ms is None else f"{ms:.1f} ms"
        key, task = run.data.tags.get(schema.MODEL_KEY, "?"), run.data.tags.get(schema.TASK, "?")
        excluded.setdefault(task, []).append(f"{key} ({why} > {budget.max_latency_ms:g} ms, {budget.runtime})")
    return kept, excluded


def crown_study(recipe: Recipe) -> dict[str, dict]:
    """Per task, what holds `champion` after this study's models, and whether it moved now."""
    finals = latest_finals(recipe.study)
    kept, excluded = within_budget(finals, recipe.registry)
    barred = frozenset(r.info.run_id for r in finals) - {r.info.run_id for r in kept}
    record_exclusions(recipe.study, excluded)
    crowned = crown_champions(recipe.study, kept, barred=barred)
    for task in sorted(excluded):
        if task not in crowned:
            log.warning("%s: every model is over the latency budget: no champion", task)
            drop_champion(recipe.study, task)
    for task, c in crowned.items():
        log.info("%s: champion %s (%s), %s", task, c["model_key"], c["uri"], "moved" if c["moved"] else "kept")
    return crowned


def record_exclusions(study: str, excluded: dict[str, list[str]]) -> None:
    """The budget's exclusions on the study's experiment (the report reads them); a task with none has no tag."""
    c = tracking.client()
    exp = c.get_experiment_by_name(study)
    for key in [k for k in exp.tags if k.startswith(schema.BUDGET_EXCLUDED_PREFIX)]:
        if key.removeprefix(schema.BUDGET_EXCLUDED_PREFIX) not in excluded:
            c.delete_experiment_tag(exp.experiment_id, key)
    for task, lines in excluded.items():
        c.set_experiment_tag(exp.experiment_id, f"{schema.BUDGET_EXCLUDED_PREFIX}{task}", "; ".join(lines)[:5000])
