"""A study's plan: the ordered stages each recipe model goes through, one `Stage` each, and the `Walk` they share.

A stage has a name, the kind of the run that marks it done under a model's search run, whether the recipe asks for it,
how to run it, and (for the stage whose summary the study returns) how to recall a run recorded already. Resume asks
each stage whether its run is there (`harness.study.run`); adding a stage touches `STAGES` only. After every model:
the recipe's ensembles, the champions, the model cards (`harness.study.run.tune`), then the report
(`harness.study.pipeline`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlflow

from harness.features.prepared import Prepared
from harness.stages.audit import audit
from harness.stages.floor import baseline
from harness.stages.nested import nested_estimate
from harness.stages.search import recall_final, search_and_finalize
from harness.tracking import schema


@dataclass
class Walk:
    """What a model's stages share: its preparation, its search run, its folds, and the summary they fill in."""

    prep: Prepared
    parent_id: str
    project_dir: Path
    resuming: bool
    folds: list
    max_trials: int
    dist: object | None = None  # harness.training.distributed.Distributed when the search is served to workers
    supervise: Callable | None = None
    result: dict = field(default_factory=dict)
    best: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str  # the run kind whose FINISHED run under the search run marks the stage done
    asked: Callable[[Prepared], bool]
    run: Callable[[Walk], None]
    recall: Callable[[Walk, object], None] | None = None  # the summary from a run recorded already


def _timed(name: str, fn: Callable[[Walk], object]) -> Callable[[Walk], None]:
    def run(walk: Walk) -> None:
        t0 = time.perf_counter()
        walk.result[name] = fn(walk)
        mlflow.log_metric(f"{name}_seconds", time.perf_counter() - t0)

    return run


def _on_features(prep: Prepared) -> bool:
    return prep.on_features  # the floor and the audit read the frozen backbone's feature store


STAGES: tuple[Stage, ...] = (
    Stage("final", schema.FINAL, lambda prep: True, search_and_finalize, recall_final),
    Stage("baseline", schema.BASELINE, _on_features, _timed("baseline", lambda w: baseline(w.prep, w.parent_id))),
    Stage("audit", schema.AUDIT, _on_features, _timed("audit", lambda w: audit(w.prep, w.parent_id))),
    Stage(
        "nested",
        schema.NESTED,
        lambda prep: bool(prep.recipe.search.nested_cv),
        _timed(
            "nested",
            lambda w: nested_estimate(w.prep, w.parent_id, w.prep.recipe.search.nested_cv, w.project_dir, w.resuming),
        ),
    ),
)
STAGE_KINDS = tuple(s.kind for s in STAGES)
# a stage's own child runs that a cut-short resume discards with it (the fine-tuning search's summary run)
DISCARDED_KINDS = (*STAGE_KINDS, schema.FINETUNE)
