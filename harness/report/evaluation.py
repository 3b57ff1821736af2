"""The report's evaluation sections of one task, read from its final runs: calibration before and after temperature
scaling, the operating point chosen on out-of-fold predictions, the decision curve, the test images every model or
only the champion gets wrong (with Grad-CAM of the champion on them where the images can be read) and the model
cards.

Every number is recomputed from the logged per-image predictions where they are there (so the tables agree with
each other and with the summary), and read from the run's metrics only where the rows are not. A store written
before any of these was logged gives no block for it and no error. Read-only: nothing here writes to MLflow.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from harness.evaluation import calibration, clinical  # noqa: E402
from harness.recipe import minimised  # noqa: E402
from harness.report.collect import ModelResult, Study  # noqa: E402
from harness.report.render import h, img, p, table  # noqa: E402
from harness.tracking import schema  # noqa: E402

TEST = "test"
TEST_CALIBRATED = f"test{schema.CALIBRATED}"
FAILURE_ROWS = 12  # rows shown per failure table, the rest counted
FAILURE_MODELS = 6  # model columns of a failure table (the champion first): 2 + 6 columns fit a 1280 px page
GRADCAM_IMAGES = 8  # failure images with a Grad-CAM overlay of the champion
NA = "—"


# ---- shared with harness.report.cost -------------------------------------------------------------------------------


def fmt(x, nd: int = 3) -> str:
    """A number to `nd` decimals, or a dash for None / nan / not a number."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return NA
    return f"{x:.{nd}f}" if np.isfinite(x) else NA


def fmt_ci(point, low, high, nd: int = 3) -> str:
    return f"{fmt(point, nd)} [{fmt(low, nd)}, {fmt(high, nd)}]" if fmt(point, nd) != NA else NA


def task_models(study: Study, task: str) -> list[ModelResult]:
    return sorted((m for m in study.models if m.task == task), key=lambda m: m.key)


def champion_key(study: Study, task: str, models: list[ModelResult]) -> str | None:
    """The task's champion: the model the `champion` alias points at; without one (an older store, a report run
    before the champion stage) the model with the best validation objective, the champion rule's own choice; None
    when no model of the task has one."""
    keys = {m.key for m in models}
    named = (study.champions or {}).get(task, {}).get("model_key")
    if named in keys:
        return named
    scored = []
    for m in models:
        objective = next(
            (k.removeprefix(schema.SEARCH_PREFIX) for k in m.metrics if k.startswith(f"{schema.SEARCH_PREFIX}val_")),
            None,
        )
        value = m.metrics.get(f"{schema.SEARCH_PREFIX}{objective}") if objective else None
        if value is not None and np.isfinite(value):
            scored.append((value if minimised(objective) else -value, m.key))
    return min(scored)[1] if scored else None


def seed_of(m: ModelResult) -> int:
    """The bootstrap seed the report uses for a model (its data seed, as the summary's accuracy CI)."""
    try:
        return int(m.params.get("data.seed", 0))
    except (TypeError, ValueError):
        return 0


