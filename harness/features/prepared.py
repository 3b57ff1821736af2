"""Prepared stage: everything a fit needs that does not depend on the head's hyperparameters — the task's data, the
backbone with its weights, and (frozen backbone) the backbone's cached feature maps and their average-pooled vectors.

An `avg` head trains on the pooled vectors (1280 numbers an image instead of 7x7x1280) and `assemble` puts the pooling
back between backbone and head in the logged model: pooling has no weights, so both are the same function.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import keras
import numpy as np

from harness.data import TaskData, prepare_task
from harness.features.store import Features, features_for, rows
from harness.models import assemble, build_backbone, build_head
from harness.models.backbones import SPECS, WeightsInfo
from harness.models.heads import fixed_views, random_views
from harness.recipe import HeadConfig, ModelConfig, Recipe


@dataclass
class Prepared:
    recipe: Recipe
    mcfg: ModelConfig
    task: TaskData
    backbone: keras.Model
    weights: WeightsInfo
    features: Features | None  # the store's features of a frozen backbone, or None (images go through it)
    info: dict  # feature_cache (hit | miss | bypassed (why)), timings
    test_reads: int = 0  # how often the test split was read (once per final model, by `read_test`)
    views: np.ndarray | None = None  # (V, N, C) pooled vectors of every image's views (training.views), or None

    @functools.cached_property
    def pooled_with_views(self) -> np.ndarray:
        """((V+1) N, C): the originals, then each view's rows in the same image order (row v N + i is view v of
        image i), built once and shared by every fit of this model."""
        out = np.concatenate([self.features.pooled, *self.views])
        out.flags.writeable = False
        return out

    @functools.cached_property
    def tta_views(self) -> np.ndarray:
        """(V, N, C) pooled vectors of every image in each of `evaluation.tta`'s random copies, from the feature
        store: a frozen backbone's copies are the same for every member, fold and outer fold, so they are extracted
        once (and kept), not run through the backbone again for each head."""
        ev = self.recipe.evaluation
        vectors, _ = pooled_views(
            self.task,
            self.mcfg.backbone,
            self.backbone,
            self.weights,
            self.image_size,
            self.colour,
            random_views(ev.tta, ev.tta_strength),
        )
        return vectors

    @property
    def image_size(self) -> int:
        return self.recipe.image_size_for(self.mcfg)

    @property
    def colour(self) -> str:
        return self.recipe.colour_for(self.mcfg)

    @property
    def n_classes(self) -> int:
        return len(self.task.classes)

    @property
    def on_features(self) -> bool:
        return self.features is not None

    @property
    def pooled(self) -> np.ndarray:
        """The task's pooled vectors, read-only: the floor scales its rows in place (sklearn copies a read-only
        array before it would write into it), and no head or stage may change what the store returned."""
        view = self.features.pooled.view()
        view.flags.writeable = False
        return view

    def head_input_shape(self, pooling: str) -> tuple:
        maps = tuple(self.backbone.output.shape[1:])
        return maps[-1:] if pooling == "avg" and len(maps) == 3 else maps

    def source(self, pooling: str) -> np.ndarray:
        """What a fit reads, for every image of the task: the pooled vectors (in memory), the feature maps
        (memory-mapped float16), or the images themselves for a full model."""
        if not self.on_features:
            return self.task.x
        return self.pooled if pooling == "avg" else self.features.maps

    def take(self, idx: np.ndarray, pooling: str) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of some images, in memory: pooled vectors or maps of the cached features for a head, images for
        a full model."""
        return rows(self.source(pooling), np.asarray(idx)), self.task.y[idx]

    def read_test(self) -> np.ndarray:
        """The test split's indices, for the one evaluation of a final model; every read is counted (and logged)."""
        self.test_reads += 1
        return self.task.splits["test"]

    def inputs(self, split: str, pooling: str) -> tuple[np.ndarray, np.ndarray]:
        return self.take(self.task.splits[split], pooling)

    def build(self, head_cfg: HeadConfig, name: str | None = None) -> tuple[keras.Model, keras.Model]:
        """(model to fit, head): the head alone on cached features, or backbone + head on images (named `name`)."""
        head = build_head(
            self.head_input_shape(head_cfg.pooling),
            self.n_classes,
            head_cfg.units,
            head_cfg.dropout,
            head_cfg.pooling,
            name=f"{name}_head" if name else "head",
        )
        return (head if self.on_features else full_model(self, head, name)), head


def pooled_views(task: TaskData, backbone_name: str, backbone, weights, size: int, colour: str, views):
    """(V, N, C) pooled vectors of every image of the task in each of `views` ((name, view) pairs), from the
    feature store, and how many view-images had to be extracted now."""
    pooled, extracted = [], 0
    for view in views:
        vf, vinfo = features_for(task, backbone_name, backbone, weights, size, colour, view)
        pooled.append(vf.pooled)
        extracted += vinfo["extracted"]
    return np.stack(pooled), extracted


def prepare(recipe: Recipe, mcfg: ModelConfig, task: TaskData | None = None) -> Prepared:
    t0 = time.perf_counter()
    size = recipe.image_size_for(mcfg)
    task = task or prepare_task(recipe, mcfg.task, size, recipe.colour_for(mcfg))
    t1 = time.perf_counter()
    backbone, winfo = build_backbone(mcfg.backbone, mcfg.weights, size, recipe.weights_mirror)
    if mcfg.trainable or recipe.training_for(mcfg).augment:
        why = "trainable backbone" if mcfg.trainable else "augmentation"
        feats, info = None, {"feature_cache": f"bypassed ({why})", "extracted": 0, "extract_seconds": 0.0}
    else:
        feats, info = features_for(task, mcfg.backbone, backbone, winfo, size, recipe.colour_for(mcfg))
    views = None
    tcfg = recipe.training_for(mcfg)
    if feats is not None and tcfg.views:
        t2 = time.perf_counter()
        kind = random_views if tcfg.views_kind == "random" else fixed_views
        views, extracted = pooled_views(
            task, mcfg.backbone, backbone, winfo, size, recipe.colour_for(mcfg), kind(tcfg.views, tcfg.views_strength)
        )
        info.update(views_extracted=extracted, views_seconds=time.perf_counter() - t2)
    info.update(data_seconds=t1 - t0, prepare_seconds=time.perf_counter() - t0)
    return Prepared(recipe, mcfg, task, backbone, winfo, feats, info, views=views)


def full_model(prep: Prepared, head: keras.Model, name: str | None = None) -> keras.Model:
    """Raw images -> preprocessing -> backbone -> (pooling) -> head: the model that is fitted on images, and logged."""
    return assemble(
        prep.backbone,
        head,
        SPECS[prep.mcfg.backbone].preprocess,
        prep.colour,
        prep.image_size,
        trainable_backbone=prep.mcfg.trainable,
        name=name,
    )


def refresh_backbone(prep: Prepared) -> Prepared:
    """Fresh pretrained backbone weights, so every trial or refit that trains the backbone starts from the same."""
    m = prep.mcfg
    prep.backbone, _ = build_backbone(m.backbone, m.weights, prep.image_size, prep.recipe.weights_mirror)
    return prep
