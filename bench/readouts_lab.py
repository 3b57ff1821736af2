"""Readouts: what else a frozen backbone's maps could give a head besides the one average-pooled top vector the
harness trains on — the pooled outputs of earlier stages, the top maps pooled by max as well, or by image halves
(left/right lung, upper/lower zone), or the top map of the images contrast-equalised first (CLAHE) — each scored
by the floor's own linear probe (standardised logistic regression) under repeated stratified, patient-grouped
cross-validation of train+validation. The test split is never read: this answers "would another readout help the
procedure", not "which one wins on the test images".

Only the EfficientNet-Lite backbones are known here (their stage ends are named by `efficientnet_lite`)."""

from __future__ import annotations

import json
import re
import time

import keras
import mlflow
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from harness.data import TaskData, prepare_task
from harness.data.splits import cv_folds
from harness.errors import HarnessError
from harness.features.store import forward_fn
from harness.models.backbones import SPECS, build_backbone
from harness.models.heads import fixed_views, random_views
from harness.models.layers import preprocessing
from harness.recipe import Recipe
from harness.tracking import runs as tracking
from harness.tracking import schema

TOP = "top"  # the harness's own readout: the last map, average-pooled


def stage_ends(backbone: keras.Model) -> list[tuple[str, keras.KerasTensor]]:
    """(name, output) of the last block of every stage (where the channel count changes next) and the top map."""
    names = {layer.name for layer in backbone.layers}
    if "head_relu" not in names:
        raise HarnessError(f"readouts know the EfficientNet-Lite backbones only, not '{backbone.name}'")

    def block(b: int):
        for suffix in ("add", "project_bn"):  # a block with a residual ends at its add
            if f"block{b}_{suffix}" in names:
                return backbone.get_layer(f"block{b}_{suffix}").output
        return None

    ends, b = [], 0
    while (out := block(b)) is not None:
        nxt = block(b + 1)
        if nxt is None or nxt.shape[-1] != out.shape[-1]:
            ends.append((f"stage{len(ends) + 1}", out))
        b += 1
    return [*ends, (TOP, backbone.get_layer("head_relu").output)]


CLAHE_CLIP = 0.01  # scikit-image's default clip limit


def equalised(images: np.ndarray) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (scikit-image's `equalize_adapthist`, on the value channel of
    a colour image, so a greyscale one stays grey) of uint8 image batches, back to uint8: a common X-ray
    preprocessing step, here only a readout to score, not a step of the harness's pipeline."""
    try:
        from skimage import exposure
    except ImportError:
        raise HarnessError("the CLAHE readout needs scikit-image (pip install scikit-image)") from None
    return np.stack(
        [np.round(exposure.equalize_adapthist(im, clip_limit=CLAHE_CLIP) * 255).astype(np.uint8) for im in images]
    )