def arrays(m: ModelResult, rows: list[dict]) -> tuple[np.ndarray, np.ndarray] | None:
    """(labels, (N, k) probabilities with rows summing to 1) of prediction rows, or None when a row lacks a class
    column or names a class the model does not have."""
    index = {str(c): i for i, c in enumerate(m.classes)}
    try:
        y = np.array([index[str(r["true"])] for r in rows], dtype=np.int64)
        proba = np.array([[float(r[f"p.{c}"]) for c in m.classes] for r in rows], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        return None
    if not len(rows) or proba.ndim != 2 or not np.all(np.isfinite(proba)):
        return None
    total = proba.sum(axis=1, keepdims=True)
    return y, proba / np.where(total > 0, total, 1.0)


def by_file(rows: list[dict]) -> dict[str, dict]:
    return {str(r["file"]): r for r in rows}


def aligned(m: ModelResult, split: str, files: list[str]) -> list[dict] | None:
    """The rows of `split` in the order of `files`, or None unless the split covers exactly those images."""
    rows = by_file(m.split(split))
    if not rows or set(rows) != set(files):
        return None
    return [rows[f] for f in files]


def champion_rows(keys: list[str], champion: str | None) -> tuple[int, ...]:
    """The row indices a table marks (highlighted): the champion's."""
    return tuple(i for i, k in enumerate(keys) if k == champion)


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def default_client(client=None):
    """The MLflow client to read with (read-only): the one given (tests pass a stand-in), else the harness's."""
    if client is not None:
        return client
    from harness.tracking import runs as tracking

    return tracking.client()


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


# ---- calibration -----------------------------------------------------------------------------------------------


def calibration_numbers(m: ModelResult) -> dict | None:
    """ECE [bootstrap CI] and Brier on the test split before and after temperature scaling, and the temperature.

    From the `test` and `test_calibrated` prediction rows (ECE by `calibration.ece_ci` with the model's data seed);
    without `test_calibrated` rows the logged temperature applied to the test rows; without test rows the logged
    metrics. None when there is nothing to show. `y`, `before_p`, `after_p` carry the arrays for the figure."""
    t = m.metrics.get(schema.TEMPERATURE)
    out = {"temperature": t, "before": None, "after": None, "after_from": None, "from": None}
    rows = m.split(TEST)
    got = arrays(m, rows) if rows else None
    if got is not None:
        y, proba = got
        seed = seed_of(m)
        out.update(n=len(y), y=y, before_p=proba, **{"from": "rows"})
        out["before"] = {**calibration.ece_ci(proba, y, seed=seed), "brier": calibration.brier(proba, y)}
        cal_rows = aligned(m, TEST_CALIBRATED, [str(r["file"]) for r in rows])
        cal = arrays(m, cal_rows) if cal_rows else None
        if cal is not None:
            after, out["after_from"] = cal[1], "rows"
        elif t is not None and np.isfinite(t) and t > 0:
            after, out["after_from"] = calibration.apply_temperature(proba, t), "temperature"
        else:
            after = None
        if after is not None:
            out["after_p"] = after
            out["after"] = {**calibration.ece_ci(after, y, seed=seed), "brier": calibration.brier(after, y)}
        return out
    logged = {}
    for key, prefix in (("before", schema.TEST), ("after", f"{TEST_CALIBRATED}.")):
        names = ("ece", "ece_ci_low", "ece_ci_high", "brier")
        if any(f"{prefix}{k}" in m.metrics for k in names):
            logged[key] = {k: m.metrics.get(f"{prefix}{k}", float("nan")) for k in names}
    if not logged and t is None:
        return None
    out.update(logged, n=m.metrics.get(f"{schema.TEST}n"), **{"from": "metrics", "after_from": "metrics"})
    return out


def _calibration(models: list[ModelResult], champion: str | None, task: str, out: Path, level: int) -> list:
    numbers = {m.key: c for m in models if (c := calibration_numbers(m)) is not None}
    if not numbers:
        return []
    scaled = any(c["after"] or c["temperature"] is not None for c in numbers.values())
    rows = []
    for key, c in numbers.items():
        b, a = c["before"] or {}, c["after"] or {}
        row = [
            key + (" ★" if key == champion else "") + (" (logged)" if c["from"] == "metrics" else ""),
            c.get("n") if c.get("n") is not None else NA,
            fmt_ci(b.get("ece"), b.get("ece_ci_low"), b.get("ece_ci_high")),
            fmt(b.get("brier")),
        ]
        if scaled:
            row[2:2] = [fmt(c["temperature"], 2)]
            row += [fmt_ci(a.get("ece"), a.get("ece_ci_low"), a.get("ece_ci_high")), fmt(a.get("brier"))]
        rows.append(row)
    words = (
        "On the test split: top-label expected calibration error (ECE, 10 equal-width confidence bins, 95% "
        "percentile bootstrap CI over images) and the multi-class Brier score (0 perfect, 2 worst)"
    )
    if scaled:
        words += (
            ", before and after temperature scaling. The temperature T was fitted on the out-of-fold validation "
            "predictions, never on the test split; T > 1 softens an overconfident model, T < 1 sharpens an "
            "underconfident one, and the predicted class (so accuracy) is unchanged"
        )
    else:
        words += " of the probabilities as logged (no temperature scaling logged for these runs)"
    words += ". Recomputed from the logged per-image predictions"
    if any(c["after_from"] == "temperature" for c in numbers.values()):
        words += " (after scaling: the logged T applied to the test predictions where no scaled rows were logged)"
    if any(c["from"] == "metrics" for c in numbers.values()):
        words += "; (logged): no per-image rows, the run's logged metrics"
    headers = ["model", "test n", "ECE [95% CI]", "Brier"]
    if scaled:
        headers = ["model", "test n", "T", "ECE [95% CI]", "Brier", "ECE scaled [95% CI]", "Brier scaled"]
    blocks = [
        h(f"Calibration — {task}", level),
        p(words + "." + (" ★ marks the champion." if champion in numbers else "")),
        table(headers, rows, f"calibration-{task}", marked=champion_rows(list(numbers), champion)),
    ]
    c = numbers.get(champion)
    if c is not None and "before_p" in c:
        curves = {"before" if "after_p" in c else "as logged": c["before_p"]}
        if "after_p" in c:
            curves[f"after (T={fmt(c['temperature'], 2)})"] = c["after_p"]
        fig = calibration.reliability_figure(curves, c["y"], title=f"{champion} — test split (n={c['n']})")
        path = save(fig, out / f"reliability-{safe_name(task)}.png")
        blocks.append(
            img(
                path,
                f"Reliability diagram of the champion {champion} on the test split"
                + (", before and after temperature scaling" if "after_p" in c else "")
                + ": accuracy per confidence bin against the diagonal of perfect calibration; below, the images "
                "per bin",
            )
        )
    return blocks


# ---- operating point -------------------------------------------------------------------------------------------

OP_METRICS = ("sensitivity", "specificity", "ppv", "npv")


def operating_row(m: ModelResult, show_class: bool = False, champion: str | None = None) -> list:
    """One model's operating-point row from its `op.*` metrics (dashes where absent)."""
    mt, op = m.metrics, schema.OP
    test = f"{op}test."
    counts = [mt.get(f"{test}{k}") for k in ("tp", "fp", "tn", "fn")]
    return [
        m.key + (" ★" if m.key == champion else "") + (f" ({m.tags.get(schema.OP_CLASS)})" if show_class else ""),
        fmt(mt.get(f"{op}threshold")),
        f"{fmt(mt.get(f'{op}target_sensitivity'), 2)} / {fmt(mt.get(f'{op}val.sensitivity'))}",
        *(fmt_ci(mt.get(f"{test}{k}"), mt.get(f"{test}{k}_ci_low"), mt.get(f"{test}{k}_ci_high")) for k in OP_METRICS),
        "/".join(str(int(c)) for c in counts) if all(c is not None and np.isfinite(c) for c in counts) else NA,
    ]


def _operating(models: list[ModelResult], champion: str | None, task: str, level: int) -> list:
    ms = [m for m in models if m.tags.get(schema.OP_CLASS)]
    if not ms:
        return []
    classes = sorted({m.tags[schema.OP_CLASS] for m in ms})
    return [
        h(f"Operating point — {task}", level),
        p(
            f"Calling {' / '.join(classes)} positive when its probability reaches the threshold. The threshold is "
            f"the largest that reaches the target sensitivity on the out-of-fold validation predictions (OOF: the "
            f"sensitivity it gave there); it was chosen there, never on the test split, and applied unchanged to "
            f"the test images: test sensitivity, specificity, PPV and NPV with exact Clopper-Pearson 95% CIs."
        ),
        table(
            ["model", "threshold", "target / OOF sens.", "test sens. [95% CI]", "spec. [95% CI]", "PPV [95% CI]"]
            + ["NPV [95% CI]", "TP/FP/TN/FN"],
            [operating_row(m, show_class=len(classes) > 1, champion=champion) for m in ms],
            f"operating-{task}",
            marked=champion_rows([m.key for m in ms], champion),
        ),
    ]


# ---- decision curve --------------------------------------------------------------------------------------------


def decision_inputs(models: list[ModelResult], champion: str | None) -> tuple[str, dict, np.ndarray, list] | None:
    """(operating class, {curve name: score}, positive, files) on the test images every model covers, from the
    temperature-scaled rows where a model logged them for all its test images; None without `op.class`."""
    tagged = {m.key: m.tags.get(schema.OP_CLASS) for m in models if m.tags.get(schema.OP_CLASS)}
    if not tagged:
        return None
    cls = tagged.get(champion) or next(iter(tagged.values()))
    ms = [m for m in models if cls in m.classes and m.split(TEST)]
    if not ms:
        return None
    files = sorted(set.intersection(*(set(by_file(m.split(TEST))) for m in ms)))
    if not files:
        return None
    curves, positive = {}, None
    for m in ms:
        cal = by_file(m.split(TEST_CALIBRATED))
        scaled = bool(cal) and set(cal) >= set(files)  # scaled rows of every image here: those images picked out
        rows = [cal[f] for f in files] if scaled else [by_file(m.split(TEST))[f] for f in files]
        got = arrays(m, rows)
        if got is None:
            continue
        y, proba = got
        curves[m.key + (" (T-scaled)" if scaled else "")] = proba[:, m.classes.index(cls)]
        if positive is None:
            positive = y == m.classes.index(cls)
    if not curves:
        return None
    return cls, curves, positive, files


def _decision(models: list[ModelResult], champion: str | None, task: str, out: Path, level: int) -> list:
    got = decision_inputs(models, champion)
    if got is None:
        return []
    cls, curves, positive, files = got
    fig = clinical.decision_curve_figure(curves, positive, class_name=f"{cls} ({task}, test n={len(files)})")
    fig.set_size_inches(6, 4)
    fig.tight_layout()
    path = save(fig, out / f"decision-{safe_name(task)}.png")
    return [
        h(f"Decision curve — {task}", level),
        p(
            f"Net benefit TP/N - FP/N · pt/(1 - pt) of calling {cls} positive at threshold probability pt, on the "
            f"{len(files)} test images every model was scored on (prevalence {np.mean(positive):.3f}), against "
            f"calling every image (treat all) or none positive. A model helps at the thresholds where its curve lies "
            f"above both."
            + (
                " Net benefit reads probabilities as risks, so the temperature-scaled probabilities are used where "
                "logged (T-scaled)."
                if any(k.endswith("(T-scaled)") for k in curves)
                else ""
            )
        ),
        img(path, f"Decision curves of {task} for {cls} on the test split"),
    ]


# ---- failure analysis ------------------------------------------------------------------------------------------


def failure_analysis(models: list[ModelResult], champion: str) -> dict | None:
    """The test images (files) every model of the task gets wrong and those only the champion gets wrong
    (`clinical.failures` on per-model correctness, aligned by file over the images every model was scored on).
    None without the champion's test rows."""
    ms = [m for m in models if m.split(TEST)]
    if champion not in {m.key for m in ms}:
        return None
    tables = {m.key: by_file(m.split(TEST)) for m in ms}
    files = sorted(set.intersection(*(set(t) for t in tables.values())))
    if not files:
        return None
    correct = {k: np.array([str(t[f]["true"]) == str(t[f]["pred"]) for f in files]) for k, t in tables.items()}
    sets = clinical.failures(correct, champion)
    return {
        "files": files,
        "rows": tables,
        "all_wrong": [files[i] for i in sets["all_wrong"]],
        "only_champion_wrong": [files[i] for i in sets["only_champion_wrong"]],
    }


def _confidence(row: dict) -> float:
    try:
        return float(row[f"p.{row['pred']}"])
    except (KeyError, TypeError, ValueError):
        return float("nan")


def _failure_table(found: dict, files: list[str], order: list[str], table_id: str) -> list:
    champ_rows = found["rows"][order[0]]
    files = sorted(files, key=lambda f: -np.nan_to_num(_confidence(champ_rows[f]), nan=-1.0))
    shown = files[:FAILURE_ROWS]
    rows = [
        [Path(f).name, champ_rows[f]["true"]]
        + [f"{found['rows'][k][f]['pred']} {fmt(_confidence(found['rows'][k][f]), 2)}" for k in order]
        for f in shown
    ]
    headers = ["file", "true", f"{order[0]} ★"] + order[1:]
    blocks = [table(headers, rows, table_id)]  # the champion is a column here, not a row
    if len(files) > len(shown):
        blocks.append(p(f"… and {len(files) - len(shown)} more."))
    return blocks


def _failures(models: list[ModelResult], champion: str | None, task: str, out: Path, level: int, gradcam: bool) -> list:
    if champion is None:
        return []
    found = failure_analysis(models, champion)
    if found is None:
        return []
    others = sorted(k for k in found["rows"] if k != champion)
    order = [champion] + others[: FAILURE_MODELS - 1]
    n_all, n_only = len(found["all_wrong"]), len(found["only_champion_wrong"])
    blocks = [
        h(f"Failure analysis — {task}", level),
        p(
            f"Of the {len(found['files'])} test images all {len(found['rows'])} model(s) were scored on, "
            + (
                f"{n_all} are wrong for the task's only model."
                if len(found["rows"]) == 1
                else f"{n_all} are wrong for every model and {n_only} wrong only for the champion {champion} "
                f"(every other model right)."
            )
            + (
                " Each model's cell: its predicted class and that class's probability; the champion's most "
                "confident errors first."
                if n_all or n_only
                else ""
            )
            + (
                f" Columns: the champion and {len(order) - 1} of the {len(others)} other models."
                if len(others) > len(order) - 1 and (n_all or n_only)
                else ""
            )
        ),
    ]
    if n_all:
        blocks += [p(f"Wrong for every model ({n_all}):" if len(found["rows"]) > 1 else f"Wrong ({n_all}):")]
        blocks += _failure_table(found, found["all_wrong"], order, f"failures-all-{task}")
    if n_only and len(found["rows"]) > 1:
        blocks += [p(f"Wrong only for the champion {champion} ({n_only}):")]
        blocks += _failure_table(found, found["only_champion_wrong"], order, f"failures-champion-{task}")
    if gradcam and (n_all or n_only):
        blocks += failure_gradcam(models, champion, found, task, out)
    return blocks


def failure_gradcam(models: list[ModelResult], champion: str, found: dict, task: str, out: Path) -> list:
    """A grid of the champion's Grad-CAM (of the class it predicted) on up to GRADCAM_IMAGES failure images, or one
    line saying why not (the image files are not readable here, the model cannot be loaded)."""
    rows = found["rows"][champion]
    by_confidence = [
        sorted(fs, key=lambda f: -np.nan_to_num(_confidence(rows[f]), nan=-1.0))
        for fs in (found["all_wrong"], found["only_champion_wrong"])
    ]
    picked = list(dict.fromkeys(by_confidence[0] + by_confidence[1]))[:GRADCAM_IMAGES]  # as the tables order them
    readable = [f for f in picked if Path(f).is_file()]
    if not readable:
        return [
            p(f"Grad-CAM of the failure images skipped: their image files are not readable here (e.g. {picked[0]}).")
        ]
    m = next(x for x in models if x.key == champion)
    uri = f"runs:/{m.run.info.run_id}/model"
    try:
        from harness.evaluation.gradcam import gradcam, grid_figure
        from harness.serving.predict import decode_for, load_for_images

        model, cfg = load_for_images(uri)
        original = {Path(f): f for f in readable}  # the row's file string of each decoded path
        good, images, problems = decode_for(cfg, list(original))
        if not len(good):
            return [p(f"Grad-CAM of the failure images skipped: no image could be decoded ({problems[0]}).")]
        classes = [str(c) for c in cfg["classes"]]
        said = [rows[original[f]] for f in good]
        pred = np.array([classes.index(str(r["pred"])) for r in said])
        maps = gradcam(model.unwrap_python_model().model, images.astype("float32"), pred, len(classes))
        titles = [
            f"{f.name[:34]}\ntrue {r['true']}, said {r['pred']} {fmt(_confidence(r), 2)}" for f, r in zip(good, said)
        ]
        path = out / f"failures-gradcam-{safe_name(task)}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid_figure(
            list(images),
            list(maps),
            titles,
            path,
            columns=min(4, len(good)),
            title=f"{champion}: Grad-CAM on its errors",
        )
    except Exception as e:  # an optional figure: a model or image that cannot be read leaves one line, not a crash
        why = str(e).splitlines()[0][:200] if str(e).strip() else type(e).__name__
        return [p(f"Grad-CAM of the failure images skipped: {why}.")]
    skipped = len(picked) - len(good)
    return [
        img(
            path,
            f"Grad-CAM of the champion {champion} on {len(good)} failure image(s), map of the class it predicted "
            f"(white box: the lung field)" + (f"; {skipped} not readable here" if skipped else ""),
        )
    ]


