"""Report stage: `compare(study)` turns a study's MLflow runs into report.md + report.html (+ PNGs), logged as a
`compare` run: what won, by how much, how sure we are (bootstrap and exact CIs, McNemar), what it cost, and what
the models look at (t-SNE by class and by image source)."""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path

import mlflow
import numpy as np

from harness.evaluation.metrics import confusion_figure, mcnemar, metrics
from harness.paths import get_paths
from harness.recipe import minimised
from harness.report import figures
from harness.report.collect import ModelResult, Study, collect
from harness.report.render import h, img, p, table, to_html, to_markdown
from harness.tracking import runs as tracking
from harness.tracking import schema

log = logging.getLogger(__name__)
WEIGHTS_WORDS = {"imagenet": "ImageNet", "none": "random init", "file": "file"}


def _f(x, nd=3) -> str:
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{nd}f}"


def _acc_cp(metrics: dict, prefix: str = "") -> str:
    """`accuracy [exact CI]` of a metric set (`prefix` "nested." reads nested.accuracy, nested.accuracy_cp_low...)."""
    low, high = metrics.get(f"{prefix}accuracy_cp_low"), metrics.get(f"{prefix}accuracy_cp_high")
    return f"{_f(metrics.get(f'{prefix}accuracy'))} [{_f(low)}, {_f(high)}]"


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


def _summary(models: list[ModelResult], computed: dict) -> list:
    blocks = []
    for task in sorted({m.task for m in models}):
        ms = [m for m in models if m.task == task]
        classes = ms[0].classes
        extra = [(key, words) for key, words in EXTRA_SETS if any(key in m.metrics for m in ms)]
        headers = (
            [
                "model",
                "backbone",
                "weights",
                "best hyperparameters",
                "selected by (validation)",
                "final model",
                "test n",
                "accuracy [95% bootstrap CI]",
                "exact 95% CI",
                "macro F1",
            ]
            + (["COVID-19 sensitivity"] if "covid" in classes else [])
            + ["ROC AUC", "test loss", "trials", "tuning s"]
            + [words for _, words in extra]
            + [f"P/R {c}" for c in classes]
        )
        rows = []
        for m in sorted(ms, key=lambda m: -computed[m.key].get("accuracy", -1)):
            t = computed[m.key]
            hp = (
                ", ".join(
                    f"{k.removeprefix(schema.HP)}={v}" for k, v in sorted(m.params.items()) if k.startswith(schema.HP)
                )
                or (f"average of {m.tags[schema.ENSEMBLE_MEMBERS]}" if schema.ENSEMBLE_MEMBERS in m.tags else "")
                or f"head {m.params.get('head.units', '?')}, dropout {m.params.get('head.dropout', '?')}, "
                f"lr {m.params.get('training.learning_rate', '?')} (not tuned)"
            )
            search_s = m.search.data.metrics.get("search_seconds") if m.search else None
            sha = m.tags.get(schema.WEIGHTS_SHA256, "")
            origin = m.tags.get(schema.WEIGHTS_ORIGIN, "")
            weights = WEIGHTS_WORDS.get(m.tags.get(schema.WEIGHTS, ""), m.tags.get(schema.WEIGHTS, "?")) + (
                f" ({origin + ', ' if origin and origin != 'random init' else ''}sha256 {sha[:12]})" if sha else ""
            )
            row = [
                m.key,
                m.backbone,
                weights,
                hp,
                selection(m),
                final_words(m),
                t.get("n", 0),
                f"{_f(t.get('accuracy'))} [{_f(t.get('accuracy_ci_low'))}, {_f(t.get('accuracy_ci_high'))}]",
                f"[{_f(t.get('accuracy_cp_low'))}, {_f(t.get('accuracy_cp_high'))}]",
                _f(t.get("macro_f1")),
            ]
            if "covid" in classes:
                row.append(_f(t.get("recall.covid")))
            row += [_f(t.get("roc_auc")), _f(t.get("loss")), len(m.trials) or "—", _f(search_s, 1)]
            row += [_f(m.metrics.get(key)) for key, _ in extra]
            row += [f"{_f(t.get(f'precision.{c}'), 2)}/{_f(t.get(f'recall.{c}'), 2)}" for c in classes]
            rows.append(row)
        blocks += [h(f"Task {task}: {', '.join(classes)}", 3), table(headers, rows, f"summary-{task}")]
    return blocks


