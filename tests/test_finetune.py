"""Whole-backbone fine-tuning: which weights train, the activation cache against the whole model, pruning, and the
fit's fine-tuning options (discriminative rates, schedule, label smoothing, EMA, early stopping)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from typer.testing import CliRunner

from harness.cli import app

from conftest import write_recipe


def _stage(tmp_path, **finetune):
    """A prepared tiny Lite0 model, its fold heads on one split, and a fine-tuning hypermodel from them."""
    from harness.features.prepared import prepare
    from harness.recipe import FinetuneSearch, load_recipe
    from harness.training.finetune import FinetuneHyperModel
    from harness.training.fit import Fold

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml"))
    prep = prepare(recipe, recipe.models[0])
    _, head = prep.build(recipe.head)
    hm = FinetuneHyperModel(prep, FinetuneSearch(**finetune), recipe.training, [head])
    splits = prep.task.splits
    return prep, hm, [Fold(splits["train"], splits["val"])]


def _values(hm, blocks, augment=0.0, lr=1e-3):
    return hm.complete({"ft_blocks": blocks, "ft_learning_rate": lr, "ft_augment": augment})


def test_blocks_all_makes_every_non_batchnorm_backbone_weight_trainable_and_no_batchnorm_weight(tmp_path):
    _, hm, _ = _stage(tmp_path)
    backbone = hm.member(_values(hm, "all"), 0).backbone
    trainable = {id(v) for v in backbone.trainable_weights}
    bn = [layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
    others = [layer for layer in backbone.layers if layer.weights and layer not in bn]
    assert bn and others
    assert all(id(v) in trainable for layer in others for v in layer.weights)
    assert not any(id(v) in trainable for layer in bn for v in layer.weights)


def test_blocks_half_trains_the_top_half_of_the_weighted_blocks(tmp_path):
    from harness.training.finetune import unfreeze_top_blocks, weighted_blocks

    _, hm, _ = _stage(tmp_path)
    backbone = hm.member(_values(hm, "half"), 0).backbone
    blocks = weighted_blocks(backbone, "efficientnet_lite0")
    names = set(unfreeze_top_blocks(backbone, "efficientnet_lite0", "half"))
    top = {layer.name for b in blocks[-(len(blocks) // 2) :] for layer in b if layer.weights}
    assert names == {n for n in top if not n.endswith("_bn")}  # Lite's BatchNorm layers are the *_bn ones
    assert not any(layer.name in names for b in blocks[: -(len(blocks) // 2)] for layer in b)


def test_cached_bottom_then_top_gives_the_whole_models_outputs_on_the_same_view(tmp_path):
    from harness.models.heads import random_transform, random_views

    prep, hm, _ = _stage(tmp_path, cache_views=2)
    member = hm.member(_values(hm, "half", augment=0.5), 0)
    assert member.trained is not None  # the top half is cached at 32 px
    x, views = hm.cache.rows(member.bottom, 0.5)
    n = len(prep.task.y)
    assert views == 2 and len(x) == 3 * n
    images = prep.task.x[:6].astype("float32")
    whole = member.model(images, training=False).numpy()
    # The originals' rows, then view v's rows: the top on the cached rows answers what the whole model answers on
    # the same (moved) images, within the float16 of the store.
    np.testing.assert_allclose(member.trained(x[:6], training=False).numpy(), whole, atol=2e-3)
    _, view = random_views(2, 0.5)[1]
    moved = random_transform(images, view.params(prep.task.sha1s[:6]))
    np.testing.assert_allclose(
        member.trained(x[2 * n : 2 * n + 6], training=False).numpy(),
        member.model(moved, training=False).numpy(),
        atol=2e-3,
    )


def test_fitting_the_cached_top_trains_the_logged_models_backbone(tmp_path):
    prep, hm, folds = _stage(tmp_path, cache_views=1)
    values = _values(hm, 2, augment=0.5, lr=1e-2)
    member = hm.member(values, 0)
    images = prep.task.x[:4].astype("float32")
    before = member.model(images, training=False).numpy()
    (r,) = hm.fit_members(values, [member], folds, 1, 0, "val_loss", False, search=True)
    after = member.model(images, training=False).numpy()
    assert not np.allclose(before, after, atol=1e-4)  # the top's training moved the served model
    np.testing.assert_allclose(member.trained(hm.cache.rows(member.bottom, 0.5)[0][:4]).numpy(), after, atol=2e-3)
    assert r.epochs == 1 and "val_loss" in r.history


def test_blocks_zero_fits_on_images_exactly_as_the_stage_did_before(tmp_path):
    from harness.training.fit import fit_on, optimizer_factory

    _, hm, folds = _stage(tmp_path)
    values = _values(hm, 0, augment=0.5)
    a, b = hm.member(values, 0), hm.member(values, 0)
    assert a.trained is None and not a.backbone.trainable_weights  # no cache, the backbone frozen
    keras.utils.set_random_seed(3)
    (ra,) = hm.fit_members(values, [a], folds, 2, 3, "val_loss", True, search=False)
    keras.utils.set_random_seed(3)
    (rb,) = fit_on(
        hm.images,
        [b.model],
        "maps",
        folds,
        2,
        8,
        optimizer_factory("adam", 1e-3),
        3,
        monitor="val_loss",
        restore_best=True,
        augment=0.5,
    )  # fmt: skip  (the stage's call before its options existed)
    assert ra.history.keys() == rb.history.keys()
    for k in ra.history:
        assert ra.history[k] == pytest.approx(rb.history[k], rel=1e-5), k


def test_a_pruned_trial_is_recorded_pruned_and_never_becomes_the_best(tmp_path, mlflow_client, monkeypatch):
    """The pruner is replaced by one that prunes the trial with the *better* learning rate after its first epoch,
    so the pruned trial holds the best recorded objective and still must not be chosen."""
    import harness.training.finetune as ft

    def prune_the_good_rate(cfg, objective, curves):
        return lambda epoch, mean: mean[objective] < 5.0  # lr 1e-4 stays near the head; lr 50 wrecks it

    monkeypatch.setattr(ft, "pruner", prune_the_good_rate)
    path = write_recipe(
        tmp_path / "r.yaml",
        **{
            "search.max_trials": 1,
            "search.finetune": {
                "blocks": [1],
                "learning_rate": [0.0001, 50.0],
                "augment": [0.0],
                "epochs": 3,
                "max_trials": 2,
                "accept": "any_gain",
            },
        },
    )
    res = CliRunner().invoke(app, ["tune", str(path)])
    assert res.exit_code == 0, res.output
    exp = mlflow_client.get_experiment_by_name("tiny")
    trials = [
        r
        for r in mlflow_client.search_runs([exp.experiment_id], filter_string="tags.`harness.kind` = 'trial'")
        if r.data.tags.get("stage") == "finetune"
    ]
    pruned = [t for t in trials if t.data.tags.get("pruned") == "true"]
    kept = [t for t in trials if t.data.tags.get("pruned") != "true"]
    assert len(pruned) == 1 and len(kept) == 1
    assert pruned[0].info.status == "FINISHED" and pruned[0].data.params["hp.ft_learning_rate"] == "0.0001"
    assert pruned[0].data.metrics["best_val_loss"] < kept[0].data.metrics["best_val_loss"]
    (search,) = mlflow_client.search_runs([exp.experiment_id], filter_string="tags.`harness.kind` = 'search'")
    assert search.data.metrics["finetune.best_val_loss"] == pytest.approx(kept[0].data.metrics["best_val_loss"])


def test_the_median_rule_stops_a_trial_worse_than_the_completed_trials_median():
    from harness.recipe import FinetuneSearch
    from harness.training.finetune import pruner

    cfg = FinetuneSearch(prune_after=2, prune_min_trials=2)
    curves = [[1.0, 0.8, 0.7], [1.0, 0.6, 0.5]]  # best by epoch 2: 0.8 and 0.6, median 0.7
    worse, better = pruner(cfg, "val_loss", curves), pruner(cfg, "val_loss", curves)
    assert not worse(0, {"val_loss": 0.9})  # epoch 1 of 2: too early to judge
    assert worse(1, {"val_loss": 0.75})
    assert not better(0, {"val_loss": 0.9}) and not better(1, {"val_loss": 0.65})
    assert pruner(FinetuneSearch(prune="none"), "val_loss", curves) is None


def test_discriminative_rates_scale_each_variables_step(tmp_path):
    from harness.training.fit import optimizer_factory

    a, b = keras.Variable(np.zeros(3, "float32")), keras.Variable(np.zeros(3, "float32"))
    opt = optimizer_factory("sgd", 0.1)()
    opt.build([a, b])
    opt.lr_scales = {id(b): 0.25}
    opt.apply_gradients([(np.ones(3, "float32"), a), (np.ones(3, "float32"), b)])
    np.testing.assert_allclose(a.numpy(), -0.1)
    np.testing.assert_allclose(b.numpy(), -0.025)


def test_lr_scales_decay_by_block_below_the_top(tmp_path):
    from harness.training.finetune import lr_scales, weighted_blocks

    _, hm, _ = _stage(tmp_path)
    backbone = hm.member(_values(hm, 3), 0).backbone
    scales = lr_scales(backbone, "efficientnet_lite0", 3, 0.5)
    blocks = weighted_blocks(backbone, "efficientnet_lite0")
    for k, block in enumerate(reversed(blocks[-3:])):
        assert {scales[id(v)] for layer in block for v in layer.trainable_weights} == {0.5**k}
    assert len(scales) == len(backbone.trainable_weights)


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_zero():
    from harness.training.fit import schedule

    cos = schedule(1.0, "cosine", 10, 110)
    assert float(cos(0)) == pytest.approx(0.0) and float(cos(5)) == pytest.approx(0.5)
    assert float(cos(10)) == pytest.approx(1.0) and float(cos(60)) == pytest.approx(0.5, abs=1e-6)
    assert float(cos(110)) == pytest.approx(0.0, abs=1e-6)
    flat = schedule(1.0, "constant", 4, 100)
    assert [float(flat(s)) for s in (0, 3, 50)] == pytest.approx([0.25, 1.0, 1.0])
    assert schedule(0.3, "constant", 0, 100) == 0.3


def test_label_smoothing_moves_the_training_targets_towards_uniform():
    from harness.training.fit import make_loss

    p = np.array([[0.7, 0.1, 0.1, 0.1], [0.2, 0.5, 0.2, 0.1]], "float32")
    y = np.array([0, 1])
    target = np.eye(4)[y] * 0.8 + 0.2 / 4
    expected = float(np.mean(-(target * np.log(p)).sum(axis=1)))
    assert float(make_loss(4, 0.2)(y, p)) == pytest.approx(expected, rel=1e-5)
    assert float(make_loss(4)(y, p)) == pytest.approx(float(np.mean(-np.log(p[[0, 1], y]))), rel=1e-5)


def _linear_fit(**options):
    from harness.training.fit import FitOptions, Fold, fit_models, optimizer_factory

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype("float32")
    y = (x[:, 0] > 0).astype(int)
    inputs = keras.Input((5,))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(inputs))
    start = [w.copy() for w in model.get_weights()]
    lr = options.pop("lr", 0.5)
    (r,) = fit_models(
        [model], x, y, [Fold(np.arange(48), np.arange(48, 64))], 2, 6, 8, optimizer_factory("sgd", lr), 0,
        monitor="val_loss", options=FitOptions(**options),
    )  # fmt: skip
    moved = sum(float(np.abs(a - b).sum()) for a, b in zip(model.get_weights(), start))
    return r, moved


def test_ema_ends_with_weights_that_trail_the_raw_ones():
    _, raw = _linear_fit()
    _, averaged = _linear_fit(ema=0.999)
    assert 0 < averaged < 0.1 * raw  # 36 steps at momentum 0.999 leave the average ~96% at the start


def test_patience_stops_when_the_folds_objective_stops_improving():
    r, moved = _linear_fit(lr=0.0, patience=2)
    assert moved == 0 and r.stopped == "early" and r.epochs == 3  # epoch 1 sets the best, two more without gain
    r, _ = _linear_fit(lr=0.0)
    assert r.stopped is None and r.epochs == 6


def test_a_stage_at_the_new_options_defaults_keeps_the_fingerprint_a_store_recorded_before_them(tmp_path):
    """A study begun before whole-backbone fine-tuning recorded the digest of the stage's settings as they were then;
    the same recipe must still resume, and setting a new option must count as a change."""
    from harness.recipe import load_recipe
    from harness.study.resume import _digest, fingerprint

    stage = {"blocks": [0, 1], "learning_rate": [0.0001], "augment": [0.0], "epochs": 2, "max_trials": 2}
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", **{"search.finetune": stage}))
    before = {**stage, "time_budget_minutes": 15.0, "accept": "one_se"}  # every field the stage had then
    assert fingerprint(recipe, recipe.models[0])["fine-tuning"] == _digest(before)
    changed = load_recipe(write_recipe(tmp_path / "c.yaml", **{"search.finetune": {**stage, "ema": [0.9]}}))
    assert fingerprint(changed, changed.models[0])["fine-tuning"] != _digest(before)
