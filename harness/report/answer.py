"""The answer first: per task one sentence (the champion, its test accuracy with its exact CI, whether it beats its
floor and the runner-up on the same test images, the nested estimate), a forest plot of every model's test accuracy,
and a compact table in the order of the selection objective with the champion marked; a skipped model is one line."""

from __future__ import annotations

import re
from pathlib import Path

from harness.report import figures
from harness.report.collect import ModelResult, Study
from harness.report.common import (
    acc_cp,
    champion_key,
    exact,
    final_words,
    num,
    obj,
    objective_name,
    ordered,
    paired,
    selection_value,
    tasks_of,
)
from harness.report.render import h, img, p, table
from harness.tracking import schema

CHAMPION_MARK = "★ champion"


def _versus(res: dict | None, diff: float, what: str, value: str) -> str:
    """`significantly better than <what> (<value>, exact McNemar p=...)` and the like (A: the champion)."""
    if res is None:
        return f"not compared with {what} ({value}; different test images)"
    p_value = f"exact McNemar p={num(res['p_value'], 4)}"
    if res["p_value"] < 0.05:
        return f"significantly {'better' if diff > 0 else 'worse'} than {what} ({value}, {p_value})"
    return f"not significantly {'better' if diff >= 0 else 'worse'} than {what} ({value}, {p_value})"


def _floor_words(m: ModelResult, t: dict) -> str:
    if m.baseline is None:
        return "no floor on its features" + (" (an average of models)" if schema.ENSEMBLE_MEMBERS in m.tags else "")
    floor = m.baseline.data.metrics.get(f"{schema.TEST}accuracy")
    if floor is None:
        return "its floor has no test accuracy"
    res = paired(m.split("test"), m.baseline_predictions)
    what = f"logistic regression on the same features: {num(floor)}"
    return _versus(res, t["accuracy"] - floor, "its floor", what)


def _runner_up_words(champ: ModelResult, ms: list[ModelResult], computed: dict) -> str:
    others = [m for m in ms if m.key != champ.key]
    if not others:
        return "no runner-up (one model)"
    runner = others[0]
    acc = computed[runner.key].get("accuracy")
    res = paired(champ.split("test"), runner.split("test"))
    diff = computed[champ.key]["accuracy"] - (acc if acc is not None else 0.0)
    return _versus(res, diff, f"the runner-up {runner.key}", num(acc))


def _chosen_words(study: Study, task: str, champ: ModelResult, ms: list[ModelResult]) -> str:
    name = objective_name(champ)
    c = study.champions.get(task)
    if ms[0].key == champ.key:
        return f"the best {name} of {len(ms)} model{'s' if len(ms) > 1 else ''}, {obj(selection_value(champ))}"
    return (
        f"its alias holds {name} {obj(c['value'])}, an earlier version; {ms[0].key} leads the current runs with "
        f"{obj(selection_value(ms[0]))}"
    )


def _has_alias(study: Study, task: str, ms: list[ModelResult]) -> bool:
    return champion_key(study, task) in {m.key for m in ms}


def answer_sentence(study: Study, task: str, ms: list[ModelResult], computed: dict) -> str:
    """One sentence: what won the task, how well it does on test, against its floor and the runner-up, and how good
    the procedure is (the nested estimate). `ms` in selection order."""
    champ = champion_of(study, task, ms)
    t = computed[champ.key]
    if not t:
        return f"{champ.key} is the champion of task {task}, but it has no test predictions logged."
    nested = (
        f"nested CV estimate of the procedure {acc_cp(champ.nested.data.metrics, schema.NESTED_PREFIX)}"
        if champ.nested is not None
        else "no nested estimate (search.nested_cv not set)"
    )
    who = (
        f"{champ.key} is the champion ({_chosen_words(study, task, champ, ms)})"
        if _has_alias(study, task, ms)
        else f"{champ.key} leads by {objective_name(champ)} ({obj(selection_value(champ))}; no model here holds a "
        f"champion alias)"
    )
    return (
        f"{who} with test accuracy "
        f"{exact(t['accuracy'], t.get('accuracy_cp_low'), t.get('accuracy_cp_high'))} (exact 95% CI, "
        f"{t['n']} test images); {_floor_words(champ, t)}; {_runner_up_words(champ, ms, computed)}; {nested}."
    )


def champion_of(study: Study, task: str, ms: list[ModelResult]) -> ModelResult:
    """The model holding the task's champion alias, else the first by the selection objective."""
    key = champion_key(study, task)
    return next((m for m in ms if m.key == key), ms[0])