# The final evaluation's optional metric sets, a column each where some model has them.
EXTRA_SETS = (
    ("test_tta.accuracy", "accuracy with TTA"),
    ("test_view_tta.accuracy", "accuracy averaged over its training views"),
)
# The nested estimate's optional averaged sets (harness.stages.nested), a row each.
NESTED_SETS = (("nested_tta", "random augmented copies (TTA)"), ("nested_view_tta", "its training views"))


def selection(m: ModelResult) -> str:
    """What chose this model: the search objective of its best trial, over the K folds or on the val split."""
    if schema.ENSEMBLE_MEMBERS in m.tags:  # no search: its members' validation predictions averaged chose it
        objective = m.params.get(schema.SEARCH_OBJECTIVE, "val_loss")
        score = m.metrics.get(f"{schema.SEARCH_PREFIX}{objective}")
        return f"{objective} {_f(score)} of its members' validation predictions"
    if not m.search:
        return "not searched"
    objective = m.search.data.params.get(schema.SEARCH_OBJECTIVE, "val_loss")
    value = m.search.data.metrics.get(f"{schema.BEST}{objective}")
    folds = int(m.search.data.metrics.get(f"{schema.BEST}folds", 1))
    std = m.search.data.metrics.get(f"{schema.BEST}{schema.CV_STD}{objective}")
    where = f" ± {_f(std)} over {folds} folds" if folds > 1 else " on the val split"
    return f"{objective} {_f(value)}{where}"


def final_words(m: ModelResult) -> str:
    mode, n = m.tags.get(schema.FINAL_MODE, "single"), m.tags.get(schema.FINAL_MEMBERS, "1")
    words = {
        "single": "one head, best val epoch",
        "ensemble": f"{n} fold heads averaged",
        "refit": "refit on train+val",
    }.get(mode, mode)
    return words + (", fine-tuned" if m.tags.get(schema.FINAL_STAGE) == "finetune" else "")


def _nested(models: list[ModelResult], computed: dict) -> list:
    rows = []
    for m in [m for m in models if m.nested is not None]:
        n, t = m.nested.data.metrics, computed[m.key]
        rows.append(
            [
                m.key,
                int(n.get(f"{schema.NESTED_PREFIX}n", 0)),
                _acc_cp(n, schema.NESTED_PREFIX),
                _acc_cp(n, f"{schema.NESTED_PREFIX}floor."),
                int(n.get(f"{schema.NESTED_PREFIX}vs_floor.only_tuned", 0)),
                int(n.get(f"{schema.NESTED_PREFIX}vs_floor.only_floor", 0)),
                _f(n.get(f"{schema.NESTED_PREFIX}vs_floor.p_value"), 4),
                f"{_acc_cp(t)} (n={t.get('n')})",
            ]
        )
    if not rows:
        return []
    averaged = [
        [
            m.key,
            label,
            _acc_cp(n, f"{name}."),
            int(n.get(f"{name}.vs_image_alone.only_averaged", n.get(f"{name}.vs_image_alone.only_views", 0))),
            int(n.get(f"{name}.vs_image_alone.only_image", 0)),
            _f(n.get(f"{name}.vs_image_alone.p_value"), 4),
            _f(n.get(f"{name}.vs_floor.p_value"), 4),
        ]
        for m in models
        if m.nested is not None
        for name, label in NESTED_SETS
        if f"{name}.accuracy" in (n := m.nested.data.metrics)
    ]
    # The fine-tuning stage repeated in every outer fold: the same outer folds before and after it, paired.
    tuned = [
        [
            m.key,
            f"{int(n.get(f'{schema.NESTED_PREFIX}{schema.FINETUNE_PREFIX}outer_chosen', 0))} of "
            f"{m.nested.data.params.get(f'{schema.NESTED_PREFIX}outer_folds', '?')}",
            _acc_cp(n, "nested_head."),
            _acc_cp(n, schema.NESTED_PREFIX),
            int(n.get(f"{schema.NESTED_PREFIX}vs_head.only_finetuned", 0)),
            int(n.get(f"{schema.NESTED_PREFIX}vs_head.only_head", 0)),
            _f(n.get(f"{schema.NESTED_PREFIX}vs_head.p_value"), 4),
        ]
        for m in models
        if m.nested is not None and "nested_head.accuracy" in (n := m.nested.data.metrics)
    ]
    tuned_block = (
        [
            p(
                "The fine-tuning stage ran inside every outer fold as well (search.nested_finetune), so the estimate "
                "above covers it; its outer models before the stage, paired with the same models after it on every "
                "image, say whether the stage helps the procedure:"
            ),
            table(
                [
                    "model",
                    "outer folds that chose fine-tuning",
                    "before the stage [exact 95% CI]",
                    "with the stage [exact 95% CI]",
                    "only with the stage right",
                    "only before it right",
                    "exact McNemar p",
                ],
                tuned,
                "nested-finetune",
            ),
        ]
        if tuned
        else []
    )
    averaged_block = (
        [
            p(
                "The same outer models, each held-out image predicted as the mean over copies of it (evaluation.tta: "
                "random augmented copies; evaluation.view_tta: it and the views its heads trained on), paired with "
                "the image alone on every image:"
            ),
            table(
                [
                    "model",
                    "averaged over",
                    "accuracy [exact 95% CI]",
                    "only averaged right",
                    "only image right",
                    "exact McNemar p",
                    "exact McNemar p vs floor",
                ],
                averaged,
                "nested-averaged",
            ),
        ]
        if averaged
        else []
    )
    return [
        h("How good is the procedure: nested cross-validation", 2),
        p(
            "The test accuracy is one model on one test split; the nested estimate repeats the whole head search and "
            "final fit (and the fine-tuning stage, where it ran inside) in an outer loop over train+validation, so "
            "each of its images is predicted by a model chosen without it: it says how well this procedure does on "
            "new images of this data, not how good one model is."
        ),
        table(
            [
                "model",
                "images",
                "nested accuracy [exact 95% CI]",
                "floor, same outer folds [exact 95% CI]",
                "only tuned right",
                "only floor right",
                "exact McNemar p",
                "test accuracy [exact 95% CI]",
            ],
            rows,
            "nested",
        ),
        *tuned_block,
        *averaged_block,
    ]


