"""Final model: fit the chosen head (the recipe's, or the best a search found) the way the recipe asks — on the train
split with the best validation epoch kept, as the K fold heads of the cross-validation averaged (`ensemble`), or on
all of train+validation for the epoch count the folds chose (`refit`) — then evaluate it once: validation (or the
out-of-fold predictions), the test split read exactly once, test-time augmentation when asked; log predictions,
embeddings and the full model, and register it. Shared by `harness train` and the search's final stage.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np

from harness.evaluation.metrics import (
    as_proba,
    confusion_figure,
    log_predictions,
    log_split_metrics,
    prediction_rows,
)
from harness.features.prepared import Prepared, full_model, refresh_backbone
from harness.features.store import extract
from harness.models.backbones import SPECS
from harness.models.heads import average, penultimate, random_views
from harness.recipe import HeadConfig, SearchConfig, TrainingConfig
from harness.stages.calibrate import calibrate
from harness.stages.export import export_final
from harness.tracking import runs as tracking
from harness.tracking import schema
from harness.training.fit import FitResult, Fold, fit_on, optimizer_factory, predict
from harness.training.search import Best, head_from_values

log = logging.getLogger(__name__)
EMBED_SAMPLE = 2000  # images whose penultimate features are logged for the report's t-SNE (stratified)
GRADCAM_SAMPLE = 400  # test images whose Grad-CAM gives the lung-field shares (stratified)


@dataclass
class FinalModel:
    """The fitted members of a final model: one, or the K fold models of an ensemble (averaged)."""

    members: list[keras.Model]  # heads on cached features, or full models on images (fine-tuned)
    heads: list[keras.Model]
    backbones: list[keras.Model]  # each member's own backbone when members take images
    folds: list[Fold]  # what each member trained on and, except after a refit, what validated it
    results: list[FitResult]
    mode: str  # single | ensemble | refit
    pooling: str
    on_images: bool = False
    augment: float = 0.0  # the strength its members were trained with (0: clean images or features)

    def full_model(self, prep: Prepared) -> keras.Model:
        """Raw 0-255 images in, class probabilities out: what is logged, registered and served. Heads on a frozen
        backbone share it: the backbone runs once and its features go to the averaged heads."""
        if self.on_images:
            return average(self.members, name="ensemble")
        return full_model(prep, average(self.heads, name="heads"), name="final")


def registered_name(prep: Prepared) -> str:
    """`<study>-<model key>`: the key is unique within a recipe (task-backbone unless the model is named)."""
    return f"{prep.recipe.study}-{prep.mcfg.key}"


def final_folds(prep: Prepared, mode: str, folds: list[Fold], pool: np.ndarray | None = None) -> list[Fold]:
    """The folds the final members train on: the search's folds (single split, or the K folds of an ensemble), or
    all of `pool` (default train+validation) with nothing held out for a refit."""
    return [Fold(prep.task.pool() if pool is None else pool)] if mode == "refit" else folds


def fit_best(
    prep: Prepared,
    found: Best,
    space: SearchConfig,
    tcfg: TrainingConfig,
    folds: list[Fold],
    mode: str,
    refit_pool: np.ndarray | None = None,
) -> FinalModel:
    """The final model of a search's best trial: its head and learning rate, fitted from a fresh session and seed,
    for the epoch count the folds chose (a single split keeps its best validation epoch instead)."""
    head_cfg, lr = head_from_values(found.values, space)
    keras.backend.clear_session()
    keras.utils.set_random_seed(space.seed)
    return fit_final(
        prep,
        head_cfg,
        lr,
        tcfg,
        folds,
        space.seed,
        space.objective,
        epochs=found.epoch + 1 if mode != "single" else None,
        mode=mode,
        refit_pool=refit_pool,
    )


def fit_final(
    prep: Prepared,
    head_cfg: HeadConfig,
    learning_rate: float,
    tcfg: TrainingConfig,
    folds: list[Fold],
    seed: int,
    objective: str,
    epochs: int | None = None,
    mode: str = "single",
    refit_pool: np.ndarray | None = None,
) -> FinalModel:
    """Fit the members. `single` keeps each member's best validation epoch (`objective`); `ensemble` and `refit`
    train for `epochs`, the epoch count the cross-validation chose for this head."""
    members_folds = final_folds(prep, mode, folds, refit_pool)
    augment = 0.0 if prep.on_features else tcfg.augment
    log.info("Final model %s: fitting %d member(s), %s", prep.mcfg.key, len(members_folds), mode)
    members, heads, backbones = [], [], []
    for _ in members_folds:
        if not prep.on_features:  # every member trains its own copy of the pretrained backbone
            prep = refresh_backbone(prep)
        model, head = prep.build(head_cfg, name=f"member{len(members)}")
        members.append(model)
        heads.append(head)
        backbones.append(prep.backbone)
    with tracking.EpochProgress(epochs or tcfg.epochs, prep.mcfg.key) as progress:
        results = fit_on(
            prep,
            members,
            head_cfg.pooling,
            members_folds,
            epochs or tcfg.epochs,
            tcfg.batch_size,
            optimizer_factory(tcfg.optimizer, learning_rate),
            seed,
            monitor=objective if mode == "single" else None,
            restore_best=mode == "single",
            on_epoch=progress,
            augment=augment,
        )
    return FinalModel(
        members,
        heads,
        backbones,
        members_folds,
        results,
        mode,
        head_cfg.pooling,
        on_images=not prep.on_features,
        augment=augment,
    )


def head_inputs(prep: Prepared, final: FinalModel, k: int, idx: np.ndarray) -> np.ndarray:
    """What member k's head sees for images `idx`: the cached features, or its own backbone's output."""
    if not final.on_images:
        return prep.take(idx, final.pooling)[0]
    maps = extract(
        final.backbones[k], SPECS[prep.mcfg.backbone].preprocess, prep.colour, prep.task, idx, label="Embedding images"
    )
    return maps.mean(axis=(1, 2)) if len(final.heads[k].input.shape) == 2 else maps


def member_predict(prep: Prepared, final: FinalModel, k: int, idx: np.ndarray) -> np.ndarray:
    source = prep.task.x if final.on_images else prep.source(final.pooling)
    return as_proba(predict(final.members[k], source, idx=idx), prep.n_classes)


def sample(y: np.ndarray, idx: np.ndarray, n: int, seed: int) -> np.ndarray:
    """At most n of the images idx, stratified by class (each class in proportion, at least one), seeded; all of
    them when there are no more than n."""
    idx = np.asarray(idx)
    if len(idx) <= n:
        return idx
    rng = np.random.default_rng(seed)
    picked = [
        rng.choice(idx[y[idx] == c], max(1, round(n * np.mean(y[idx] == c))), replace=False) for c in np.unique(y[idx])
    ]
    return np.sort(np.concatenate(picked))


def ensemble_predict(prep: Prepared, final: FinalModel, idx: np.ndarray, per_member=None) -> np.ndarray:
    """The members' probabilities for images `idx` (`per_member`, default `member_predict`), averaged."""
    per_member = per_member or member_predict
    return np.mean([per_member(prep, final, k, idx) for k in range(len(final.members))], axis=0)