def readouts(
    task: TaskData,
    idx: np.ndarray,
    backbone_name: str,
    image_size: int,
    weights: str = "imagenet",
    mirror: str | None = None,
    copies: int = 0,
    strength: float = 0.5,
    fixed: bool = False,
    batch: int = 32,
    clahe: bool = False,
) -> tuple[dict, np.ndarray | None]:
    """(name -> (len(idx), D) float32 vectors of every readout, from one pass of the images through the backbone;
    the top average of `copies` augmented copies of every image, (copies, len(idx), D), or None). The copies are the
    feature store's own views of `training.views`, by the same path (`forward_fn(view=)`), so they are the features
    the harness trains on: random copies (`random_views`: every image its own rotation, zoom, shift and contrast,
    drawn from its content hash) or, with `fixed`, the same transforms for every image (`fixed_views`). With `clahe`
    also the top average of the images equalised first (`equalised`)."""
    backbone, _ = build_backbone(backbone_name, weights, image_size, mirror)
    ends = stage_ends(backbone)
    multi = keras.Model(backbone.input, [out for _, out in ends])  # the backbone's own inputs (Keras 3 needs them)
    spec = SPECS[backbone_name]
    pre = preprocessing(spec.preprocess, task.colour)
    parts: dict[str, list[np.ndarray]] = {}
    augmented = [[] for _ in range(copies)]
    kinds = (fixed_views if fixed else random_views)(copies, strength)
    views = [forward_fn(backbone, spec.preprocess, task.colour, view=layer) for _, layer in kinds]

    def add(name, value):
        parts.setdefault(name, []).append(np.asarray(value, np.float32))

    for s in range(0, len(idx), batch):
        images = task.images(idx[s : s + batch])
        outs = [np.asarray(o) for o in multi(pre(images), training=False)]
        sha1s = [task.sha1s[i] for i in idx[s : s + batch]]
        for k, view in enumerate(views):
            augmented[k].append(np.asarray(view(images, sha1s)).mean(axis=(1, 2)))
        for (name, _), maps in zip(ends, outs):
            add(f"{name} avg", maps.mean(axis=(1, 2)))
        if clahe:
            add(f"{TOP} avg of CLAHE images", np.asarray(backbone(pre(equalised(images)), training=False)).mean((1, 2)))
        top = outs[-1]
        # The middle row/column of an odd-sized map belongs to neither half; a 1x1 map (tiny images) is both.
        h, w = max(1, top.shape[1] // 2), max(1, top.shape[2] // 2)
        left, right = top[:, :, :w].mean(axis=(1, 2)), top[:, :, -w:].mean(axis=(1, 2))
        upper, lower = top[:, :h].mean(axis=(1, 2)), top[:, -h:].mean(axis=(1, 2))
        add("top avg+max", np.concatenate([top.mean(axis=(1, 2)), top.max(axis=(1, 2))], 1))
        add("top avg+|left-right|", np.concatenate([top.mean(axis=(1, 2)), np.abs(left - right)], 1))
        add("top halves (left, right, upper, lower)", np.concatenate([left, right, upper, lower], 1))
    out = {name: np.concatenate(p) for name, p in parts.items()}
    stages = [f"{name} avg" for name, _ in ends]
    out["last three stages + top avg"] = np.concatenate([out[n] for n in stages[-4:]], 1)
    out["every stage + top avg"] = np.concatenate([out[n] for n in stages], 1)
    return out, (np.stack([np.concatenate(a) for a in augmented]) if copies else None)


def probe(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    c: float,
    repeats: int,
    seed: int,
    copies: np.ndarray | None = None,
    train_on_copies: bool = False,
    tta: bool = False,
    ensemble: list[np.ndarray] = (),
) -> dict:
    """Mean accuracy and log loss of the floor's probe (C = `c`) over `repeats` different 5-fold grouped splits.
    With `copies` (augmented versions of x's rows): train on the originals and every copy (`train_on_copies`), and/or
    predict each validation image as the mean over its original and copies (`tta`). With `ensemble` (other readouts
    of the same images, e.g. other backbones'): one probe more on each, their probabilities averaged with x's."""
    acc, loss = [], []
    rows = np.arange(len(y))
    views = [x] if copies is None else [x, *copies]
    for r in range(repeats):
        for tr, va in cv_folds(rows, y, groups, 5, seed + r):
            fit_views = views if train_on_copies else [x]
            model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000)).fit(
                np.concatenate([v[tr] for v in fit_views]), np.tile(y[tr], len(fit_views))
            )
            p = np.mean([model.predict_proba(v[va]) for v in (views if tta else [x])], axis=0)
            if len(ensemble):
                others = [
                    make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
                    .fit(o[tr], y[tr])
                    .predict_proba(o[va])
                    for o in ensemble
                ]
                p = np.mean([p, *others], axis=0)
            acc.append(float((p.argmax(1) == y[va]).mean()))
            loss.append(float(log_loss(y[va], p, labels=np.arange(p.shape[1]))))
    return {"accuracy": float(np.mean(acc)), "accuracy_sd": float(np.std(acc)), "log_loss": float(np.mean(loss))}


def top_average(recipe: Recipe, task_name: str, key: str, files: list) -> np.ndarray:
    """Model `key`'s own readout (its backbone's top map, average-pooled, at its size and colour) of the images
    `files` of task `task_name`, in that order."""
    m = recipe.model(key)
    if m.task != task_name:
        raise HarnessError(f"--also {key}: task {m.task}, not {task_name}: readouts compare one task's images")
    size = recipe.image_size_for(m)
    task = prepare_task(recipe, m.task, size, recipe.colour_for(m))
    where = {f: i for i, f in enumerate(task.files)}
    feats, _ = readouts(task, np.array([where[f] for f in files]), m.backbone, size, m.weights, recipe.weights_mirror)
    return feats[f"{TOP} avg"]