def _finetune(models: list[ModelResult]) -> list:
    rows = []
    for m in [m for m in models if m.search and schema.FINETUNE_CHOSEN in m.search.data.tags]:
        s = m.search.data
        objective = s.params.get(schema.SEARCH_OBJECTIVE, "val_loss")
        ft = [r for r in m.trials if r.get("stage") == "finetune"]
        kept = [r for r in ft if not r.get("pruned")]  # a pruned trial's objective is of fewer epochs: never the best
        best = (min if minimised(objective) else max)(kept, key=lambda r: r["objective"]) if kept else {}
        pruned = len(ft) - len(kept)
        rows.append(
            [
                m.key,
                _f(s.metrics.get(f"{schema.FINETUNE_PREFIX}start_{objective}"), 4),
                _f(s.metrics.get(f"{schema.FINETUNE_PREFIX}best_{objective}"), 4),
                _f(s.metrics.get(f"{schema.FINETUNE_PREFIX}bar_{objective}"), 4),
                s.params.get(f"{schema.SEARCH_PREFIX}finetune.accept", "any_gain"),
                f"{len(ft)} ({pruned} pruned)" if pruned else len(ft),
                ", ".join(f"{k.removeprefix(schema.FT_HP)}={v}" for k, v in best.items() if k.startswith(schema.FT_HP)),
                "yes" if s.tags[schema.FINETUNE_CHOSEN] == "true" else "no: the head-only model stays",
            ]
        )
    if not rows:
        return []
    return [
        h("Fine-tuning stage", 3),
        p(
            "From the best head, a second search over how much of the backbone to unfreeze (0 = frozen, top blocks, "
            "half or all), its learning rate and augmentation strength, on the same folds (a trial pruned by the "
            "median rule is counted, never chosen); its best trial replaces the head-only model "
            "only when it beats the bar on the same validation images: the head-only objective itself (any_gain), or "
            "that objective moved by one standard error of the best trial's fold mean (one_se), because the best of "
            "several trials on the folds the head was chosen on is flattered by the choice."
        ),
        table(
            [
                "model",
                "head-only objective",
                "best fine-tuned objective",
                "bar",
                "rule",
                "trials",
                "best fine-tuning",
                "chosen",
            ],
            rows,
            "finetune",
        ),
    ]