def view_tta_predict(prep: Prepared, final: FinalModel, k: int, idx: np.ndarray) -> np.ndarray:
    """Member k's probabilities for images `idx`, averaged over each image and its views (training.views):
    the pooled vectors the store keeps for every image, so nothing is extracted here."""
    total = member_predict(prep, final, k, idx)
    for view in prep.views:
        total = total + as_proba(predict(final.members[k], view, idx=idx), prep.n_classes)
    return total / (1 + len(prep.views))


def tta_images_predict(prep: Prepared, model: keras.Model, idx: np.ndarray) -> np.ndarray:
    """A model of raw images: its probabilities for images `idx` averaged over the recipe's number of augmented
    copies of each. The copies are `random_views`: rotation, zoom, shift and contrast in one resampling of the raw
    pixels (`random_transform`, as training augmentation), drawn from each image's hash (the views
    `training.views` trains on, when its kind is random)."""
    ev, t = prep.recipe.evaluation, prep.task
    images, sha1s = t.images(idx), [t.sha1s[i] for i in idx]
    total = np.zeros((len(idx), prep.n_classes))
    for _, view in random_views(ev.tta, ev.tta_strength):
        total += as_proba(predict(model, np.asarray(view(images, view.params(sha1s)))), prep.n_classes)
    return total / ev.tta