def readout_benchmark(
    recipe: Recipe,
    model_key: str | None,
    cs: list[float],
    repeats: int,
    copies: int = 0,
    strength: float = 0.5,
    fixed: bool = False,
    also: list[str] = (),
    clahe: bool = False,
) -> dict:
    """Every readout of `model_key`'s backbone scored by the probe; with `also` (other models of the same task),
    their backbones' top averages as well: concatenated with this one's, and their probes averaged with its."""
    mcfg = recipe.model(model_key)
    size, colour = recipe.image_size_for(mcfg), recipe.colour_for(mcfg)
    t0 = time.perf_counter()
    task = prepare_task(recipe, mcfg.task, size, colour)
    idx = task.pool()
    seed = recipe.data.seed
    feats, augmented = readouts(
        task, idx, mcfg.backbone, size, mcfg.weights, recipe.weights_mirror, copies, strength, fixed, clahe=clahe
    )
    tops = [top_average(recipe, mcfg.task, key, [task.files[i] for i in idx]) for key in also]
    t1 = time.perf_counter()
    y, groups = task.y[idx], task.groups[idx]
    ref = f"{TOP} avg"
    variants = {name: (x, {}) for name, x in feats.items()}
    if also:
        names = " + ".join([mcfg.backbone, *(recipe.model(k).backbone for k in also)])
        variants[f"{ref} of {names}, concatenated"] = (np.concatenate([feats[ref], *tops], 1), {})
        variants[f"{ref} of {names}, their probes averaged"] = (feats[ref], {"ensemble": tops})
    if copies:
        # Test-time augmentation helps only a head that saw augmented inputs in training: the three ways apart.
        x, kind = feats[ref], "fixed" if fixed else "random"
        variants[f"{ref}, TTA over {copies} {kind} copies"] = (x, {"copies": augmented, "tta": True})
        variants[f"{ref}, trained on {copies} {kind} copies"] = (x, {"copies": augmented, "train_on_copies": True})
        variants[f"{ref}, trained on and TTA over {copies} {kind} copies"] = (
            x,
            {"copies": augmented, "train_on_copies": True, "tta": True},
        )
    scores = {
        name: {"dims": int(x.shape[1]), **{f"C={c:g}": probe(x, y, groups, c, repeats, seed, **kw) for c in cs}}
        for name, (x, kw) in variants.items()
    }
    best_acc = {name: max(v["accuracy"] for k, v in s.items() if k != "dims") for name, s in scores.items()}
    best = max(best_acc, key=best_acc.get)
    result = {
        "model": mcfg.key,
        "image_size": size,
        "images": len(idx),
        "repeats": repeats,
        "augmented_copies": copies,
        "augment_strength": strength if copies else None,
        "copies_kind": ("fixed" if fixed else "random") if copies else None,
        "also": list(also),
        "clahe_clip": CLAHE_CLIP if clahe else None,
        "readout_s": t1 - t0,
        "probe_s": time.perf_counter() - t1,
        "reference": ref,
        "scores": scores,
        # The best readout's margin over the harness's own, both at their best C: the figure that says whether
        # another readout is worth building into the search (a maximum over many noisy scores, so biased upward).
        "best": best,
        "best_minus_reference": best_acc[best] - best_acc[ref],
    }
    tracking.setup("bench")
    with tracking.run(f"readouts {mcfg.key}", tags={schema.KIND: schema.BENCH, **tracking.device_tags()}):
        mlflow.log_params(
            {
                "model": mcfg.key,
                "image_size": size,
                "repeats": repeats,
                "C": ",".join(map(str, cs)),
                "augmented_copies": copies,
                "augment_strength": strength,
                "copies_kind": "fixed" if fixed else "random",
                "also": ",".join(also) or "none",
                "clahe_clip": CLAHE_CLIP if clahe else "none",
            }
        )
        mlflow.log_metrics(
            {
                re.sub(r"[^\w.\- /]+", "_", f"{name}.{k}.{m}"): v
                for name, s in scores.items()
                for k, vals in s.items()
                if k != "dims"
                for m, v in vals.items()
            }
            | {"best_minus_reference": result["best_minus_reference"], "readout_s": result["readout_s"]}
        )
    return result


def print_readouts(r: dict) -> None:
    """A readout benchmark's table, its best readout, and its one JSON line."""
    print(
        f"\nReadouts of {r['model']} ({r['image_size']} px): linear probe accuracy / log loss, {r['repeats']} x 5-fold "
        f"grouped CV of train+validation ({r['images']} images; test split not read)"
    )
    cols = [k for k in next(iter(r["scores"].values())) if k != "dims"]
    width = max(map(len, r["scores"]))
    print(f"  {'readout':<{width}}  {'dims':>5}  " + "  ".join(f"{c:>15}" for c in cols))
    for name, s in r["scores"].items():
        cells = "  ".join(f"{s[c]['accuracy']:.3f} / {s[c]['log_loss']:.3f}" for c in cols)
        print(f"  {name:<{width}}  {s['dims']:>5}  {cells}")
    print(
        f"  best: {r['best']}, {r['best_minus_reference']:+.3f} over '{r['reference']}' (each at its best C); "
        f"readouts {r['readout_s']:.0f} s, probes {r['probe_s']:.0f} s"
    )
    print(json.dumps(r))