def _champions(study: Study) -> list:
    if not study.champions:
        return []
    rows = [
        [
            task,
            c["uri"],
            c["version"],
            c["model_key"],
            c["source"],
            f"{c['objective']} {_f(c['value'], 4)}",
            c["candidates"],
            "on the best candidate" if c["best_now"] else "on an earlier model with a better validation objective",
        ]
        for task, c in sorted(study.champions.items())
    ]
    return [
        h("Champions", 2),
        p(
            "Each task's `champion` alias points at the final model with the best validation objective (the one its "
            "search chose it by: the cross-validated or validation-split loss), never at the best test accuracy, "
            "which would turn the test split into a selection set. It moves only when a strictly better model "
            "exists. Serve it with `mlflow models serve -m <uri> --env-manager local`."
        ),
        table(
            ["task", "model URI", "version", "model", "points at", "chosen by", "candidates", "alias"],
            rows,
            "champions",
        ),
    ]


def _gradcam(models: list[ModelResult], out: Path) -> list:
    from harness.evaluation.gradcam import LUNG_BOX, OUTSIDE_FLAG

    blocks, rows = [], []
    for m in [m for m in models if m.gradcam]:
        if m.gradcam_png:
            path = out / f"gradcam-{m.key}.png"
            path.write_bytes(m.gradcam_png)
            blocks.append(
                img(
                    path,
                    f"Grad-CAM of {m.key}: per class its most confident correct and wrong test "
                    f"prediction (map of the predicted class; white box: the lung field)",
                )
            )
        for c, share in sorted(m.gradcam["outside_lung_share"].items()):
            rows.append(
                [
                    m.key,
                    c,
                    _f(share, 2),
                    "mostly outside the lung field: look at the overlays for borders, text or markers"
                    if share > OUTSIDE_FLAG
                    else "mostly inside",
                ]
            )
    if not rows:
        return []
    left, top, right, bottom = LUNG_BOX
    return [
        h("Where the models look (Grad-CAM)", 2),
        p(
            f"Grad-CAM of each final model on its test images. The lung field is a fixed central box: "
            f"{left:.0%}-{right:.0%} of the width and {top:.0%}-{bottom:.0%} of the height. For each class, the share "
            f"of the map (for that class, over the test images of that class) outside the box; above "
            f"{OUTSIDE_FLAG:.0%}, the model's evidence for the class lies mostly outside the lungs."
        ),
        table(["model", "class", "Grad-CAM share outside the lung field", "reading"], rows, "gradcam"),
        *blocks,
    ]


def _audit(models: list[ModelResult], computed: dict) -> list:
    from harness.stages.audit import REACHES

    blocks = []
    for task in sorted({m.task for m in models}):
        ms = [m for m in models if m.task == task and m.audit]
        if not ms:
            continue
        a = ms[0].audit  # the metadata part depends only on the task's images
        meta = a["meta"]
        best = max(computed[m.key].get("accuracy", 0.0) for m in ms)
        rows = [
            [
                m.key,
                _f(computed[m.key].get("accuracy")),
                f"{_f(m.audit['source_from_features']['accuracy'])} (majority {_f(m.audit['source_majority'])})"
                if "source_from_features" in m.audit
                else "one source only",
            ]
            for m in ms
        ]
        words = (
            f"Metadata alone reaches the models' accuracy ({_f(meta['accuracy'])} against at best "
            f"{_f(best)} on test): this data cannot tell disease from source, and these models' scores say "
            f"nothing about disease."
            if meta["accuracy"] >= best - REACHES
            else f"Metadata alone stays below the models ({_f(meta['accuracy'])} against {_f(best)})."
        )
        flagged = [c for c, v in a["meta_per_class"].items() if v["recall"] >= 0.9 and v["precision"] >= 0.9]
        if flagged:
            words += f" The source signature alone identifies {', '.join(flagged)} (recall and precision at least 0.9)."
        blocks += [
            h(f"Task {task}", 3),
            p(
                f"Source signature only ({', '.join(a['signature'])}), a random forest, cross-validated on "
                f"train+validation (n={meta['n']}): accuracy {_f(meta['accuracy'])} [exact 95% CI "
                f"{_f(meta['accuracy_cp_low'])}, {_f(meta['accuracy_cp_high'])}]; per class recall "
                + ", ".join(f"{c} {_f(v['recall'], 2)}" for c, v in a["meta_per_class"].items())
                + ". "
                + words
            ),
            table(
                ["model", "test accuracy", "source (colour mode) from its backbone features, CV accuracy"],
                rows,
                f"audit-{task}",
            ),
        ]
    if not blocks:
        return []
    return [
        h("Source audit", 2),
        p(
            "How far the image's source explains the labels: a classifier on file metadata alone, and how well each "
            "backbone's features recognise the source (the original colour mode)."
        ),
        *blocks,
    ]