# ---- model cards -----------------------------------------------------------------------------------------------


def _model_cards(models: list[ModelResult], task: str, level: int, client) -> list:
    lines = []
    for m in models:
        try:
            client = default_client(client)
            paths = {a.path for a in client.list_artifacts(m.run.info.run_id)}
        except Exception:  # a store that cannot be read here: no card line, no error
            continue
        if schema.MODEL_CARD in paths:
            lines.append(p(f"{m.key}: runs:/{m.run.info.run_id}/{schema.MODEL_CARD}"))
    if not lines:
        return []
    return [
        h(f"Model cards — {task}", level),
        p("Each final model's card (intended use, data, metrics, limits), an artifact of its run:"),
        *lines,
    ]


# ---- the sections ----------------------------------------------------------------------------------------------


def evaluation_sections(
    study: Study, task: str, out: Path, *, level: int = 3, gradcam: bool = True, client=None
) -> list:
    """The evaluation blocks of one task: calibration, operating point, decision curve, failure analysis and model
    cards, each only where its data is logged (an older store gives fewer blocks, or none). Figures are written
    under `out`. `client` reads the runs' artifact lists (read-only; default: the harness's MLflow client);
    `gradcam=False` skips loading the champion for Grad-CAM of its errors."""
    models = task_models(study, task)
    if not models:
        return []
    out = Path(out)
    champion = champion_key(study, task, models)
    return (
        _calibration(models, champion, task, out, level)
        + _operating(models, champion, task, level)
        + _decision(models, champion, task, out, level)
        + _failures(models, champion, task, out, level, gradcam)
        + _model_cards(models, task, level, client)
    )