def tta_predict(prep: Prepared, final: FinalModel, k: int, idx: np.ndarray) -> np.ndarray:
    """Member k's probabilities for images `idx` averaged over their augmented copies (`tta_images_predict`). A
    head on a frozen backbone reads the copies' features from the store (`Prepared.tta_views`): they are the same
    for every member, fold and outer fold, so the backbone does not run again for each."""
    if final.on_images:
        return tta_images_predict(prep, final.members[k], idx)
    views = prep.tta_views
    return sum(as_proba(predict(final.members[k], v, idx=idx), prep.n_classes) for v in views) / len(views)


def finish(prep: Prepared, final: FinalModel, register_as: str | None = None) -> dict:
    """Evaluate once, log figures, predictions, embeddings and the full model (once). Validation metrics are the
    members' own validation images: the val split, or every image of train+validation out of fold for an
    ensemble (none after a refit). The test split is read once, here."""
    out = {}
    t0 = time.perf_counter()
    if prep.recipe.evaluation.tta:
        # Whether the model saw augmented images in training, beside its TTA figures. With the one-resampling
        # copies, TTA no longer needs it: Task 2 Lite0 heads on clean features, 12 copies, out of fold over 215
        # images, seeds 42 / 7: 0.781 -> 0.800 / 0.786 -> 0.805 (copies from Keras' chained random layers:
        # 0.735 / 0.758).
        mlflow.set_tag("tta.trained_with_augmentation", str(final.augment > 0).lower())
    full = final.full_model(prep)
    tracking.log_datasets(prep)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        predictors = split_predictors(prep, final)
        rows, val_idx, val_proba = evaluate_val(prep, final, predictors, out)
        test, proba = prep.read_test(), None  # the one read of the test split for this model
        if len(test):
            test_rows, proba = evaluate_test(prep, final, predictors, test, out, tmp)
            rows += test_rows
            log_gradcam(prep, full, test, proba, tmp)
        served = {}
        if len(val_idx):
            calibrated_rows, served = calibrate(prep, val_idx, val_proba, test, proba)
            rows += calibrated_rows
        else:
            log.warning("%s: no out-of-fold predictions (final %s): not calibrated", prep.mcfg.key, final.mode)
        config = logged_config(prep, served)
        rows += export_final(prep, full, test, config, tmp)
        mlflow.log_metric("test_reads", prep.test_reads)
        log_predictions(rows)
        t1 = time.perf_counter()
        log_embeddings(prep, final, tmp)
    t2 = time.perf_counter()
    log_full_model(prep, full, register_as, config)
    mlflow.log_metrics(
        {"evaluate_seconds": t1 - t0, "embed_seconds": t2 - t1, "log_model_seconds": time.perf_counter() - t2}
    )
    return out


def split_predictors(prep: Prepared, final: FinalModel) -> dict:
    """Name suffix -> how one member predicts its images: the image alone, and the averaged variants asked for."""
    out = {"": member_predict}
    if prep.recipe.evaluation.tta:
        out["_tta"] = tta_predict
    view_tta = prep.recipe.evaluation.view_tta and prep.views is not None
    if view_tta and final.on_images:  # fine-tuned: its backbone moved, the store's views are not its features
        log.warning("%s: evaluation.view_tta skipped: the final model sees images, not cached features", prep.mcfg.key)
        view_tta = False
    if prep.recipe.evaluation.view_tta:
        mlflow.set_tag("view_tta", "on" if view_tta else "skipped (fine-tuned final model)")
    if view_tta:
        out["_view_tta"] = view_tta_predict
    return out