def forest(study: Study, task: str, ms: list[ModelResult], computed: dict, out: Path):
    champ = champion_of(study, task, ms)
    rows = []
    for m in ms:
        t = computed[m.key]
        if not t:
            continue
        n = m.nested.data.metrics if m.nested is not None else {}
        nested = schema.NESTED_PREFIX + "accuracy"
        rows.append(
            {
                "label": f"{m.key}{' ★' if m.key == champ.key else ''}\n{objective_name(m)} {obj(selection_value(m))}",
                "acc": t["accuracy"],
                "low": t["accuracy_cp_low"],
                "high": t["accuracy_cp_high"],
                "floor": m.baseline.data.metrics.get(f"{schema.TEST}accuracy") if m.baseline is not None else None,
                "nested": (n[nested], n[f"{nested}_cp_low"], n[f"{nested}_cp_high"]) if nested in n else None,
                "champion": m.key == champ.key,
            }
        )
    path = figures.forest(
        rows,
        f"Task {task}: test accuracy of every model (rows by {objective_name(ms[0])}, best on top)",
        out / f"forest-{task}.png",
    )
    return img(
        path,
        "Exact 95% CIs, rows in the order of the selection objective, the champion in red; grey squares: each "
        "model's floor on the same test images; green diamonds: the nested estimate with its exact CI, where run.",
        f"forest-{task}",
    )


def summary_table(study: Study, task: str, ms: list[ModelResult], computed: dict):
    classes = ms[0].classes
    champ = champion_of(study, task, ms)
    name = objective_name(ms[0])
    headers = [
        "model",
        f"{name} (selects)",
        "final model",
        "test accuracy [exact 95% CI]",
        "macro F1",
        *(["COVID-19 sensitivity"] if "covid" in classes else []),
        "champion",
    ]
    rows = []
    for m in ms:
        t = computed[m.key]
        row = [
            m.key,
            obj(selection_value(m)),
            final_words(m),
            exact(t.get("accuracy"), t.get("accuracy_cp_low"), t.get("accuracy_cp_high")),
            num(t.get("macro_f1")),
        ]
        if "covid" in classes:
            row.append(num(t.get("recall.covid")))
        rows.append(row + [CHAMPION_MARK if m.key == champ.key and _has_alias(study, task, ms) else ""])
    marked = [i for i, m in enumerate(ms) if m.key == champ.key and _has_alias(study, task, ms)]
    return table(headers, rows, f"summary-{task}", marked)


def short_reason(reason: str, limit: int = 120) -> str:
    """The gist of a skip reason in one short line: its first clause, web addresses reduced to their host."""
    gist = re.sub(r"https?://([^/\s]+)\S*", r"\1", reason)
    cuts = [i for i in (gist.find(" ("), gist.find("; "), gist.find(": ")) if i > 20]
    gist = gist[: min(cuts)] if cuts else gist
    return gist if len(gist) <= limit else gist[: limit - 1].rstrip() + "…"


def absent(study: Study) -> dict[str, str | None]:
    """Model key -> why it has no final run (None: not run yet), from the study's skip tags and missing list."""
    out: dict[str, str | None] = {}
    for entry in study.missing:
        key, _, rest = entry.partition(" (skipped: ")
        out[key] = rest[:-1] if rest.endswith(")") else (rest or None)
    return {**out, **study.skipped}


def absent_lines(study: Study, task: str | None) -> list:
    """One short line per model of `task` (None: of no task with models) that has no final run, and why."""
    tasks = tasks_of(study.models)
    lines = []
    for key, reason in absent(study).items():
        if next((t for t in tasks if key.startswith(f"{t}-")), None) != task:
            continue
        why = f"skipped: {short_reason(reason)}" if reason else "no final run yet"
        lines.append(p(f"Not in this report: {key} ({why}).", "note"))
    return lines


def summary(study: Study, computed: dict, out: Path) -> list:
    """The answer part of the report: per task its sentence, forest plot, compact table and absent models."""
    blocks = [h("Summary", 2)]
    for task in tasks_of(study.models):
        ms = ordered([m for m in study.models if m.task == task])
        classes = ms[0].classes
        blocks += [
            h(f"Task {task}: {', '.join(classes)}", 3),
            p(answer_sentence(study, task, ms, computed), "answer"),
            forest(study, task, ms, computed, out),
            summary_table(study, task, ms, computed),
            *absent_lines(study, task),
        ]
    return blocks + absent_lines(study, None)
