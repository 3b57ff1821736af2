"""Each model's details, folded under its task: what it is and how it was chosen, its test metrics per class, the
confusion matrix, training curves, t-SNE, the head search and the fine-tuning stage, Grad-CAM overlays."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harness.evaluation.metrics import confusion_figure
from harness.recipe import minimised
from harness.report import figures
from harness.report.collect import ModelResult, Study
from harness.report.common import (
    EXTRA_SETS,
    champion_key,
    exact,
    final_words,
    hyperparameters,
    num,
    obj,
    objective_name,
    ordered,
    selection,
    selection_value,
    tasks_of,
    trial_number,
    weights_words,
)
from harness.report.render import details, h, img, p, table
from harness.tracking import schema


def model_table(m: ModelResult, t: dict) -> list:
    search_s = m.search.data.metrics.get("search_seconds") if m.search else None
    extra = [(key, words) for key, words in EXTRA_SETS if key in m.metrics]
    headers = ["model", "backbone", "weights", "best hyperparameters", "selected by (validation)", "final model"]
    headers += ["test n", "ROC AUC", "test loss", "trials", "tuning s", *(words for _, words in extra)]
    row = [m.key, m.backbone, weights_words(m), hyperparameters(m), selection(m), final_words(m), t.get("n", 0)]
    row += [num(t.get("roc_auc")), num(t.get("loss")), len(m.trials) or "—", num(search_s, 1)]
    row += [num(m.metrics.get(key)) for key, _ in extra]
    return [table(headers, [row], f"model-{m.key}")]


def class_table(m: ModelResult, t: dict) -> list:
    counts = {c: sum(r["true"] == c for r in m.split("test")) for c in m.classes}
    rows = [[c, counts[c], num(t.get(f"precision.{c}")), num(t.get(f"recall.{c}"))] for c in m.classes]
    return [table(["class", "test images", "precision", "recall (sensitivity)"], rows, f"classes-{m.key}")]


def confusion(m: ModelResult, out: Path) -> list:
    rows = m.split("test")
    if not rows:
        return []
    y = np.array([m.classes.index(r["true"]) for r in rows])
    yp = np.array([m.classes.index(r["pred"]) for r in rows])
    path = confusion_figure(y, yp, m.classes, f"{m.key} — test (n={len(rows)})", out / f"confusion-{m.key}.png")
    return [img(path, f"Confusion matrix of {m.key}")]


def curves(m: ModelResult, out: Path) -> list:
    if schema.ENSEMBLE_MEMBERS in m.tags:
        return [p("An average of trained models: no training of its own (its members' curves are in their details).")]
    path = figures.curves(m, out / f"curves-{m.key}.png")
    if path is not None:
        return [img(path, f"Training curves of {m.key}")]
    logged = {k: v for k, v in m.history.items() if v}
    if not logged:
        return [p("No training curve was logged for the final fit.")]
    values = ", ".join(f"{k} {num(v[-1], 4)}" for k, v in sorted(logged.items()))
    return [p(f"The final fit logged one epoch ({values}): one point is no curve, so none is drawn.")]


def tsne(m: ModelResult, colours: dict, out: Path) -> list:
    e = m.embeddings
    sampled = "of" in e and len(e["y"]) < int(e["of"])
    shown = f" ({len(e['y'])} of {int(e['of'])} images, a stratified sample)" if sampled else ""
    caption = f"t-SNE of {m.key}{shown}"
    return [img(figures.tsne(m, colours, out / f"tsne-{m.key}.png"), caption)]


def tuning(m: ModelResult, out: Path) -> list:
    if not m.head_trials:
        return []
    objective = objective_name(m)
    top = sorted(
        [r for r in m.head_trials if np.isfinite(r["objective"])],
        key=lambda r: r["objective"],
        reverse=not minimised(objective),
    )[:5]
    keys = sorted({k for r in top for k in r} - {"trial", "status", "objective", "seconds", "stage", "pruned"})
    pruned = any(r.get("pruned") for r in top)
    rows = [
        [trial_number(r["trial"]), obj(r["objective"]), num(r["seconds"], 1)]
        + [r.get(k, "—") for k in keys]
        + (["yes" if r.get("pruned") else ""] if pruned else [])
        for r in top
    ]
    headers = ["trial", objective, "seconds", *keys, *(["pruned"] if pruned else [])]
    return [
        h("Head search", 4),
        img(figures.tuning(m, objective, out / f"tuning-{m.key}.png"), f"Search of {m.key}"),
        p(f"The best {len(top)} of {len(m.head_trials)} trials, numbered as in the figure (from 0):"),
        table(headers, rows, f"top-trials-{m.key}"),
    ]


def finetune(m: ModelResult) -> list:
    if not m.search or schema.FINETUNE_CHOSEN not in m.search.data.tags:
        return []
    s = m.search.data
    objective = objective_name(m)
    ft = [r for r in m.trials if r.get("stage") == "finetune"]
    kept = [r for r in ft if not r.get("pruned")]  # a pruned trial's objective is of fewer epochs: never the best
    best = (min if minimised(objective) else max)(kept, key=lambda r: r["objective"]) if kept else {}
    n_pruned = len(ft) - len(kept)
    start = s.metrics.get(f"{schema.FINETUNE_PREFIX}start_{objective}")
    row = [
        m.key,
        obj(start),
        obj(s.metrics.get(f"{schema.FINETUNE_PREFIX}best_{objective}")),
        obj(s.metrics.get(f"{schema.FINETUNE_PREFIX}bar_{objective}")),
        s.params.get(f"{schema.SEARCH_PREFIX}finetune.accept", "any_gain"),
        f"{len(ft)} ({n_pruned} pruned)" if n_pruned else len(ft),
        ", ".join(f"{k.removeprefix(schema.FT_HP)}={v}" for k, v in best.items() if k.startswith(schema.FT_HP)),
        "yes" if s.tags[schema.FINETUNE_CHOSEN] == "true" else "no: the head-only model stays",
    ]
    headers = ["model", "head-only objective", "best fine-tuned objective", "bar", "rule", "trials"]
    headers += ["best fine-tuning", "chosen"]
    return [
        h("Fine-tuning stage", 4),
        p(
            "From the best head, a second search over how much of the backbone to unfreeze (0 = frozen, top blocks, "
            "half or all), its learning rate and augmentation strength, on the same folds (a trial pruned by the "
            "median rule is counted, never chosen); its best trial replaces the head-only model only when it beats "
            "the bar on the same validation images: the head-only objective itself (any_gain), or that objective "
            "moved by one standard error of the best trial's fold mean (one_se)."
        ),
        table(headers, [row], f"finetune-{m.key}"),
        p(
            f"Two different measurements: the head search's best {objective} ({obj(selection_value(m))}, what chose "
            f"this model and what the champion rule reads) is its best trial's fold mean at its best epoch; the "
            f"head-only objective ({obj(start)}) re-measures the final head-only model, refitted from a fresh seed, "
            f"on the same validation images: the start fine-tuning has to beat.",
            "note",
        ),
    ]


def gradcam_images(m: ModelResult, out: Path) -> list:
    if not m.gradcam_png:
        return []
    path = out / f"gradcam-{m.key}.png"
    path.write_bytes(m.gradcam_png)
    caption = (
        f"Grad-CAM of {m.key}: per class its most confident correct and wrong test prediction (map of the predicted "
        f"class; white box: the lung field)"
    )
    return [h("Where it looks (Grad-CAM)", 4), img(path, caption)]


def model_details(study: Study, m: ModelResult, computed: dict, colours: dict, out: Path):
    t = computed[m.key]
    champion = champion_key(study, m.task) == m.key
    title = (
        f"{m.key}{' ★ champion' if champion else ''}: {objective_name(m)} {obj(selection_value(m))}, test accuracy "
        f"{exact(t.get('accuracy'), t.get('accuracy_cp_low'), t.get('accuracy_cp_high'))}"
    )
    blocks = model_table(m, t) + class_table(m, t) + confusion(m, out)
    blocks += [h("Training curves", 4), *curves(m, out), h("t-SNE of penultimate-layer features", 4)]
    blocks += tsne(m, colours, out) + tuning(m, out) + finetune(m) + gradcam_images(m, out)
    return details(title, blocks, level=3)


def models(study: Study, computed: dict, out: Path) -> list:
    """Per task a heading and each of its models folded, in selection order."""
    colours = figures.palette(sorted({c for m in study.models for c in m.classes}))
    blocks = []
    for task in tasks_of(study.models):
        ms = ordered([m for m in study.models if m.task == task])
        blocks.append(h(f"Models of task {task}, in selection order", 2))
        blocks += [model_details(study, m, computed, colours, out) for m in ms]
    return blocks