def _colour(models: list[ModelResult], computed: dict) -> list:
    """Models of one task and backbone that differ only by colour policy, side by side."""
    rows = []
    for a, b in itertools.combinations(models, 2):
        ca, cb = (m.params.get("model.colour") or m.params.get("data.colour") for m in (a, b))
        if a.task != b.task or a.backbone != b.backbone or ca == cb or None in (ca, cb):
            continue
        grey, rgb = (a, b) if ca == "grey" else (b, a)
        res = paired(grey.split("test"), rgb.split("test"))
        src = [
            f"{_f(m.audit['source_from_features']['accuracy'])}"
            if m.audit and "source_from_features" in m.audit
            else "—"
            for m in (grey, rgb)
        ]
        rows.append(
            [
                grey.task,
                grey.backbone,
                f"{grey.key}: {_f(computed[grey.key].get('accuracy'))}",
                f"{rgb.key}: {_f(computed[rgb.key].get('accuracy'))}",
                src[0],
                src[1],
                _f(res["p_value"], 4) if res else "—",
            ]
        )
    if not rows:
        return []
    return [
        h("Colour policy: greyscale against RGB", 2),
        p(
            "The same task and backbone with images converted to greyscale (the default) and kept in colour. In this "
            "data colour mode marks the source: a gain from colour is a gain from the shortcut, which the backbone's "
            "ability to recognise the source (the colour mode) from its features shows."
        ),
        table(
            [
                "task",
                "backbone",
                "greyscale: test accuracy",
                "RGB: test accuracy",
                "source from features (grey)",
                "source from features (RGB)",
                "exact McNemar p",
            ],
            rows,
            "colour",
        ),
    ]


def _mcnemar(models: list[ModelResult]) -> list:
    rows = []
    for a, b in itertools.combinations(models, 2):
        if a.task != b.task:
            continue
        res = paired(a.split("test"), b.split("test"))
        if res is None:
            rows.append([a.task, a.key, b.key, "—", "—", "—", "—", "—", "different test sets: not comparable"])
            continue
        verdict = "significant at 0.05" if res["p_value"] < 0.05 else "not significant: no evidence either is better"
        rows.append(
            [
                a.task,
                a.key,
                b.key,
                res["both_right"],
                res["a_only"],
                res["b_only"],
                res["both_wrong"],
                _f(res["p_value"], 4),
                verdict,
            ]
        )
    headers = [
        "task",
        "model A",
        "model B",
        "both right",
        "only A right",
        "only B right",
        "both wrong",
        "exact McNemar p",
        "verdict",
    ]
    if not rows:
        return [
            h("Pairwise comparison on the same test images", 2),
            p("Each task has one model here: no pair to compare (the floor comparison above still applies)."),
        ]
    return [
        h("Pairwise comparison on the same test images", 2),
        p("Exact McNemar test on the images where exactly one model is right (the discordant pairs)."),
        table(headers, rows, "mcnemar"),
    ]


def _floor(models: list[ModelResult], computed: dict) -> list:
    rows = []
    for m in [m for m in models if m.baseline is not None]:
        res = paired(m.split("test"), m.baseline_predictions)
        if res is None:
            continue
        b, t = m.baseline.data.metrics, computed[m.key]
        diff = t["accuracy"] - b[f"{schema.TEST}accuracy"]
        rows.append(
            [
                m.key,
                f"{_f(b.get('cv_accuracy'))} ± {_f(b.get('cv_accuracy_std'))}",
                f"{_f(b[f'{schema.TEST}accuracy'])} [{_f(b.get(f'{schema.TEST}accuracy_ci_low'))}, "
                f"{_f(b.get(f'{schema.TEST}accuracy_ci_high'))}]",
                f"{_f(t['accuracy'])} [{_f(t['accuracy_ci_low'])}, {_f(t['accuracy_ci_high'])}]",
                f"{diff:+.3f}",
                res["a_only"],
                res["b_only"],
                _f(res["p_value"], 4),
                "tuned better (p<0.05)"
                if res["p_value"] < 0.05 and diff > 0
                else "floor better (p<0.05)"
                if res["p_value"] < 0.05
                else "not significant",
            ]
        )
    if not rows:
        return []
    return [
        h("Against the floor", 2),
        p(
            "The floor: logistic regression on average-pooled features of the same frozen backbone, fitted on "
            "train+validation; its 5-fold CV accuracy (the floor's own protocol) and its accuracy on the same test "
            "images as the tuned model, paired with the exact McNemar test."
        ),
        table(
            [
                "model",
                "floor 5-fold CV accuracy",
                "floor test accuracy [95% CI]",
                "tuned test accuracy [95% CI]",
                "difference",
                "only tuned right",
                "only floor right",
                "exact McNemar p",
                "verdict",
            ],
            rows,
            "floor",
        ),
    ]