def evaluate_val(prep: Prepared, final: FinalModel, predictors: dict, out: dict) -> tuple[list, np.ndarray, np.ndarray]:
    """Each member on its own validation images (paired with the plain figures: McNemar out of fold); returns the
    prediction rows, the images and their plain (image alone) out-of-fold probabilities."""
    val = [(k, f.val) for k, f in enumerate(final.folds) if f.val is not None and len(f.val)]
    if not val:
        return [], np.array([], dtype=int), np.zeros((0, prep.n_classes))
    idx = np.concatenate([v for _, v in val])
    order = np.argsort(idx)
    idx, rows, plain = idx[order], [], None
    for suffix, predict_member in predictors.items():
        proba = np.concatenate([predict_member(prep, final, k, v) for k, v in val])[order]
        out[f"val{suffix}"] = log_split_metrics(prep, f"val{suffix}", idx, proba, prep.recipe.data.seed)
        rows += prediction_rows(prep.task, idx, proba, f"val{suffix}")
        plain = proba if suffix == "" else plain
    return rows, idx, plain


def evaluate_test(
    prep: Prepared, final: FinalModel, predictors: dict, test: np.ndarray, out: dict, tmp: Path
) -> tuple[list, np.ndarray]:
    """The final model (its members averaged) on the test split, with its confusion matrix; returns the prediction
    rows and the plain (image alone) probabilities."""
    t, rows, plain = prep.task, [], None
    for suffix, predict_member in predictors.items():
        proba = ensemble_predict(prep, final, test, predict_member)
        out[f"test{suffix}"] = log_split_metrics(prep, f"test{suffix}", test, proba, prep.recipe.data.seed)
        rows += prediction_rows(t, test, proba, f"test{suffix}")
        if suffix == "":
            plain = proba
            title = f"{prep.mcfg.key} — test (n={len(test)})"
            confusion_figure(t.y[test], proba.argmax(axis=1), t.classes, title, tmp / "confusion_test.png")
            mlflow.log_artifact(str(tmp / "confusion_test.png"))
    return rows, plain


def log_embeddings(prep: Prepared, final: FinalModel, tmp: Path) -> None:
    """Penultimate-layer features (the members' side by side) of a stratified sample of the images, for the
    report's t-SNE: all of them for a few thousand images, EMBED_SAMPLE of a larger task."""
    t, seed = prep.task, prep.recipe.data.seed
    shown = sample(t.y, np.arange(len(t.y)), EMBED_SAMPLE, seed)
    emb = np.concatenate(
        [predict(penultimate(h), head_inputs(prep, final, k, shown)) for k, h in enumerate(final.heads)], axis=1
    )
    split_of = np.empty(len(t.y), dtype=object)
    for s, idx in t.splits.items():
        split_of[idx] = s
    np.savez_compressed(
        tmp / "embeddings.npz",
        embedding=emb.astype(np.float32),
        y=t.y[shown],
        split=split_of[shown].astype(str),
        mode=np.array(t.modes)[shown],
        of=np.array(len(t.y)),
        classes=np.array(t.classes),
    )
    mlflow.log_artifact(str(tmp / "embeddings.npz"))


