"""Fine-tuning stage of a search: from the best head, a second Keras Tuner search over how many of the backbone's top
blocks to unfreeze (0 = frozen), their learning rate and the augmentation strength (never flips), on images (the
feature cache cannot apply), with BatchNorm frozen and in inference mode as in the Keras transfer-learning guide.

Its trials use the same folds and objective as the head search and start from the head search's final heads, so
"0 epochs of fine-tuning" is the bar: a fine-tuned final model replaces the head-only one only when its objective
beats the head-only model's on the same validation images — by more than one standard error of its fold mean under
the default `accept: one_se` (`acceptance_bar`). Bounded by `max_trials` and a time budget.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time

import keras
import keras_tuner as kt
import mlflow
import numpy as np

from harness.finalize import FinalModel
from harness.fit import FitResult, Fold, evaluate_on, fit_on, optimizer_factory
from harness.models import assemble, build_backbone
from harness.models.backbones import SPECS
from harness.prepared import Prepared
from harness.recipe import FinetuneSearch, TrainingConfig
from harness.search import Best, best_of, make_tuner, run_search

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


def unfreeze_top_blocks(backbone: keras.Model, backbone_name: str, n: int) -> list[str]:
    """Make the weighted non-BatchNorm layers of the top `n` blocks trainable (0: the backbone stays frozen); return
    their names. BatchNorm stays frozen: on a few hundred images, updated statistics wreck pretrained features."""
    chosen = [
        layer
        for block in (blocks_of(backbone, backbone_name)[-n:] if n else [])
        for layer in block
        if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)
    ]
    backbone.trainable = bool(chosen)
    for layer in backbone.layers:
        layer.trainable = layer in chosen
    return [layer.name for layer in chosen]


class FinetuneHyperModel(kt.HyperModel):
    stage = "finetune"

    def __init__(self, prep: Prepared, cfg: FinetuneSearch, tcfg: TrainingConfig, heads: list[keras.Model]):
        super().__init__()
        self.prep, self.cfg, self.tcfg, self.heads = prep, cfg, tcfg, heads
        self.images = dataclasses.replace(prep, features=None)  # fine-tuning trains on images

    def declare(self, hp: kt.HyperParameters) -> dict:
        c = self.cfg
        return {
            "ft_blocks": hp.Choice("ft_blocks", c.blocks),
            "ft_learning_rate": hp.Choice("ft_learning_rate", c.learning_rate),
            "ft_augment": hp.Choice("ft_augment", c.augment),
        }

    def member(self, values: dict, k: int) -> tuple[keras.Model, keras.Model, keras.Model]:
        """(model, head, backbone) for fold k: a fresh pretrained backbone, a copy of fold k's trained head."""
        p = self.prep
        backbone, _ = build_backbone(p.mcfg.backbone, p.mcfg.weights, p.image_size, p.recipe.weights_mirror)
        head = keras.models.clone_model(self.heads[k])
        head.set_weights(self.heads[k].get_weights())
        model = assemble(
            backbone,
            head,
            SPECS[p.mcfg.backbone].preprocess,
            p.colour,
            p.image_size,
            trainable_backbone=False,
            name=f"member{k}",
        )
        unfreeze_top_blocks(backbone, p.mcfg.backbone, int(values["ft_blocks"]))
        return model, head, backbone

    def build(self, hp):
        return self.member(self.declare(hp), 0)[0]

    def build_folds(self, hp, n: int) -> list[keras.Model]:
        return [self.member(hp.values, k)[0] for k in range(n)]

    def fit_folds(self, hp, models, folds, epochs, seed, monitor, restore_best) -> list[FitResult]:
        return fit_on(
            self.images,
            models,
            "maps",
            folds,
            epochs,
            self.tcfg.batch_size,
            optimizer_factory(self.tcfg.optimizer, float(hp.values["ft_learning_rate"])),
            seed,
            monitor=monitor,
            restore_best=restore_best,
            augment=float(hp.values["ft_augment"]),
        )


