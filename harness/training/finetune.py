"""The fine-tuning hypermodel: from the best head, Keras Tuner trials over how much of the backbone to unfreeze (0 =
frozen, a count of top blocks, `half` or `all`), the learning rate and its per-block decay, warm-up and schedule,
label smoothing, a moving average of the weights and the augmentation strength (never flips), with BatchNorm frozen
and in inference mode as in the Keras transfer-learning guide. The stage that runs it is `harness.stages.finetune`.

Affordable on CPU cores by design: when only top blocks train, the frozen bottom's output for every image and a few
augmented views of it is computed once and kept in the feature store (`ActivationCache`), so an epoch runs only the
top; a trial whose fold-mean objective falls below the median of the completed trials' at the same epoch is pruned
(`pruner`); early stopping ends a trial whose folds stop improving; a trial that the time budget cannot hold does
not start.
"""

from __future__ import annotations

import dataclasses
import logging
import re

import keras
import keras_tuner as kt
import numpy as np

from harness.features.prepared import Prepared
from harness.features.store import features_for
from harness.models import assemble, build_backbone
from harness.models.backbones import SPECS
from harness.models.heads import random_views
from harness.recipe import FinetuneSearch, TrainingConfig, minimised
from harness.training.fit import (
    FitOptions,
    FitResult,
    fit_models,
    fit_on,
    optimizer_factory,
    schedule,
)

log = logging.getLogger(__name__)

# A backbone's "blocks", top to bottom, are runs of layers sharing a name prefix: EfficientNet-Lite's block15_* ...
# and head_*, VGG's block5_*, DenseNet's conv5_block16_*. Layers outside any pattern form blocks of their own.
BLOCK_PATTERNS = {
    "vgg19": r"^(block\d+)_",
    "densenet121": r"^(conv\d_block\d+|pool\d|conv\d)_",
    "lite": r"^(stem|block\d+|head)_",
}


def blocks_of(backbone: keras.Model, backbone_name: str) -> list[list[keras.layers.Layer]]:
    pattern = re.compile(BLOCK_PATTERNS["lite" if backbone_name.startswith("efficientnet_lite") else backbone_name])
    out: list[list] = []
    last = None
    for layer in backbone.layers:
        m = pattern.match(layer.name)
        key = m.group(1) if m else layer.name
        if key != last:
            out.append([])
            last = key
        out[-1].append(layer)
    return out


def weighted_blocks(backbone: keras.Model, backbone_name: str) -> list[list[keras.layers.Layer]]:
    """The blocks that hold weights (the input layer is a block without any), top last."""
    return [b for b in blocks_of(backbone, backbone_name) if any(layer.weights for layer in b)]


def block_count(spec: int | str, total: int) -> int:
    """`finetune.blocks` as a count of top blocks: `all` every block, `half` the top half, a number at most all."""
    if spec == "all":
        return total
    if spec == "half":
        return total // 2
    return min(int(spec), total)


def unfreeze_top_blocks(backbone: keras.Model, backbone_name: str, n: int | str) -> list[str]:
    """Make the weighted non-BatchNorm layers of the top `n` blocks (a count, `half` or `all`) trainable (0: the
    backbone stays frozen); return their names. BatchNorm stays frozen: on a few hundred images, updated
    statistics wreck pretrained features."""
    blocks = weighted_blocks(backbone, backbone_name)
    n = block_count(n, len(blocks))
    chosen = [
        layer
        for block in (blocks[-n:] if n else [])
        for layer in block
        if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)
    ]
    backbone.trainable = bool(chosen)
    for layer in backbone.layers:
        layer.trainable = layer in chosen
    return [layer.name for layer in chosen]


def lr_scales(backbone: keras.Model, backbone_name: str, n: int, decay: float) -> dict[int, float]:
    """Discriminative learning rates (Howard & Ruder, ULMFiT): the variables of the k-th unfrozen block below the top
    train at decay**k times the rate (the top block and the head at the rate itself), keyed by id(variable) as the
    harness's optimizers read them. Empty when decay is 1."""
    if decay == 1.0 or not n:
        return {}
    top = weighted_blocks(backbone, backbone_name)[-n:]
    return {
        id(v): decay**k for k, block in enumerate(reversed(top)) for layer in block for v in layer.trainable_weights
    }


