"""The report's comparisons across models, each a folded section below the answer: the champion aliases, every model
against its floor, the models of a task in pairs, colour policies, the nested estimate, where the models look
(Grad-CAM), the source audit. Rows follow each task's selection order (`common.ordered`), never test accuracy."""

from __future__ import annotations

import itertools

import numpy as np

from harness.report.collect import ModelResult, Study
from harness.report.common import NESTED_SETS, acc_cp, num, obj, ordered, paired, tasks_of
from harness.report.render import details, h, p, table
from harness.tracking import schema


def by_task(models: list[ModelResult]) -> list[ModelResult]:
    """Every model, task by task, each task's in selection order."""
    return [m for task in tasks_of(models) for m in ordered([x for x in models if x.task == task])]


def section(title: str, blocks: list) -> list:
    """A folded top-level section (a level-2 heading in Markdown)."""
    return [details(title, blocks, level=2)] if blocks else []


def champions(study: Study) -> list:
    if not study.champions:
        return []
    rows = [
        [
            task,
            c["uri"],
            c["version"],
            c["model_key"],
            c["source"],
            f"{c['objective']} {obj(c['value'])}",
            c["candidates"],
            "on the best candidate" if c["best_now"] else "on an earlier model with a better validation objective",
        ]
        for task, c in sorted(study.champions.items())
    ]
    return section(
        "Champions",
        [
            p(
                "Each task's `champion` alias points at the final model with the best validation objective (the one "
                "its search chose it by: the cross-validated or validation-split loss), never at the best test "
                "accuracy, which would turn the test split into a selection set. It moves only when a strictly "
                "better model exists. Serve it with `mlflow models serve -m <uri> --env-manager local`."
            ),
            table(
                ["task", "model URI", "version", "model", "points at", "chosen by", "candidates", "alias"],
                rows,
                "champions",
            ),
        ],
    )


def _verdict(res: dict, diff: float) -> str:
    if res["p_value"] >= 0.05:
        return "not significant"
    return "tuned better (p<0.05)" if diff > 0 else "floor better (p<0.05)"


