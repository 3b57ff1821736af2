"""Where the numbers come from, each a folded section at the report's end: the source audit (can the image's source
stand in for its label?), device and timing, and the data (class counts, preprocessing, duplicates)."""

from __future__ import annotations

from harness.report.collect import ModelResult, Study
from harness.report.common import num, tasks_of
from harness.report.render import h, p, table
from harness.report.sections import by_task, section
from harness.tracking import schema


def _modes(m: ModelResult) -> list[str]:
    """The original colour modes of a task's images (the source signature the feature audit recognises)."""
    return sorted({mode for per_class in m.data.get("modes", {}).values() for mode in per_class})


def _audit_words(a: dict, best: float) -> str:
    from harness.stages.audit import REACHES

    meta = a["meta"]
    words = (
        f"Metadata alone reaches the models' accuracy ({num(meta['accuracy'])} against at best "
        f"{num(best)} on test): this data cannot tell disease from source, and these models' scores say "
        f"nothing about disease."
        if meta["accuracy"] >= best - REACHES
        else f"Metadata alone stays below the models ({num(meta['accuracy'])} against {num(best)})."
    )
    flagged = [c for c, v in a["meta_per_class"].items() if v["recall"] >= 0.9 and v["precision"] >= 0.9]
    if flagged:
        words += f" The source signature alone identifies {', '.join(flagged)} (recall and precision at least 0.9)."
    return words


def _audit_task(task: str, ms: list[ModelResult], computed: dict) -> list:
    a = ms[0].audit  # the metadata part depends only on the task's images
    meta = a["meta"]
    best = max(computed[m.key].get("accuracy", 0.0) for m in ms)
    blocks = [
        h(f"Task {task}", 3),
        p(
            f"Source signature only ({', '.join(a['signature'])}), a random forest, cross-validated on "
            f"train+validation (n={meta['n']}): accuracy {num(meta['accuracy'])} [exact 95% CI "
            f"{num(meta['accuracy_cp_low'])}, {num(meta['accuracy_cp_high'])}]; per class recall "
            + ", ".join(f"{c} {num(v['recall'], 2)}" for c, v in a["meta_per_class"].items())
            + ". "
            + _audit_words(a, best)
        ),
    ]
    with_source = [m for m in ms if "source_from_features" in m.audit]
    if not with_source:
        modes = _modes(ms[0])
        blocks.append(
            p(
                f"Every image of this task has the same original colour mode ({', '.join(modes) or '?'}): there is "
                f"one source only, so no backbone's features are asked to recognise it."
            )
        )
        return blocks
    rows = [
        [
            m.key,
            num(computed[m.key].get("accuracy")),
            f"{num(m.audit['source_from_features']['accuracy'])} (majority {num(m.audit['source_majority'])})"
            if m in with_source
            else "—",
        ]
        for m in ms
    ]
    headers = ["model", "test accuracy", "source (colour mode) from its backbone features, CV accuracy"]
    return blocks + [table(headers, rows, f"audit-{task}")]


def audit(models: list[ModelResult], computed: dict) -> list:
    blocks = []
    for task in tasks_of(models):
        ms = [m for m in by_task(models) if m.task == task and m.audit]
        if ms:
            blocks += _audit_task(task, ms, computed)
    if not blocks:
        return []
    intro = p(
        "How far the image's source explains the labels: a classifier on file metadata alone, and how well each "
        "backbone's features recognise the source (the original colour mode)."
    )
    return section("Source audit", [intro, *blocks])


def _cpu_gpu(study: Study) -> list:
    by_key: dict[str, dict[str, float]] = {}
    for r in study.device_runs:
        s = r.data.metrics.get("seconds_per_epoch")
        if s:
            by_key.setdefault(r.data.tags.get(schema.MODEL_KEY, "?"), {}).setdefault(
                r.data.tags.get(schema.DEVICE, "?"), s
            )
    side = [
        [k, num(d["CPU"], 3), num(d["GPU"], 3), f"{d['CPU'] / d['GPU']:.1f}x"]
        for k, d in sorted(by_key.items())
        if "CPU" in d and "GPU" in d
    ]
    if side:
        return [
            h("CPU vs GPU (same model and recipe)", 3),
            table(["model", "CPU s/epoch", "GPU s/epoch", "GPU speed-up"], side, "cpu-gpu"),
        ]
    return [
        p(
            "No model of this study has runs on both a CPU and a GPU yet; run the same recipe on a GPU "
            "machine into the same store to get the side-by-side speed-up."
        )
    ]


def timing_blocks(models: list[ModelResult], study: Study) -> list:
    rows = []
    for m in by_task(models):
        mt = m.metrics
        search_s = m.search.data.metrics.get("search_seconds") if m.search else None
        rows.append(
            [
                m.key,
                m.tags.get(schema.DEVICE, "?"),
                m.tags.get(schema.DEVICE_NAME, "?"),
                num(mt.get("seconds_per_epoch"), 3),
                num(mt.get("images_per_s"), 1),
                num(mt.get("extract_seconds"), 1),
                m.tags.get(schema.FEATURE_CACHE, "—"),
                num(search_s, 1),
                num(mt.get("train_seconds"), 1),
            ]
        )
    headers = ["model", "device", "device name", "s/epoch (final fit)", "images/s", "feature extraction s"]
    headers += ["feature cache", "search s", "final fit s"]
    return [table(headers, rows, "timing"), *_cpu_gpu(study)]


def timing(models: list[ModelResult], study: Study) -> list:
    return section("Device and timing", timing_blocks(models, study))


def _data_task(task: str, m: ModelResult) -> list:
    d = m.data
    rows = [
        [s] + [d["counts"][s].get(c, 0) for c in d["classes"]] + [sum(d["counts"][s].values())]
        for s in ("train", "val", "test")
    ]
    dup = d.get("duplicates", [])
    cross = [x for x in dup if x["cross_split"]]
    modes = "; ".join(f"{c}: " + ", ".join(f"{k} {v}" for k, v in md.items()) for c, md in d["modes"].items())
    blocks = [
        h(f"Task {task}", 3),
        table(["split"] + d["classes"] + ["total"], rows, f"counts-{task}"),
        p(
            f"Test split: {d['test_source']}. Preprocessing: {m.params.get('model.image_size')} px, colour "
            f"policy '{m.params.get('model.colour') or m.params.get('data.colour')}' (greyscale replicated to 3 "
            f"channels by default), the backbone's own input scaling inside the model. Original colour modes per "
            f"class: {modes}"
        ),
        p(
            f"Duplicates: {sum(x['kind'] == 'exact' for x in dup)} exact and "
            f"{sum(x['kind'] == 'near' for x in dup)} near-duplicate pairs; {len(cross)} cross splits."
            + (f" Skipped files: {len(d['skipped'])}." if d.get("skipped") else "")
        ),
    ]
    if cross:
        blocks.append(
            table(
                ["a", "b", "kind", "distance", "splits"],
                [[x["a"], x["b"], x["kind"], x["distance"], x["splits"]] for x in cross[:20]],
                f"leaks-{task}",
            )
        )
    return blocks


def data(models: list[ModelResult]) -> list:
    blocks = []
    for task in tasks_of(models):
        ms = [x for x in models if x.task == task]
        blocks += _data_task(task, next((x for x in ms if schema.ENSEMBLE_MEMBERS not in x.tags), ms[0]))
    return section("Data", blocks)