def split_at(backbone: keras.Model, backbone_name: str, n: int) -> tuple[keras.Model, keras.Model] | None:
    """(bottom, top) of a backbone cut below its top `n` blocks: bottom maps the backbone's input to the cut, top the
    cut to the backbone's output through the same layer objects (so training top trains the backbone). None when
    the cut is no single-tensor boundary (a connection skips over it)."""
    blocks = weighted_blocks(backbone, backbone_name)
    if not 0 < n < len(blocks):
        return None
    below = blocks[-n - 1][-1]
    try:
        # Named by the cut layer: the name keys the cache's shelf, and Keras' tensor names change per build.
        bottom = keras.Model(backbone.input, below.output, name=f"bottom_{below.name}")
        return bottom, keras.Model(below.output, backbone.output, name="top")
    except ValueError as e:  # Keras: the top needs a tensor from below the cut
        log.info("%s: no activation cache below its top %d blocks (%s)", backbone_name, n, str(e)[:120])
        return None


@dataclasses.dataclass
class Member:
    """One fold's fine-tuned model: `model` (raw images -> probabilities, logged) and, with the activation cache,
    `trained`, the backbone's top and the head on the cached activations, sharing `model`'s layers."""

    model: keras.Model
    head: keras.Model
    backbone: keras.Model
    trained: keras.Model | None = None
    bottom: keras.Model | None = None  # the frozen bottom whose activations `trained` reads (the cache's key)

    @property
    def fitted(self) -> keras.Model:
        return self.trained or self.model


class ActivationCache:
    """The frozen bottom's activations (float16 in the feature store, like backbone features: atomic entries,
    checked by CRC, locked, reused by every trial and fold and by later studies) for every image of the task and,
    at an augmentation strength, `views` random views of each (`random_views`: one resampling drawn from the
    image's hash). Rows: the originals, then view 1, view 2, ... (row v*N + i is view v of image i). The last
    array read is kept in memory for the next trial of the same cut and strength."""

    def __init__(self, prep: Prepared, views: int):
        self.prep, self.views = prep, views
        self._last: tuple | None = None

    def rows(self, bottom: keras.Model, strength: float) -> tuple[np.ndarray, int]:
        """(activations, number of views after the originals)."""
        p = self.prep
        views = self.views if strength else 0
        key = (bottom.name, strength, views)
        if self._last is None or self._last[0] != key:
            cut = f"cut:{bottom.name}:{tuple(bottom.output.shape[1:])}"
            named = [(cut, None)] + [(f"{cut}|{name}", v) for name, v in random_views(views, strength)]
            maps = []
            for view in named:
                feats, _ = features_for(p.task, p.mcfg.backbone, bottom, p.weights, p.image_size, p.colour, view)
                maps.append(np.asarray(feats.maps, dtype=np.float32))
            self._last = (key, np.concatenate(maps), views)
        return self._last[1], self._last[2]


def pruner(cfg: FinetuneSearch, objective: str, curves: list[list[float]]):
    """The median stopping rule (Golovin et al., Google Vizier, 2017): from epoch `prune_after` on, once
    `prune_min_trials` trials have completed, a trial stops when the best fold-mean objective it has reached is
    worse than the median of the completed trials' best by the same epoch. None when pruning is off."""
    if cfg.prune == "none":
        return None
    best = min if minimised(objective) else max
    own: list[float] = []

    def stop(epoch: int, mean: dict) -> bool:
        own.append(mean[objective])
        if epoch + 1 < cfg.prune_after or len(curves) < cfg.prune_min_trials:
            return False
        median = float(np.median([best(c[: epoch + 1]) for c in curves]))
        mine = best(own)
        return mine > median if minimised(objective) else mine < median

    return stop