def acceptance_bar(start: float, best: Best, folds: int, objective: kt.Objective, rule: str) -> float:
    """The objective the stage's best trial must beat to replace the head-only model, whose objective is `start`.

    one_se: the head's objective moved by one standard error of the best trial's fold mean (sample standard deviation
    of its K fold values over sqrt(K); `best.std` is their population deviation). The best of several trials on the
    folds the head was chosen on looks better than it is; a gain within its own noise is not taken."""
    se = best.std / np.sqrt(folds - 1) if rule == "one_se" and folds > 1 else 0.0
    return start - se if objective.direction == "min" else start + se


def start_objective(prep: Prepared, final: FinalModel, objective: str) -> float:
    """The head-only final model's objective on its members' validation images: the bar fine-tuning must beat."""
    return float(
        np.mean([evaluate_on(prep, m, final.pooling, f.val)[objective] for m, f in zip(final.members, final.folds)])
    )


def finetune_stage(
    prep: Prepared,
    final: FinalModel,
    cfg: FinetuneSearch,
    tcfg: TrainingConfig,
    folds: list[Fold],
    parent_run_id: str | None,
    project_dir,
    resume: bool,
    prefix: str = "finetune",
) -> tuple[FinalModel, str, dict]:
    """Search fine-tuning from `final`'s heads; return (the final model, "finetune" or "head", the chosen stage-2
    hyperparameters with their objective, empty when head-only stays). Its figures go to the active run under
    `prefix` (the nested estimate runs one stage per outer fold in one run); `parent_run_id` None: trials
    untracked."""
    space = prep.recipe.search
    objective = space.objective
    start = start_objective(prep, final, objective)
    hm = FinetuneHyperModel(prep, cfg, tcfg, final.heads)
    deadline = time.monotonic() + cfg.time_budget_minutes * 60
    tuner = make_tuner(
        hm,
        space,
        project_dir.with_name(project_dir.name + "-finetune"),
        resume,
        parent_run_id,
        cfg.epochs,
        cfg.max_trials,
        folds,
        deadline=deadline,
        tuner="random" if space.tuner == "hyperband" else space.tuner,
    )
    log.info(
        "Fine-tuning %s: up to %d trials or %.0f min, from the head-only %s %.4f",
        prep.mcfg.key,
        cfg.max_trials,
        cfg.time_budget_minutes,
        objective,
        start,
    )
    run_search(tuner)
    found = best_of(tuner, prep.mcfg.key)
    best, score, epoch = found.values, found.score, found.epoch
    # the bar and the comparison both take their direction from the objective the tuner ranked the trials by
    bar = acceptance_bar(start, found, len(folds), tuner.oracle.objective, cfg.accept)
    better = tuner.oracle.objective.better_than(score, bar)
    mlflow.log_metrics(
        {
            f"{prefix}.start_{objective}": start,
            f"{prefix}.best_{objective}": score,
            f"{prefix}.bar_{objective}": bar,
            f"{prefix}.trials": len(tuner.oracle.trials),
        }
    )
    mlflow.set_tag(f"{prefix}.chosen", str(better).lower())
    if not better:
        log.info(
            "Fine-tuning did not beat the head-only model's %.4f by the %s rule (best %.4f, bar %.4f): the final "
            "model stays head-only",
            start,
            cfg.accept,
            score,
            bar,
        )
        return final, "head", {}
    keras.backend.clear_session()
    keras.utils.set_random_seed(space.seed)
    built = [hm.member(best, k) for k in range(len(final.members))]
    members = [m for m, _, _ in built]
    single = final.mode == "single"
    results = fit_on(
        hm.images,
        members,
        "maps",
        final.folds,
        cfg.epochs if single else epoch + 1,
        tcfg.batch_size,
        optimizer_factory(tcfg.optimizer, float(best["ft_learning_rate"])),
        space.seed,
        monitor=objective if single else None,
        restore_best=single,
        augment=float(best["ft_augment"]),
    )
    tuned = FinalModel(
        members,
        [h for _, h, _ in built],
        [b for _, _, b in built],
        final.folds,
        results,
        final.mode,
        final.pooling,
        on_images=True,
        augment=float(best["ft_augment"]),
    )
    return tuned, "finetune", {**best, "objective": score}