def log_gradcam(prep: Prepared, model: keras.Model, test: np.ndarray, proba: np.ndarray, tmp: Path) -> None:
    """Grad-CAM of the final model on the test images: a grid of each class's most confident correct and wrong
    predictions (map of the predicted class), and per class the share of the map outside the lung field (map of
    the true class, over the test images of that class)."""
    from harness.evaluation.gradcam import LUNG_BOX, gradcam, grid_figure, outside_share, pick_examples

    t = prep.task
    y = t.y[test]
    # The shares over a stratified sample of at most GRADCAM_SAMPLE test images: a backward pass through the
    # backbone per image is the cost, and a few hundred images per class settle a mean share.
    part = np.searchsorted(test, sample(t.y, test, GRADCAM_SAMPLE, prep.recipe.data.seed))
    true_maps = np.concatenate(
        [
            gradcam(model, t.images(test[c]).astype("float32"), y[c], prep.n_classes)
            for c in np.array_split(part, max(1, len(part) // 32))
        ]
    )
    shares = outside_share(true_maps)
    per_class = {c: float(shares[y[part] == k].mean()) for k, c in enumerate(t.classes) if (y[part] == k).any()}
    picks = pick_examples(y, proba)
    idx = np.array([i for i, _ in picks], dtype=int)
    pred = proba.argmax(axis=1)
    images = t.images(test[idx])
    maps = gradcam(model, images.astype("float32"), pred[idx], prep.n_classes) if len(idx) else []
    titles = [
        f"{kind}: true {t.classes[y[i]]}\npred {t.classes[pred[i]]} (p={proba[i, pred[i]]:.2f})" for i, kind in picks
    ]
    grid_figure(images, maps, titles, tmp / "gradcam.png", title=f"{prep.mcfg.key}: Grad-CAM on test images")
    mlflow.log_artifact(str(tmp / "gradcam.png"))
    mlflow.log_text(
        json.dumps(
            {
                "outside_lung_share": per_class,
                "lung_box": LUNG_BOX,
                "n": len(part),
                "examples": [{"file": str(t.files[test[i]]), "kind": kind} for i, kind in picks],
            }
        ),
        "gradcam.json",
    )
    mlflow.log_metrics({f"gradcam.outside.{c}": v for c, v in per_class.items()})


def logged_config(prep: Prepared, served: dict) -> dict:
    """The `model_config` entries of the final model, Keras and ONNX alike: what it is, and the temperature and
    operating point it applies (`harness.stages.calibrate`)."""
    return {"study": prep.recipe.study, "model_key": prep.mcfg.key, "backbone": prep.mcfg.backbone, **served}


def log_full_model(prep: Prepared, model: keras.Model, register_as: str | None, config: dict) -> None:
    """The final model as a standard MLflow model (loadable and servable without the harness), registered."""
    from harness.serving.flavor import log_classifier

    log_classifier(
        model,
        prep.task.classes,
        prep.image_size,
        prep.colour,
        register_as,
        **config,
    )


def log_final_fit(final: FinalModel) -> None:
    """The members' training curves (averaged over an ensemble's members) and timings on the final run."""
    r = final.results
    mean = FitResult(
        {k: list(np.mean([x.history[k] for x in r], axis=0)) for k in r[0].history},
        r[0].epoch_seconds,
        r[0].seconds,
        sum(x.n_train for x in r),
        r[0].monitor,
        r[0].best_epoch,
        r[0].jit,
    )
    tracking.log_fit(mean)
    mlflow.log_metric("train_rows", mean.n_train)  # the members' training rows: images, or images x views
    mlflow.set_tags(
        {"fit.jit": str(mean.jit).lower(), schema.FINAL_MODE: final.mode, schema.FINAL_MEMBERS: str(len(r))}
    )
    if final.mode == "single" and mean.best_epoch is not None:
        mlflow.log_metric("best_epoch", mean.best_epoch)


def fit_and_finish(
    prep: Prepared,
    head_cfg: HeadConfig,
    learning_rate: float,
    tcfg: TrainingConfig,
    seed: int,
    folds: list[Fold] | None = None,
    objective: str = "val_loss",
    epochs: int | None = None,
    mode: str = "single",
    register_as: str | None = None,
) -> dict:
    """Inside an active run: fit the final model, evaluate once, log and (optionally) register."""
    splits = prep.task.splits
    final = fit_final(
        prep,
        head_cfg,
        learning_rate,
        tcfg,
        folds or [Fold(splits["train"], splits["val"])],
        seed,
        objective,
        epochs,
        mode,
    )
    log_final_fit(final)
    return finish(prep, final, register_as=register_as)