class FinetuneHyperModel(kt.HyperModel):
    stage = "finetune"

    def __init__(self, prep: Prepared, cfg: FinetuneSearch, tcfg: TrainingConfig, heads: list[keras.Model]):
        super().__init__()
        self.prep, self.cfg, self.tcfg, self.heads = prep, cfg, tcfg, heads
        self.images = dataclasses.replace(prep, features=None)  # fine-tuning trains on images (or their cache)
        self.cache = ActivationCache(prep, cfg.cache_views)
        self.curves: list[list[float]] = []  # the fold-mean objective curves of the completed, unpruned trials

    def declare(self, hp: kt.HyperParameters) -> dict:
        """The searched choices; an option the recipe gives one value is no hyperparameter (it cannot change
        between trials) but is still part of every trial's values."""
        c = self.cfg
        # Keras Tuner's Choice takes one type: counts stay numbers unless `half` or `all` is among them.
        blocks = [str(b) for b in c.blocks] if any(isinstance(b, str) for b in c.blocks) else c.blocks
        values = {
            "ft_blocks": hp.Choice("ft_blocks", blocks),
            "ft_learning_rate": hp.Choice("ft_learning_rate", c.learning_rate),
            "ft_augment": hp.Choice("ft_augment", c.augment),
        }
        for name, options in (("lr_decay", c.lr_decay), ("label_smoothing", c.label_smoothing), ("ema", c.ema)):
            values[f"ft_{name}"] = hp.Choice(f"ft_{name}", options) if len(options) > 1 else options[0]
        return values

    def complete(self, values: dict) -> dict:
        """A trial's (or the best trial's) values with the recipe's single-valued options filled in."""
        c = self.cfg
        fixed = {"ft_lr_decay": c.lr_decay[0], "ft_label_smoothing": c.label_smoothing[0], "ft_ema": c.ema[0]}
        return {**fixed, **values}

    def count(self, backbone: keras.Model, values: dict) -> int:
        return block_count(values["ft_blocks"], len(weighted_blocks(backbone, self.prep.mcfg.backbone)))

    def member(self, values: dict, k: int) -> Member:
        """Fold k's model: a fresh pretrained backbone, a copy of fold k's trained head, its top blocks unfrozen;
        with the activation cache, also the top and head that train on the cached bottom's activations."""
        p = self.prep
        backbone, _ = build_backbone(p.mcfg.backbone, p.mcfg.weights, p.image_size, p.recipe.weights_mirror)
        head = keras.models.clone_model(self.heads[k])
        head.set_weights(self.heads[k].get_weights())
        preprocess = SPECS[p.mcfg.backbone].preprocess
        model = assemble(
            backbone, head, preprocess, p.colour, p.image_size, trainable_backbone=False, name=f"member{k}"
        )
        n = self.count(backbone, values)
        unfreeze_top_blocks(backbone, p.mcfg.backbone, n)
        parts = split_at(backbone, p.mcfg.backbone, n) if self.cfg.cache else None
        if parts is not None and np.prod(parts[0].output.shape[1:]) <= p.image_size**2 * 3:
            # Cached only while an image's activations are no larger than the image (Lite0 top half: 14x14x80);
            # a cut near the stem would hold more bytes than the images it saves running.
            return Member(model, head, backbone, top_model(parts[1], head, name=f"top{k}"), parts[0])
        return Member(model, head, backbone)

    def build(self, hp):
        return self.member(self.complete(self.declare(hp)), 0).fitted

    def build_folds(self, hp, n: int) -> list[Member]:
        values = self.complete(hp.values)
        return [self.member(values, k) for k in range(n)]

    def fit_folds(self, hp, members, folds, epochs, seed, monitor, restore_best) -> list[FitResult]:
        stop = pruner(self.cfg, monitor, self.curves)
        results = self.fit_members(
            self.complete(hp.values), members, folds, epochs, seed, monitor, restore_best, stop=stop, search=True
        )
        if results and results[0].stopped != "pruned":
            self.curves.append(list(np.mean([r.history[monitor] for r in results], axis=0)))
        return results

    def fit_members(
        self, values, members: list[Member], folds, epochs, seed, monitor, restore_best, *, stop=None, search: bool
    ) -> list[FitResult]:
        """Train the members with a trial's values: on the cached activations when they have a top of their own,
        else on images moved by the trial's augmentation. `search` (a trial): early stopping applies; a final
        fit runs the epoch count the folds chose."""
        p, c = self.prep, self.cfg
        n = self.count(members[0].backbone, values)
        scales = {}
        for m in members:
            scales.update(lr_scales(m.backbone, p.mcfg.backbone, n, float(values["ft_lr_decay"])))
        steps = max(1, -(-max(len(f.train) for f in folds) // self.tcfg.batch_size))
        rate = schedule(float(values["ft_learning_rate"]), c.schedule, c.warmup_epochs * steps, epochs * steps)
        options = FitOptions(
            lr_scales=scales,
            label_smoothing=float(values["ft_label_smoothing"]),
            ema=float(values["ft_ema"]),
            patience=c.patience if search else None,
            stop=stop,
        )
        optimizer = optimizer_factory(self.tcfg.optimizer, rate)
        augment = float(values["ft_augment"])
        common = dict(monitor=monitor, restore_best=restore_best)
        if members[0].trained is None:
            return fit_on(
                self.images, [m.model for m in members], "maps", folds, epochs, self.tcfg.batch_size, optimizer,
                seed, augment=augment, options=options, **common,
            )  # fmt: skip
        x, views = self.cache.rows(members[0].bottom, augment)
        y = np.tile(p.task.y, views + 1)
        return fit_models(
            [m.trained for m in members], x, y, folds, p.n_classes, epochs, self.tcfg.batch_size, optimizer, seed,
            jit=False, options=dataclasses.replace(options, views=views), **common,
        )  # fmt: skip


def top_model(top: keras.Model, head: keras.Model, name: str) -> keras.Model:
    """The backbone's top (BatchNorm in inference mode, as in `assemble`) and the head, on the bottom's activations."""
    inputs = keras.Input(shape=top.input.shape[1:], name=f"{name}_activations")
    x = top(inputs, training=False)
    if len(head.input.shape) == 2 and len(x.shape) == 4:
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, head(x), name=name)