def _timing(models: list[ModelResult], study: Study) -> list:
    rows = []
    for m in models:
        mt = m.metrics
        search_s = m.search.data.metrics.get("search_seconds", 0.0) if m.search else 0.0
        rows.append(
            [
                m.key,
                m.tags.get(schema.DEVICE, "?"),
                m.tags.get(schema.DEVICE_NAME, "?"),
                _f(mt.get("seconds_per_epoch"), 3),
                _f(mt.get("images_per_s"), 1),
                _f(mt.get("extract_seconds"), 1),
                m.tags.get(schema.FEATURE_CACHE, "?"),
                _f(search_s, 1),
                _f(mt.get("train_seconds"), 1),
            ]
        )
    blocks = [
        h("Device and timing", 2),
        table(
            [
                "model",
                "device",
                "device name",
                "s/epoch (final fit)",
                "images/s",
                "feature extraction s",
                "feature cache",
                "search s",
                "final fit s",
            ],
            rows,
            "timing",
        ),
    ]
    by_key: dict[str, dict[str, float]] = {}
    for r in study.device_runs:
        s = r.data.metrics.get("seconds_per_epoch")
        if s:
            by_key.setdefault(r.data.tags.get(schema.MODEL_KEY, "?"), {}).setdefault(
                r.data.tags.get(schema.DEVICE, "?"), s
            )
    side = [
        [k, _f(d["CPU"], 3), _f(d["GPU"], 3), f"{d['CPU'] / d['GPU']:.1f}x"]
        for k, d in sorted(by_key.items())
        if "CPU" in d and "GPU" in d
    ]
    if side:
        blocks += [
            h("CPU vs GPU (same model and recipe)", 3),
            table(["model", "CPU s/epoch", "GPU s/epoch", "GPU speed-up"], side, "cpu-gpu"),
        ]
    else:
        blocks.append(
            p(
                "No model of this study has runs on both a CPU and a GPU yet; run the same recipe on a GPU "
                "machine into the same store to get the side-by-side speed-up."
            )
        )
    return blocks


