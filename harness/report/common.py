"""What every part of the report shares: number formats (one per kind of number, so a number shown twice reads the
same), test metrics recomputed from the logged predictions, the exact McNemar test of two models, and the order of a
task's models (by the validation objective that chose them, never by test accuracy)."""

from __future__ import annotations

import numpy as np

from harness.evaluation.metrics import mcnemar, metrics
from harness.recipe import minimised
from harness.report.collect import ModelResult
from harness.tracking import schema

WEIGHTS_WORDS = {"imagenet": "ImageNet", "none": "random init", "file": "file"}
# The final evaluation's optional metric sets, a column each where some model has them.
EXTRA_SETS = (
    ("test_tta.accuracy", "accuracy with TTA"),
    ("test_view_tta.accuracy", "accuracy averaged over its training views"),
)
# The nested estimate's optional averaged sets (harness.stages.nested), a row each.
NESTED_SETS = (("nested_tta", "random augmented copies (TTA)"), ("nested_view_tta", "its training views"))


def num(x, nd: int = 3) -> str:
    """A metric (accuracy, F1, p-value with nd=4): a dash when absent or not finite."""
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{nd}f}"


def obj(x) -> str:
    """A validation objective (loss or accuracy), everywhere in the report in this one format."""
    return num(x, 4)


def exact(acc, low, high) -> str:
    """An accuracy with its exact (Clopper-Pearson) 95% CI: `0.917 [0.615, 0.998]`."""
    return f"{num(acc)} [{num(low)}, {num(high)}]"


def acc_cp(values: dict, prefix: str = "") -> str:
    """`accuracy [exact CI]` of a metric set (`prefix` "nested." reads nested.accuracy, nested.accuracy_cp_low...)."""
    return exact(
        values.get(f"{prefix}accuracy"), values.get(f"{prefix}accuracy_cp_low"), values.get(f"{prefix}accuracy_cp_high")
    )


def trial_number(trial) -> int | str:
    """A Keras Tuner trial id ("3", "03") as the integer the tables and the tuning figure both show."""
    try:
        return int(trial)
    except (TypeError, ValueError):
        return str(trial)


def paired(rows_a: list[dict], rows_b: list[dict]) -> dict | None:
    """Exact McNemar of two sets of per-image predictions, or None unless they cover the same test images."""
    a = {r["file"]: r["true"] == r["pred"] for r in rows_a}
    b = {r["file"]: r["true"] == r["pred"] for r in rows_b}
    if not a or set(a) != set(b):
        return None
    files = sorted(a)
    return mcnemar(np.array([a[f] for f in files]), np.array([b[f] for f in files]))


def test_metrics(m: ModelResult) -> dict:
    """Recomputed from the logged per-image predictions (and checked against the logged values by the tests)."""
    rows = m.split("test")
    if not rows:
        return {}
    classes = m.classes
    y = np.array([classes.index(r["true"]) for r in rows])
    proba = np.array([[r[f"p.{c}"] for c in classes] for r in rows])
    seed = int(m.params.get("data.seed", 0))
    return metrics(y, proba / proba.sum(axis=1, keepdims=True), classes, seed=seed)


def objective_name(m: ModelResult) -> str:
    if m.search is not None:
        return m.search.data.params.get(schema.SEARCH_OBJECTIVE, "val_loss")
    found = (k.removeprefix(schema.SEARCH_PREFIX) for k in m.metrics if k.startswith(f"{schema.SEARCH_PREFIX}val_"))
    return m.params.get(schema.SEARCH_OBJECTIVE) or next(found, "val_loss")


def selection_value(m: ModelResult) -> float | None:
    """The validation objective that chose this model, as the champion rule reads it (`search.<objective>` of its
    final run; the search's best for older stores); None for a model nothing chose (`harness train`)."""
    name = objective_name(m)
    value = m.metrics.get(f"{schema.SEARCH_PREFIX}{name}")
    if value is None and m.search is not None:
        value = m.search.data.metrics.get(f"{schema.BEST}{name}")
    return None if value is None or not np.isfinite(value) else float(value)


def ordered(models: list[ModelResult]) -> list[ModelResult]:
    """Models by the validation objective that chose them, best first (unchosen last, then by key): the order of
    every table and figure of a task, never test accuracy."""

    def key(m: ModelResult):
        v = selection_value(m)
        if v is None:
            return (1, 0.0, m.key)
        return (0, v if minimised(objective_name(m)) else -v, m.key)

    return sorted(models, key=key)


def tasks_of(models: list[ModelResult]) -> list[str]:
    return sorted({m.task for m in models})


def selection(m: ModelResult) -> str:
    """What chose this model: the search objective of its best trial, over the K folds or on the val split."""
    if schema.ENSEMBLE_MEMBERS in m.tags:  # no search: its members' validation predictions averaged chose it
        return f"{objective_name(m)} {obj(selection_value(m))} of its members' validation predictions"
    if not m.search:
        return "not searched"
    name = objective_name(m)
    folds = int(m.search.data.metrics.get(f"{schema.BEST}folds", 1))
    std = m.search.data.metrics.get(f"{schema.BEST}{schema.CV_STD}{name}")
    where = f" ± {obj(std)} over {folds} folds" if folds > 1 else " on the val split"
    return f"{name} {obj(selection_value(m))}{where}"


def final_words(m: ModelResult) -> str:
    mode, n = m.tags.get(schema.FINAL_MODE, "single"), m.tags.get(schema.FINAL_MEMBERS, "1")
    words = {
        "single": "one head, best val epoch",
        "ensemble": f"{n} fold heads averaged",
        "refit": "refit on train+val",
    }.get(mode, mode)
    words += ", fine-tuned" if m.tags.get(schema.FINAL_STAGE) == "finetune" else ""
    if schema.ENSEMBLE_MEMBERS in m.tags:
        return f"average of {m.tags[schema.ENSEMBLE_MEMBERS]} ({words})"
    return words


def hyperparameters(m: ModelResult) -> str:
    return (
        ", ".join(f"{k.removeprefix(schema.HP)}={v}" for k, v in sorted(m.params.items()) if k.startswith(schema.HP))
        or (f"average of {m.tags[schema.ENSEMBLE_MEMBERS]}" if schema.ENSEMBLE_MEMBERS in m.tags else "")
        or f"head {m.params.get('head.units', '?')}, dropout {m.params.get('head.dropout', '?')}, "
        f"lr {m.params.get('training.learning_rate', '?')} (not tuned)"
    )


def weights_words(m: ModelResult) -> str:
    sha = m.tags.get(schema.WEIGHTS_SHA256, "")
    origin = m.tags.get(schema.WEIGHTS_ORIGIN, "")
    named = m.tags.get(schema.WEIGHTS, "")
    if not named:
        return "its members'" if schema.ENSEMBLE_MEMBERS in m.tags else "?"
    words = WEIGHTS_WORDS.get(named, named)
    return words + (f" ({origin + ', ' if origin and origin != 'random init' else ''}sha256 {sha[:12]})" if sha else "")


def champion_key(study, task: str) -> str | None:
    """The model key the task's `champion` alias holds (read from the registry by `compare`), or None."""
    c = (study.champions or {}).get(task)
    return c["model_key"] if c else None