def floor(models: list[ModelResult], computed: dict) -> list:
    rows = []
    for m in [m for m in by_task(models) if m.baseline is not None]:
        res = paired(m.split("test"), m.baseline_predictions)
        if res is None:
            continue
        b, t = m.baseline.data.metrics, computed[m.key]
        diff = t["accuracy"] - b[f"{schema.TEST}accuracy"]
        rows.append(
            [
                m.key,
                f"{num(b.get('cv_accuracy'))} ± {num(b.get('cv_accuracy_std'))}",
                acc_cp(b, schema.TEST),
                acc_cp(t),
                f"{diff:+.3f}",
                res["a_only"],
                res["b_only"],
                num(res["p_value"], 4),
                _verdict(res, diff),
            ]
        )
    return section(
        "Against the floor",
        [
            p(
                "The floor: logistic regression on average-pooled features of the same frozen backbone, fitted on "
                "train+validation; its 5-fold CV accuracy (the floor's own protocol) and its accuracy on the same "
                "test images as the tuned model, paired with the exact McNemar test."
            ),
            table(
                [
                    "model",
                    "floor 5-fold CV accuracy",
                    "floor test accuracy [exact 95% CI]",
                    "tuned test accuracy [exact 95% CI]",
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
        if rows
        else [],
    )


def colour(models: list[ModelResult], computed: dict) -> list:
    """Models of one task and backbone that differ only by colour policy, side by side."""
    rows = []
    for a, b in itertools.combinations(by_task(models), 2):
        ca, cb = (m.params.get("model.colour") or m.params.get("data.colour") for m in (a, b))
        if a.task != b.task or a.backbone != b.backbone or ca == cb or None in (ca, cb):
            continue
        grey, rgb = (a, b) if ca == "grey" else (b, a)
        res = paired(grey.split("test"), rgb.split("test"))
        src = [
            num(m.audit["source_from_features"]["accuracy"]) if m.audit and "source_from_features" in m.audit else "—"
            for m in (grey, rgb)
        ]
        rows.append(
            [
                grey.task,
                grey.backbone,
                f"{grey.key}: {num(computed[grey.key].get('accuracy'))}",
                f"{rgb.key}: {num(computed[rgb.key].get('accuracy'))}",
                *src,
                num(res["p_value"], 4) if res else "—",
            ]
        )
    if not rows:
        return []
    headers = ["task", "backbone", "greyscale: test accuracy", "RGB: test accuracy"]
    headers += ["source from features (grey)", "source from features (RGB)", "exact McNemar p"]
    return section(
        "Colour policy: greyscale against RGB",
        [
            p(
                "The same task and backbone with images converted to greyscale (the default) and kept in colour. In "
                "this data colour mode marks the source: a gain from colour is a gain from the shortcut, which the "
                "backbone's ability to recognise the source (the colour mode) from its features shows."
            ),
            table(headers, rows, "colour"),
        ],
    )


def mcnemar_pairs(models: list[ModelResult]) -> list:
    rows = []
    ms = by_task(models)
    for a, b in itertools.combinations(ms, 2):
        if a.task != b.task:
            continue
        res = paired(a.split("test"), b.split("test"))
        if res is None:
            rows.append([a.task, a.key, b.key, "—", "—", "—", "—", "—", "different test sets: not comparable"])
            continue
        verdict = "significant at 0.05" if res["p_value"] < 0.05 else "not significant: no evidence either is better"
        counts = [res[k] for k in ("both_right", "a_only", "b_only", "both_wrong")]
        rows.append([a.task, a.key, b.key, *counts, num(res["p_value"], 4), verdict])
    headers = ["task", "model A", "model B", "both right", "only A right", "only B right", "both wrong"]
    headers += ["exact McNemar p", "verdict"]
    title = "Pairwise comparison on the same test images"
    if not rows:
        return section(title, [p("Each task has one model here: no pair to compare (its floor still applies).")])
    return section(
        title,
        [
            p(
                "Exact McNemar test on the images where exactly one model is right (the discordant pairs); model A "
                "comes before model B in the task's selection order."
            ),
            table(headers, rows, "mcnemar"),
        ],
    )


def _nested_rows(ms: list[ModelResult], computed: dict) -> list[list]:
    rows = []
    for m in ms:
        n, t = m.nested.data.metrics, computed[m.key]
        pre = schema.NESTED_PREFIX
        rows.append(
            [
                m.key,
                int(n.get(f"{pre}n", 0)),
                acc_cp(n, pre),
                acc_cp(n, f"{pre}floor."),
                int(n.get(f"{pre}vs_floor.only_tuned", 0)),
                int(n.get(f"{pre}vs_floor.only_floor", 0)),
                num(n.get(f"{pre}vs_floor.p_value"), 4),
                f"{acc_cp(t)} (n={t.get('n')})",
            ]
        )
    return rows


def _nested_averaged(ms: list[ModelResult]) -> list:
    rows = [
        [
            m.key,
            label,
            acc_cp(n, f"{name}."),
            int(n.get(f"{name}.vs_image_alone.only_averaged", n.get(f"{name}.vs_image_alone.only_views", 0))),
            int(n.get(f"{name}.vs_image_alone.only_image", 0)),
            num(n.get(f"{name}.vs_image_alone.p_value"), 4),
            num(n.get(f"{name}.vs_floor.p_value"), 4),
        ]
        for m in ms
        for name, label in NESTED_SETS
        if f"{name}.accuracy" in (n := m.nested.data.metrics)
    ]
    if not rows:
        return []
    headers = ["model", "averaged over", "accuracy [exact 95% CI]", "only averaged right", "only image right"]
    headers += ["exact McNemar p", "exact McNemar p vs floor"]
    return [
        p(
            "The same outer models, each held-out image predicted as the mean over copies of it (evaluation.tta: "
            "random augmented copies; evaluation.view_tta: it and the views its heads trained on), paired with "
            "the image alone on every image:"
        ),
        table(headers, rows, "nested-averaged"),
    ]


def _nested_finetune(ms: list[ModelResult]) -> list:
    """The fine-tuning stage repeated in every outer fold: the same outer folds before and after it, paired."""
    pre = schema.NESTED_PREFIX
    rows = [
        [
            m.key,
            f"{int(n.get(f'{pre}{schema.FINETUNE_PREFIX}outer_chosen', 0))} of "
            f"{m.nested.data.params.get(f'{pre}outer_folds', '?')}",
            acc_cp(n, "nested_head."),
            acc_cp(n, pre),
            int(n.get(f"{pre}vs_head.only_finetuned", 0)),
            int(n.get(f"{pre}vs_head.only_head", 0)),
            num(n.get(f"{pre}vs_head.p_value"), 4),
        ]
        for m in ms
        if "nested_head.accuracy" in (n := m.nested.data.metrics)
    ]
    if not rows:
        return []
    headers = ["model", "outer folds that chose fine-tuning", "before the stage [exact 95% CI]"]
    headers += ["with the stage [exact 95% CI]", "only with the stage right", "only before it right", "exact McNemar p"]
    return [
        p(
            "The fine-tuning stage ran inside every outer fold as well (search.nested_finetune), so the estimate "
            "above covers it; its outer models before the stage, paired with the same models after it on every "
            "image, say whether the stage helps the procedure:"
        ),
        table(headers, rows, "nested-finetune"),
    ]


def nested(models: list[ModelResult], computed: dict) -> list:
    ms = [m for m in by_task(models) if m.nested is not None]
    if not ms:
        return []
    headers = ["model", "images", "nested accuracy [exact 95% CI]", "floor, same outer folds [exact 95% CI]"]
    headers += ["only tuned right", "only floor right", "exact McNemar p", "test accuracy [exact 95% CI]"]
    return section(
        "How good is the procedure: nested cross-validation",
        [
            p(
                "The test accuracy is one model on one test split; the nested estimate repeats the whole head search "
                "and final fit (and the fine-tuning stage, where it ran inside) in an outer loop over "
                "train+validation, so each of its images is predicted by a model chosen without it: it says how well "
                "this procedure does on new images of this data, not how good one model is."
            ),
            table(headers, _nested_rows(ms, computed), "nested"),
            *_nested_finetune(ms),
            *_nested_averaged(ms),
        ],
    )


def even_spread_share(image_size: int | None) -> float:
    """The share outside the lung field of a map spread evenly over the image: what a model that looks nowhere in
    particular scores, measured as the report's shares are (on the model's image size where known)."""
    from harness.evaluation.gradcam import LUNG_BOX, outside_share

    if image_size:
        return float(outside_share(np.ones((1, int(image_size), int(image_size))))[0])
    left, top, right, bottom = LUNG_BOX
    return 1.0 - (right - left) * (bottom - top)


EVEN_BAND = 0.02  # within this of the even spread, a map prefers neither the lung field nor its surroundings


def gradcam_reading(share: float, even: float) -> str:
    if share > even + EVEN_BAND:
        return "more outside than an even spread: look at the overlays for borders, text or markers"
    if share < even - EVEN_BAND:
        return "less outside than an even spread: drawn to the lung field"
    return "about as an even spread: no preference for the lung field"


SHORT_READING = {"more": "more outside", "less": "less outside", "about": "≈ even"}


def _gradcam_task(ms: list[ModelResult], task: str) -> list:
    """One row per model, a column per class: its share outside the lung field and how it reads against an even
    spread; the models whose map leans outside named in a line."""
    classes = list(dict.fromkeys(c for m in ms for c in m.classes))
    rows, leaning = [], []
    for m in ms:
        even = even_spread_share(m.params.get("model.image_size"))
        shares = m.gradcam["outside_lung_share"]
        cells = []
        for c in classes:
            if c not in shares:
                cells.append("—")
                continue
            word = gradcam_reading(shares[c], even).split(" ", 1)[0]
            cells.append(f"{num(shares[c], 2)} ({SHORT_READING[word]})")
            if word == "more":
                leaning.append(f"{m.key} ({c} {num(shares[c], 2)})")
        rows.append([m.key, num(even, 2), *cells])
    blocks = [h(f"Task {task}", 3), table(["model", "even spread", *classes], rows, f"gradcam-{task}")]
    if leaning:
        blocks.append(
            p(f"More outside than an even spread: {', '.join(leaning)}: {gradcam_reading(1.0, 0.0).split(': ', 1)[1]}.")
        )
    return blocks


def gradcam(models: list[ModelResult]) -> list:
    from harness.evaluation.gradcam import LUNG_BOX

    with_maps = [m for m in by_task(models) if m.gradcam]
    if not with_maps:
        return []
    left, top, right, bottom = LUNG_BOX
    blocks = [
        p(
            f"Grad-CAM of each final model on its test images (the overlays are in each model's details). The "
            f"lung field is a fixed central box: {left:.0%}-{right:.0%} of the width and {top:.0%}-{bottom:.0%} "
            f"of the height. Per class, the share of the map (for that class, over the test images of that class) "
            f"outside the box, against the share of a map spread evenly over the image (the box's outside area, "
            f"'even spread'): a model that looks nowhere in particular scores that. More than {EVEN_BAND:.2f} above "
            f"it reads 'more outside' (its evidence leans to the borders), as far below 'less outside' (drawn to "
            f"the lung field), else '≈ even'."
        )
    ]
    for task in tasks_of(with_maps):
        blocks += _gradcam_task([m for m in with_maps if m.task == task], task)
    return section("Where the models look (Grad-CAM)", blocks)
