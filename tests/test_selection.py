"""Selecting models that can be ranked: cross-validated trials, fold ensembles and refits, the nested estimate, the
fine-tuning stage, test-time augmentation; the test split read once per final model."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.data.splits import cv_folds, groups_from_names
from harness.evaluation.metrics import read_predictions

from conftest import write_recipe


def _runs(client, kind, study="tiny"):
    exp = client.get_experiment_by_name(study)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`harness.kind` = '{kind}'")


def _tune(path):
    res = CliRunner().invoke(app, ["tune", str(path)])
    assert res.exit_code == 0, res.output
    return res


def test_the_floor_scaler_fitted_in_chunks_gives_the_standard_scalers_mean_and_scale():
    from sklearn.preprocessing import StandardScaler

    from harness.stages.floor import ChunkedScaler

    rng = np.random.default_rng(3)
    x = (rng.normal(5.0, 3.0, (2500, 40)) * rng.random(40)).astype(np.float32)  # 3 chunks, the last one short
    whole, chunked = StandardScaler().fit(x), ChunkedScaler().fit(x)
    assert chunked.n_samples_seen_ == 2500
    np.testing.assert_allclose(chunked.mean_, whole.mean_, rtol=1e-12)
    np.testing.assert_allclose(chunked.scale_, whole.scale_, rtol=1e-10)
    chunked.fit(x[:100])  # a refit forgets the first fit, as StandardScaler.fit does
    np.testing.assert_allclose(chunked.mean_, StandardScaler().fit(x[:100]).mean_, rtol=1e-12)


def test_the_floor_scales_in_place_only_copies_never_the_read_only_pooled_vectors():
    from harness.stages.floor import floor_model

    rng = np.random.default_rng(4)
    x = rng.normal(2.0, 1.0, (300, 16)).astype(np.float32)
    y = (x[:, 0] > 2.0).astype(int)
    original = x.copy()
    pooled = x.view()
    pooled.flags.writeable = False  # as Prepared.pooled hands them out
    model = floor_model().fit(pooled, y)
    proba = model.predict_proba(pooled)
    model.fit(pooled[::2], y[::2])
    np.testing.assert_array_equal(x, original)
    assert proba.shape == (300, 2) and (proba.argmax(1) == y).mean() > 0.9


def test_cv_folds_never_split_a_patient_and_cover_the_pool_once():
    labels = np.repeat([0, 1, 2], 40)
    names = [Path(f"c{y}/person{i // 4}_{y}_{i}.jpeg") for i, y in enumerate(labels)]
    groups = groups_from_names(names, r"^(person\d+)")
    pool = np.arange(10, 120)  # the first ten images play the test split: never in a fold
    folds = cv_folds(pool, labels, groups, 5, seed=3)
    assert len(folds) == 5
    vals = np.concatenate([va for _, va in folds])
    assert sorted(vals.tolist()) == pool.tolist()  # every pool image validated exactly once
    for tr, va in folds:
        assert not set(groups[tr]) & set(groups[va])  # no patient on both sides of a fold
        assert set(tr) | set(va) == set(pool.tolist()) and set(labels[va]) == {0, 1, 2}


@pytest.mark.slow
def test_cv_trial_objective_is_the_mean_of_its_fold_values_and_the_ensemble_reads_test_once(tmp_path, mlflow_client):
    path = write_recipe(tmp_path / "r.yaml", **{"search.cv_folds": 3, "training.epochs": 3})
    _tune(path)
    trials = _runs(mlflow_client, "trial")
    assert len(trials) == 2
    for t in trials:
        m = t.data.metrics
        folds = [m[f"fold{k}.val_loss"] for k in range(3)]
        assert m["folds"] == 3 and "fold3.val_loss" not in m
        assert m["best_val_loss"] == pytest.approx(np.mean(folds), rel=1e-6)
        assert m["cv_std_val_loss"] == pytest.approx(np.std(folds), rel=1e-6)
        # the objective is the mean curve at its best epoch: the curve logged per epoch has that minimum there
        curve = [
            h.value for h in sorted(mlflow_client.get_metric_history(t.info.run_id, "val_loss"), key=lambda h: h.step)
        ]
        assert min(curve) == pytest.approx(m["best_val_loss"], rel=1e-6)
        assert curve.index(min(curve)) == int(m["best_epoch"])
    (final,) = _runs(mlflow_client, "final")
    (parent,) = _runs(mlflow_client, "search")
    fm = final.data.metrics
    assert final.data.tags["final.mode"] == "ensemble" and final.data.tags["final.members"] == "3"
    assert fm["test_reads"] == 1
    # out-of-fold validation: every train+validation image predicted once, by the member that did not train on it
    data = json.loads(Path(mlflow_client.download_artifacts(final.info.run_id, "data.json", str(tmp_path))).read_text())
    pool_n = sum(data["counts"]["train"].values()) + sum(data["counts"]["val"].values())
    assert fm["val.n"] == pool_n and fm["test.n"] == sum(data["counts"]["test"].values())
    # the members trained for the epoch count the search chose
    assert len(mlflow_client.get_metric_history(final.info.run_id, "loss")) == parent.data.metrics["best.epoch"] + 1
    assert fm["search.val_loss"] == parent.data.metrics["best.val_loss"]


@pytest.mark.slow
def test_registered_ensemble_predicts_as_evaluated(tmp_path, mlflow_client):
    import harness
    from harness.data import prepare_task
    from harness.recipe import load_recipe

    path = write_recipe(tmp_path / "r.yaml", **{"search.cv_folds": 3, "search.max_trials": 1, "training.epochs": 2})
    _tune(path)
    (final,) = _runs(mlflow_client, "final")
    model = harness.load_model("models:/tiny-task2-efficientnet_lite0/1")
    heads = model.get_layer("heads")  # one backbone, three fold heads averaged
    assert [layer.name for layer in heads.layers if layer.name.endswith("_head")] == [
        "member0_head",
        "member1_head",
        "member2_head",
    ]
    task = prepare_task(load_recipe(path), "task2")
    idx = task.splits["test"]
    proba = model.predict(task.x[idx].astype("float32"), verbose=0)
    assert float((proba.argmax(1) == task.y[idx]).mean()) == pytest.approx(final.data.metrics["test.accuracy"])


@pytest.mark.slow
def test_refit_trains_on_all_of_train_and_validation_for_the_chosen_epochs(tmp_path, mlflow_client):
    path = write_recipe(tmp_path / "r.yaml", **{"search.cv_folds": 3, "search.final": "refit", "training.epochs": 3})
    _tune(path)
    (final,) = _runs(mlflow_client, "final")
    (parent,) = _runs(mlflow_client, "search")
    assert final.data.tags["final.mode"] == "refit" and final.data.tags["final.members"] == "1"
    assert "val.accuracy" not in final.data.metrics  # nothing was held out
    assert final.data.metrics["test_reads"] == 1
    assert len(mlflow_client.get_metric_history(final.info.run_id, "loss")) == parent.data.metrics["best.epoch"] + 1


@pytest.mark.slow
def test_cv_folds_1_keeps_the_single_split(tmp_path, mlflow_client):
    path = write_recipe(tmp_path / "r.yaml", **{"search.cv_folds": 1})
    _tune(path)
    (final,) = _runs(mlflow_client, "final")
    data = json.loads(Path(mlflow_client.download_artifacts(final.info.run_id, "data.json", str(tmp_path))).read_text())
    assert final.data.tags["final.mode"] == "single" and final.data.tags["final.members"] == "1"
    assert final.data.metrics["val.n"] == sum(data["counts"]["val"].values())  # the val split, as before
    assert final.data.metrics["test_reads"] == 1 and "best_epoch" in final.data.metrics
    assert all(t.data.metrics["folds"] == 1 for t in _runs(mlflow_client, "trial"))


@pytest.mark.slow
def test_nested_estimate_predicts_every_pool_image_once_without_the_test_split(tmp_path, mlflow_client):
    path = write_recipe(tmp_path / "r.yaml", **{"search.cv_folds": 2, "search.nested_cv": 3, "training.epochs": 2})
    _tune(path)
    (nested,) = _runs(mlflow_client, "nested")
    (final,) = _runs(mlflow_client, "final")
    m = nested.data.metrics
    rows = read_predictions(mlflow_client, nested.info.run_id, str(tmp_path), "nested_predictions.csv.gz")
    tuned = [r for r in rows if r["split"] == "nested"]
    assert len(tuned) == m["nested.n"] == final.data.metrics["val.n"]  # the whole pool, out of fold
    test_files = {
        r["file"] for r in read_predictions(mlflow_client, final.info.run_id, str(tmp_path)) if r["split"] == "test"
    }
    assert not test_files & {r["file"] for r in tuned}  # the test split is not part of the estimate
    assert sum(m[f"outer{o}.n"] for o in range(3)) == m["nested.n"]
    assert m["nested.accuracy_cp_low"] <= m["nested.accuracy"] <= m["nested.accuracy_cp_high"]
    assert 0 <= m["nested.vs_floor.p_value"] <= 1 and "nested.floor.accuracy" in m
    assert not [t for t in _runs(mlflow_client, "trial") if t.data.tags.get("stage") != "head"]  # inner: untracked
    res = CliRunner().invoke(app, ["compare", str(path), "--out", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## How good is the procedure: nested cross-validation" in md
    section = md.split("## How good is the procedure")[1].split("\n## ")[0]
    (row,) = [ln for ln in section.splitlines() if ln.startswith("| task2-efficientnet_lite0 |")]
    assert f"| {int(m['nested.n'])} | {m['nested.accuracy']:.3f} [{m['nested.accuracy_cp_low']:.3f}, " in row
    summary = next(ln for ln in md.splitlines() if ln.startswith("| task2-efficientnet_lite0 | efficientnet_lite0"))
    assert "over 2 folds" in summary and "2 fold heads averaged" in summary


@pytest.mark.slow
def test_finetune_stage_searches_from_the_best_head_within_its_budget(tmp_path, mlflow_client):
    path = write_recipe(
        tmp_path / "r.yaml",
        **{
            "search.cv_folds": 2,
            "search.max_trials": 1,
            "training.epochs": 2,
            "search.finetune": {
                "blocks": [0, 1],
                "learning_rate": [1e-4],
                "augment": [0.0, 0.5],
                "epochs": 1,
                "max_trials": 3,
                "time_budget_minutes": 0.001,
            },
        },
    )
    _tune(path)
    ft = [t for t in _runs(mlflow_client, "trial") if t.data.tags.get("stage") == "finetune"]
    assert len(ft) == 1  # the budget ends the stage after its first trial
    assert {"hp.ft_blocks", "hp.ft_learning_rate", "hp.ft_augment"} <= set(ft[0].data.params)
    (parent,) = _runs(mlflow_client, "search")
    (final,) = _runs(mlflow_client, "final")
    pm = parent.data.metrics
    # The default rule, one_se: the bar is the head's objective less one standard error of the best (here the only)
    # trial's fold mean, recomputed from the fold values its run logged.
    assert parent.data.params["search.finetune.accept"] == "one_se"
    folds = [ft[0].data.metrics[f"fold{k}.val_loss"] for k in range(2)]
    assert ft[0].data.metrics["best_val_loss"] == pytest.approx(pm["finetune.best_val_loss"])
    se = np.std(folds, ddof=1) / np.sqrt(2)
    assert pm["finetune.bar_val_loss"] == pytest.approx(pm["finetune.start_val_loss"] - se)
    chosen = parent.data.tags["finetune.chosen"] == "true"
    assert chosen == (pm["finetune.best_val_loss"] < pm["finetune.bar_val_loss"])
    assert final.data.tags["final.stage"] == ("finetune" if chosen else "head")
    assert final.data.metrics["test_reads"] == 1


@pytest.mark.slow
def test_nested_estimate_repeats_the_finetune_stage_in_every_outer_fold_paired_with_its_heads(tmp_path, mlflow_client):
    # any_gain: the rule that lets a fold choose the stage on so little data, so both kinds of outer model are paired
    finetune = {
        "blocks": [1],
        "learning_rate": [1e-3],
        "augment": [0.0],
        "epochs": 1,
        "max_trials": 1,
        "accept": "any_gain",
    }
    over = {
        "search.cv_folds": 2,
        "search.nested_cv": 2,
        "search.max_trials": 1,
        "training.epochs": 2,
        "search.finetune": finetune,
    }
    path = write_recipe(tmp_path / "r.yaml", **over)
    _tune(path)
    (nested,) = _runs(mlflow_client, "nested")
    n, tags = nested.data.metrics, nested.data.tags
    assert n["outer0.finetune.trials"] == n["outer1.finetune.trials"] == 1  # the stage ran in each outer fold
    chosen = [tags[f"outer{o}.finetune.chosen"] == "true" for o in range(2)]
    for o in range(2):
        assert n[f"outer{o}.finetune.bar_val_loss"] == n[f"outer{o}.finetune.start_val_loss"]  # any_gain
        better = n[f"outer{o}.finetune.best_val_loss"] < n[f"outer{o}.finetune.start_val_loss"]
        assert chosen[o] == better
    assert n["nested.finetune.outer_chosen"] == sum(chosen)
    preds = pd.read_csv(
        mlflow_client.download_artifacts(nested.info.run_id, "nested_predictions.csv.gz", str(tmp_path))
    )
    after = preds[preds.split == "nested"].set_index("file").sort_index()
    before = preds[preds.split == "nested_head"].set_index("file").sort_index()
    assert list(before.index) == list(after.index) and n["nested_head.n"] == n["nested.n"] == len(after)
    # Head-only outer models predict the same with and without the stage; a fine-tuned one does not.
    probabilities = [c for c in after.columns if c.startswith("p.")]
    assert any(chosen) == (not np.allclose(after[probabilities], before[probabilities]))
    right, right_before = after.pred == after.true, before.pred == before.true
    assert n["nested.vs_head.only_finetuned"] == (right & ~right_before).sum()
    assert n["nested.vs_head.only_head"] == (~right & right_before).sum()
    assert n["nested.accuracy"] == pytest.approx(right.mean()) and n["nested_head.accuracy"] == pytest.approx(
        right_before.mean()
    )
    # The inner stages are untracked: the one fine-tuning trial run is the main search's.
    assert len([t for t in _runs(mlflow_client, "trial") if t.data.tags.get("stage") == "finetune"]) == 1
    res = CliRunner().invoke(app, ["compare", str(path), "--out", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "report" / "report.md").read_text()
    section = md.split("## How good is the procedure")[1].split("\n## ")[0]
    (row,) = [ln for ln in section.splitlines() if ln.startswith(f"| task2-efficientnet_lite0 | {sum(chosen)} of 2 |")]
    assert f"| {n['nested_head.accuracy']:.3f} [" in row and f"| {n['nested.accuracy']:.3f} [" in row
    # The main stage's row in the report's fine-tuning table: head objective, best, the bar and the rule it ran under.
    pm = _runs(mlflow_client, "search")[0].data.metrics
    stage = md.split("### Fine-tuning stage")[1].split("\n#")[0]
    (ft_row,) = [ln for ln in stage.splitlines() if ln.startswith("| task2-efficientnet_lite0 |")]
    cells = [c.strip() for c in ft_row.strip("|").split("|")]
    bar = f"{pm['finetune.bar_val_loss']:.4f}"
    assert cells[1:5] == [
        f"{pm['finetune.start_val_loss']:.4f}",
        f"{pm['finetune.best_val_loss']:.4f}",
        bar,
        "any_gain",
    ]


@pytest.mark.slow
def test_test_time_augmentation_is_its_own_metric_set_in_the_final_and_the_nested_estimate(tmp_path, mlflow_client):
    over = {
        "search.max_trials": 1,
        "training.epochs": 2,
        "evaluation.tta": 3,
        "search.cv_folds": 2,
        "search.nested_cv": 2,
    }
    path = write_recipe(tmp_path / "r.yaml", **over)
    _tune(path)
    (final,) = _runs(mlflow_client, "final")
    m = final.data.metrics
    assert {"test.accuracy", "test_tta.accuracy", "val.accuracy", "val_tta.accuracy"} <= set(m)
    assert m["test_tta.n"] == m["test.n"] and m["val_tta.n"] == m["val.n"] and m["test_reads"] == 1
    assert final.data.tags["tta.trained_with_augmentation"] == "false"  # heads on clean cached features
    (nested,) = _runs(mlflow_client, "nested")
    n = nested.data.metrics
    assert n["nested_tta.n"] == n["nested.n"] and "nested_view_tta.n" not in n  # the same held-out images
    res = CliRunner().invoke(app, ["compare", str(path), "--out", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    section = (tmp_path / "report" / "report.md").read_text().split("## How good is the procedure")[1].split("\n## ")[0]
    (row,) = [ln for ln in section.splitlines() if ln.startswith("| task2-efficientnet_lite0 | random augmented")]
    assert f"| {n['nested_tta.accuracy']:.3f} [" in row


def test_tta_averages_over_the_random_views_the_feature_store_keeps_for_training(tmp_path):
    from harness.evaluation.metrics import as_proba
    from harness.features.prepared import full_model, prepare
    from harness.models.heads import build_head
    from harness.recipe import load_recipe
    from harness.stages.finalize import tta_images_predict
    from harness.training.fit import predict

    over = {"training.views": 2, "training.views_kind": "random", "evaluation.tta": 2}
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", **over))
    prep = prepare(recipe, recipe.model())
    head = build_head(prep.features.pooled.shape[1:], prep.n_classes, [8], 0.0, "avg")
    idx = prep.task.splits["test"]
    on_views = np.mean([as_proba(predict(head, view[idx]), prep.n_classes) for view in prep.views], axis=0)
    np.testing.assert_allclose(tta_images_predict(prep, full_model(prep, head), idx), on_views, atol=2e-4)
    np.testing.assert_array_equal(prep.tta_views, prep.views)  # a head's TTA reads the same vectors from the store


def test_one_se_bar_moves_the_head_objective_by_the_standard_error_of_the_best_trials_fold_mean():
    import keras_tuner as kt

    from harness.stages.finetune import acceptance_bar
    from harness.training.search import Best, FoldObjective

    loss, accuracy = kt.Objective("val_loss", "min"), kt.Objective("val_accuracy", "max")

    per_fold = [0.30, 0.40, 0.50, 0.45, 0.35]
    best = Best({}, float(np.mean(per_fold)), 3, FoldObjective(float(np.mean(per_fold)), 3, per_fold).std)
    se = np.std(per_fold, ddof=1) / np.sqrt(5)  # the sample standard deviation of the folds, over sqrt(K)
    assert acceptance_bar(0.45, best, 5, loss, "one_se") == pytest.approx(0.45 - se)
    assert acceptance_bar(0.80, best, 5, accuracy, "one_se") == pytest.approx(0.80 + se)
    assert acceptance_bar(0.45, best, 5, loss, "any_gain") == 0.45
    assert acceptance_bar(0.45, Best({}, 0.4, 3, 0.0), 1, loss, "one_se") == 0.45  # one split: no error bar


def test_finetune_with_refit_is_refused_in_one_line(tmp_path):
    path = write_recipe(
        tmp_path / "r.yaml", **{"search.cv_folds": 2, "search.final": "refit", "search.finetune": {"max_trials": 1}}
    )
    res = CliRunner().invoke(app, ["tune", str(path)])
    assert res.exit_code == 2 and "search.finetune needs final: ensemble" in res.output


def test_nested_cv_of_one_fold_is_refused(tmp_path):
    res = CliRunner().invoke(app, ["tune", str(write_recipe(tmp_path / "r.yaml", **{"search.nested_cv": 1}))])
    assert res.exit_code == 2 and "search.nested_cv" in res.output and "at least 2" in res.output


def test_random_views_draw_each_images_transform_from_its_hash_alone():
    from harness.models.heads import random_views

    (_, v0), (_, v1) = random_views(2, 0.5)
    a, b = "3f" * 20, "a7" * 20
    np.testing.assert_array_equal(v0.params([a, b])[0], v0.params([b, a, b])[1])  # not the batch: the image
    assert not np.allclose(v0.params([a])[0], v0.params([b])[0])  # each image its own transform
    assert not np.allclose(v0.params([a])[0], v1.params([a])[0])  # and another one in each view
    p = v0.params([hashlib.sha1(str(i).encode()).hexdigest() for i in range(500)])  # as images are keyed
    # within augmentation(0.5)'s ranges: rotation 5 degrees, zoom 5 %, shift 2.5 %, contrast 10 %
    assert np.abs(p - [0, 1, 0, 0, 1]).max(axis=0) == pytest.approx([np.deg2rad(5), 0.05, 0.025, 0.025, 0.1], rel=0.02)
    assert v0.name != v1.name and v0.name != random_views(1, 0.25)[0][0]  # names key the store's shelves


def test_readouts_top_average_and_fixed_views_are_what_the_harness_trains_on_and_no_test_image_is_read(
    tmp_path,
):
    from harness.features.prepared import prepare
    from harness.models.backbones import SPECS
    from harness.models.layers import preprocessing
    from harness.recipe import load_recipe

    from readouts_lab import TOP, equalised, readouts

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml"))
    prep = prepare(recipe, recipe.model())
    task, pool, seen = prep.task, prep.task.pool(), []
    images = task.images
    task.images = lambda idx: (seen.extend(np.asarray(idx).tolist()), images(idx))[1]
    feats, copies = readouts(task, pool, recipe.model().backbone, prep.image_size, copies=2, batch=5, clahe=True)
    assert sorted(seen) == pool.tolist() and not set(seen) & set(task.splits["test"].tolist())
    np.testing.assert_allclose(feats[f"{TOP} avg"], prep.pooled[pool], rtol=1e-4, atol=1e-4)
    # the CLAHE readout: the same backbone's top average of the equalised images, not of the originals
    backbone, pre = prep.backbone, preprocessing(SPECS[recipe.model().backbone].preprocess, task.colour)
    eq = np.asarray(backbone(pre(equalised(images(pool))), training=False)).mean(axis=(1, 2))
    np.testing.assert_allclose(feats[f"{TOP} avg of CLAHE images"], eq, rtol=1e-4, atol=1e-4)
    assert not np.allclose(eq, prep.pooled[pool], atol=1e-3)
    assert len([n for n in feats if n.startswith("stage")]) == 7  # Lite0's seven stages of blocks
    assert all(len(x) == len(pool) for x in feats.values())
    assert copies.shape == (2, *feats[f"{TOP} avg"].shape) and not np.allclose(copies[0], feats[f"{TOP} avg"])
    _, fixed = readouts(task, pool, recipe.model().backbone, prep.image_size, copies=2, fixed=True)
    assert not np.allclose(fixed[0], fixed[1]) and not np.allclose(fixed, copies)
    # the bench's copies of both kinds are the feature store's view shelves (training.views), by the same path,
    # though the store extracts every image of the task in batches of its own
    for kind, bench in (("fixed", fixed), ("random", copies)):
        over = {"training.views": 2, "training.views_strength": 0.5, "training.views_kind": kind}
        viewed = load_recipe(write_recipe(tmp_path / f"{kind}.yaml", **over))
        np.testing.assert_allclose(bench, prepare(viewed, viewed.model()).views[:, pool], rtol=1e-4, atol=1e-4)


def test_probe_averaged_with_an_identical_readout_scores_as_the_readout_alone():
    from readouts_lab import probe

    rng = np.random.default_rng(5)
    y = np.repeat(np.arange(3), 20)
    x = rng.normal(0, 1, (60, 8)) + y[:, None] * 0.7
    groups = np.arange(60)
    alone = probe(x, y, groups, 0.1, 2, 0)
    assert probe(x, y, groups, 0.1, 2, 0, ensemble=[x.copy()]) == pytest.approx(alone)
    noise = rng.normal(0, 1, (60, 8))  # another readout that knows nothing: the average moves
    assert probe(x, y, groups, 0.1, 2, 0, ensemble=[noise])["log_loss"] != pytest.approx(alone["log_loss"])


@pytest.mark.slow
def test_readout_bench_prints_a_probe_score_for_every_readout_on_train_and_validation(tmp_path):
    import subprocess
    import sys

    from harness.data import prepare_task
    from harness.recipe import load_recipe

    lite = [{"task": "task2", "backbone": f"efficientnet_lite{v}", "weights": "imagenet"} for v in (0, 1)]
    path = write_recipe(tmp_path / "r.yaml", models=lite)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [
            sys.executable,
            str(root / "bench" / "readouts.py"),
            "--recipe",
            str(path),
            "--model",
            "task2-efficientnet_lite0",
            "--repeats",
            "1",
            "--c",
            "0.1",
            "--augment",
            "2",
            "--also",
            "task2-efficientnet_lite1",
            "--clahe",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    recipe = load_recipe(path)
    m = recipe.model()
    pool = prepare_task(recipe, m.task, recipe.image_size_for(m), recipe.colour_for(m)).pool()
    assert result["images"] == len(pool)
    # 13 readouts, the CLAHE one, 3 with augmented copies, 2 with Lite1's top average (concatenated, probes averaged)
    assert result["reference"] in result["scores"] and len(result["scores"]) == 13 + 1 + 3 + 2
    assert result["scores"]["top avg of CLAHE images"]["dims"] == 1280 and result["clahe_clip"] == 0.01
    together = [name for name in result["scores"] if "efficientnet_lite0 + efficientnet_lite1" in name]
    assert [result["scores"][name]["dims"] for name in together] == [2 * 1280, 1280]
    assert sum("copies" in name for name in result["scores"]) == 3 and result["augmented_copies"] == 2
    assert all(0.0 <= s["C=0.1"]["accuracy"] <= 1.0 for s in result["scores"].values())


def test_views_train_heads_on_every_fixed_view_validate_on_originals_and_are_extracted_once(
    tmp_path, mlflow_client, monkeypatch
):
    from harness.data import prepare_task
    from harness.recipe import load_recipe

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))  # a store of its own: other tests extract views too

    path = write_recipe(tmp_path / "r.yaml", **{"training.views": 2, "search.max_trials": 1})
    _tune(path)
    recipe = load_recipe(path)
    m = recipe.model()
    task = prepare_task(recipe, m.task, recipe.image_size_for(m), recipe.colour_for(m))
    (search,) = _runs(mlflow_client, "search")
    (final,) = _runs(mlflow_client, "final")
    assert search.data.metrics["views_extracted"] == 2 * len(task.y)  # every image, in each of the two views
    assert final.data.metrics["train_rows"] == 3 * len(task.splits["train"])  # the originals and two views
    assert final.data.metrics["val.n"] == len(task.splits["val"])  # validated on the originals only
    _tune(write_recipe(tmp_path / "again.yaml", **{"study": "again", "training.views": 2, "search.max_trials": 1}))
    (again,) = _runs(mlflow_client, "search", study="again")
    assert again.data.metrics["views_extracted"] == 0  # read from the feature store


def test_view_tta_averages_the_head_over_the_stores_views_as_its_own_metric_set(tmp_path, mlflow_client):
    from harness.stages.finalize import view_tta_predict

    path = write_recipe(
        tmp_path / "r.yaml",
        **{
            "training.views": 2,
            "evaluation.view_tta": True,
            "search.max_trials": 1,
            "search.cv_folds": 2,
            "search.nested_cv": 2,
        },
    )
    _tune(path)
    (final,) = _runs(mlflow_client, "final")
    m = final.data.metrics
    assert {"val.accuracy", "val_view_tta.accuracy", "test.accuracy", "test_view_tta.accuracy"} <= set(m)
    assert m["val_view_tta.n"] == m["val.n"] and m["test_view_tta.n"] == m["test.n"]  # the same images
    assert m["test_reads"] == 1 and final.data.tags["view_tta"] == "on"
    (nested,) = _runs(mlflow_client, "nested")
    n = nested.data.metrics
    assert n["nested_view_tta.n"] == n["nested.n"]  # the same held-out images, paired
    preds = pd.read_csv(
        mlflow_client.download_artifacts(nested.info.run_id, "nested_predictions.csv.gz", str(tmp_path))
    )
    plain = preds[preds.split == "nested"].set_index("file")
    views = preds[preds.split == "nested_view_tta"].set_index("file").loc[plain.index]
    only_views = int(((views.pred == views.true) & (plain.pred != plain.true)).sum())
    assert n["nested_view_tta.vs_image_alone.only_averaged"] == only_views  # paired on the same images
    res = CliRunner().invoke(app, ["compare", str(path), "--out", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    lines = (tmp_path / "report" / "report.md").read_text().splitlines()
    header = next(
        ln for ln in lines if ln.startswith("| model |") and "accuracy averaged over its training views" in ln
    )
    row = next(ln for ln in lines if ln.startswith("| task2-efficientnet_lite0 | efficientnet_lite0"))
    at = [c.strip() for c in header.split("|")].index("accuracy averaged over its training views")
    assert [c.strip() for c in row.split("|")][at] == f"{m['test_view_tta.accuracy']:.3f}"
    section = "\n".join(lines).split("## How good is the procedure")[1].split("\n## ")[0]
    (vrow,) = [ln for ln in section.splitlines() if ln.startswith("| task2-efficientnet_lite0 |") and "|" in ln][1:]
    assert vrow.startswith(f"| task2-efficientnet_lite0 | its training views | {n['nested_view_tta.accuracy']:.3f} [")
    # the averaging itself, on a hand-made member: two images, two views, the mean of three predictions
    import keras

    from harness.stages.finalize import FinalModel

    class Prep:
        n_classes, views, task = 2, np.array([[[1.0], [0.0]], [[0.0], [1.0]]]), None

        def source(self, pooling):
            return np.array([[0.0], [0.0]])

    member = keras.Sequential([keras.Input((1,)), keras.layers.Dense(2, activation="softmax")])
    member.set_weights([np.array([[2.0, -2.0]]), np.zeros(2)])
    final = FinalModel([member], [member], [None], [None], [], "single", "avg")
    got = view_tta_predict(Prep(), final, 0, np.array([0, 1]))
    each = [member.predict(np.array(x), verbose=0) for x in ([[0.0], [0.0]], [[1.0], [0.0]], [[0.0], [1.0]])]
    np.testing.assert_allclose(got, np.mean(each, axis=0), rtol=1e-5)


def test_view_tta_without_views_is_refused_in_one_line(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", **{"evaluation.view_tta": True})
    res = CliRunner().invoke(app, ["tune", str(path)])
    assert res.exit_code != 0 and "evaluation.view_tta" in res.output and "Traceback" not in res.output


def test_views_with_augmentation_are_refused_in_one_line(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", **{"training.views": 2, "training.augment": 0.5})
    res = CliRunner().invoke(app, ["tune", str(path)])
    assert res.exit_code != 0 and "training.views" in res.output and "Traceback" not in res.output