def _data(models: list[ModelResult]) -> list:
    blocks = [h("Data", 2)]
    for task in sorted({m.task for m in models}):
        m = next(x for x in models if x.task == task)
        d = m.data
        rows = [
            [s] + [d["counts"][s].get(c, 0) for c in d["classes"]] + [sum(d["counts"][s].values())]
            for s in ("train", "val", "test")
        ]
        dup = d.get("duplicates", [])
        cross = [x for x in dup if x["cross_split"]]
        blocks += [
            h(f"Task {task}", 3),
            table(["split"] + d["classes"] + ["total"], rows, f"counts-{task}"),
            p(
                f"Test split: {d['test_source']}. Preprocessing: {m.params.get('model.image_size')} px, colour "
                f"policy '{m.params.get('model.colour') or m.params.get('data.colour')}' (greyscale replicated to 3 "
                f"channels by default), the "
                f"backbone's own input scaling inside the model. Original colour modes per class: "
                + "; ".join(f"{c}: " + ", ".join(f"{k} {v}" for k, v in md.items()) for c, md in d["modes"].items())
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


def build_blocks(study: Study, out: Path) -> tuple[list, dict]:
    models = study.models
    computed = {m.key: test_metrics(m) for m in models}
    colours = figures.palette(sorted({c for m in models for c in m.classes}))
    blocks = [
        h(f"Comparison report: study '{study.name}'", 1),
        p(
            f"{len(models)} model(s) from MLflow experiment {study.experiment_id} "
            f"({get_paths().tracking_uri}); generated {time.strftime('%Y-%m-%d %H:%M')}."
        ),
        p(
            "Research use only: not a diagnostic tool. In this data the COVID-19 images come from publications and "
            "the other classes from a paediatric archive, so a classifier can learn the source rather than the "
            "disease (DeGrave et al. 2021): read the t-SNE panel coloured by image source."
        ),
    ]
    if study.missing:
        blocks.append(p("Missing (no final run yet): " + ", ".join(study.missing)))
    blocks += (
        [h("Summary", 2)]
        + _summary(models, computed)
        + _champions(study)
        + _floor(models, computed)
        + _colour(models, computed)
        + _nested(models, computed)
        + _mcnemar(models)
    )
    blocks.append(h("Confusion matrices (test)", 2))
    for m in models:
        rows = m.split("test")
        if rows:
            y = np.array([m.classes.index(r["true"]) for r in rows])
            yp = np.array([m.classes.index(r["pred"]) for r in rows])
            blocks.append(
                img(
                    confusion_figure(
                        y, yp, m.classes, f"{m.key} — test (n={len(rows)})", out / f"confusion-{m.key}.png"
                    ),
                    f"Confusion matrix of {m.key}",
                )
            )
    blocks.append(h("Training curves", 2))
    # An ensemble of backbones trained nothing itself: no curves of its own (its members' are above).
    blocks += [
        img(figures.curves(m, out / f"curves-{m.key}.png"), f"Training curves of {m.key}") for m in models if m.history
    ]
    blocks.append(h("t-SNE of penultimate-layer features", 2))
    blocks += [
        img(
            figures.tsne(m, colours, out / f"tsne-{m.key}.png"),
            f"t-SNE of {m.key}"
            + (
                f" ({len(m.embeddings['y'])} of {int(m.embeddings['of'])} images, a stratified sample)"
                if "of" in m.embeddings and len(m.embeddings["y"]) < int(m.embeddings["of"])
                else ""
            ),
        )
        for m in models
    ]
    blocks.append(h("Tuning overview", 2))
    for m in [m for m in models if m.head_trials]:
        objective = m.search.data.params.get(schema.SEARCH_OBJECTIVE, "val_loss")
        blocks.append(img(figures.tuning(m, objective, out / f"tuning-{m.key}.png"), f"Search of {m.key}"))
        top = sorted(
            [r for r in m.head_trials if np.isfinite(r["objective"])],
            key=lambda r: r["objective"],
            reverse=not minimised(objective),
        )[:5]
        keys = sorted({k for r in top for k in r} - {"trial", "status", "objective", "seconds", "stage"})
        blocks.append(
            table(
                ["trial", objective, "seconds"] + keys,
                [[r["trial"], _f(r["objective"], 4), _f(r["seconds"], 1)] + [r.get(k, "—") for k in keys] for r in top],
                f"top-trials-{m.key}",
            )
        )
    blocks += _finetune(models) + _gradcam(models, out) + _audit(models, computed) + _timing(models, study)
    blocks += _data(models)
    return blocks, computed


def compare(study: str, out: Path | None = None, expected: list[str] | None = None) -> Path:
    """Build the report of a study from MLflow into `out` (default under HARNESS_HOME), log it, return report.html."""
    from harness.tracking.registry import champions

    log.info("Report of study %s", study)
    data = collect(study, expected)  # before setup(), which would create a missing experiment
    tracking.setup(study)
    out = (out or get_paths().reports / study).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if n := tracking.end_orphans(mlflow.get_experiment_by_name(study).experiment_id, schema.COMPARE):
        log.warning("Study %s: %d earlier compare run(s) whose process was killed marked KILLED", study, n)
    with tracking.run(f"compare {study}", tags={schema.KIND: schema.COMPARE, schema.STUDY: study}):
        data.champions = champions(study, [m.run for m in data.models])
        mlflow.set_tags(
            {
                f"champion.{task}": f"{c['uri']} = version {c['version']} ({c['model_key']})"
                for task, c in data.champions.items()
            }
        )
        blocks, computed = build_blocks(data, out)
        (out / "report.md").write_text(to_markdown(blocks, out))
        (out / "report.html").write_text(to_html(blocks, f"cxr-harness report: {study}"))
        for key, t in computed.items():
            mlflow.log_metrics(
                {
                    f"{key}.test.{k}": v
                    for k, v in t.items()
                    if k in ("accuracy", "accuracy_ci_low", "accuracy_ci_high") and np.isfinite(v)
                }
            )
        mlflow.log_artifacts(str(out), "report")
    return out / "report.html"
