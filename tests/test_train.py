"""One tracked training run through the CLI: params, metrics, tags, artifacts, and a model that reloads and predicts."""

from pathlib import Path

import keras
import numpy as np
import pytest
from typer.testing import CliRunner

import harness
from harness.cli import app

ROOT = Path(harness.__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_cli_end_to_end(tiny_recipe, mlflow_client):
    res = CliRunner().invoke(app, ["train", str(tiny_recipe), "--epochs", "2"])
    assert res.exit_code == 0, res.output
    assert "harness ui --study tiny" in res.output
    exp = mlflow_client.get_experiment_by_name("tiny")
    assert exp.artifact_location.startswith("file:///")
    (run,) = mlflow_client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    assert p["model.backbone"] == "efficientnet_lite0" and p["training.epochs"] == "2" and p["model.image_size"] == "32"
    for key in (
        "loss",
        "accuracy",
        "val_loss",
        "val_accuracy",
        "epoch_seconds",
        "images_per_s",
        "test.accuracy",
        "test.accuracy_ci_low",
        "test.accuracy_ci_high",
        "test.macro_f1",
        "test.roc_auc",
        "total_seconds",
    ):
        assert key in m, key
    assert m["test.accuracy_ci_low"] <= m["test.accuracy"] <= m["test.accuracy_ci_high"]
    history = mlflow_client.get_metric_history(run.info.run_id, "val_loss")
    assert [h.step for h in history] == [0, 1]
    assert t["device"] == "CPU" and t["device.cores"] and t["versions.keras"] and t["weights"] == "imagenet"
    assert len(t["weights_sha256"]) == 64 and t["weights_source"].endswith(".pth")
    artifacts = {a.path for a in mlflow_client.list_artifacts(run.info.run_id)}
    assert {"recipe.yaml", "data.json", "confusion_test.png", "predictions.csv.gz", "embeddings.npz"} <= artifacts

    model = harness.load_model(f"runs:/{run.info.run_id}/model")
    from harness.data import prepare_task
    from harness.recipe import load_recipe

    task = prepare_task(load_recipe(tiny_recipe), "task2")
    idx = task.splits["test"]
    proba = model.predict(task.x[idx].astype("float32"), verbose=0)
    assert proba.shape == (len(idx), 4)
    accuracy = float((proba.argmax(1) == task.y[idx]).mean())
    assert accuracy == pytest.approx(m["test.accuracy"])  # the logged model is the model that was evaluated


@pytest.mark.slow
def test_failed_run_is_marked_failed_not_running(tiny_recipe, mlflow_client, monkeypatch):
    import harness.stages.finalize as fin

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(fin, "finish", boom)
    res = CliRunner().invoke(app, ["train", str(tiny_recipe)])
    assert res.exit_code == 1 and "disk on fire" in res.output and "Traceback" not in res.output
    (run,) = mlflow_client.search_runs([mlflow_client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FAILED" and "disk on fire" in run.data.tags["error"]


def test_demo_recipe_dataset_builds(tmp_path):
    from pathlib import Path

    from harness.data import prepare_task
    from harness.recipe import load_recipe

    recipe = load_recipe(Path(harness.__file__).resolve().parents[1] / "recipes" / "demo.yaml")
    task = prepare_task(recipe, "task2")
    assert task.classes == ["covid", "normal", "pneumonia_bac", "pneumonia_vir"]
    assert task.x.shape[1:] == (96, 96, 3) and np.bincount(task.y).tolist() == [24] * 4


@pytest.mark.slow
def test_augmentation_bypasses_the_cache_and_stays_out_of_the_logged_model(tmp_path, mlflow_client):
    from conftest import write_recipe

    path = write_recipe(tmp_path / "aug.yaml", **{"training.augment": True, "training.epochs": 1})
    res = CliRunner().invoke(app, ["train", str(path)])
    assert res.exit_code == 0, res.output
    (run,) = mlflow_client.search_runs([mlflow_client.get_experiment_by_name("tiny").experiment_id])
    assert run.data.tags["feature_cache"] == "bypassed (augmentation)"
    model = harness.load_model(f"runs:/{run.info.run_id}/model")
    assert run.data.params["training.augment"] == "1.0"
    # The fit moves the training batches itself (tests/test_fit.py): the served model has no random layer, so
    # (one hidden layer, no dropout) it answers the same in training mode as in inference.
    assert not any(isinstance(layer, keras.layers.RandomRotation) or layer.name == "augment" for layer in model.layers)
    x = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(model(x, training=True)), np.asarray(model(x, training=False)), atol=1e-6)


@pytest.mark.slow
def test_backbone_override_trains_that_model_on_the_new_backbone_even_when_its_key_is_another_models(
    tmp_path, mlflow_client
):
    from conftest import write_recipe

    # The recipe also holds task2-efficientnet_lite1, the key the override gives the first model.
    models = [{"task": "task2", "backbone": f"efficientnet_lite{v}", "weights": "imagenet"} for v in (0, 1)]
    models[0]["head"] = {"pooling": "avg", "units": [8], "dropout": 0.0}  # the first model's own head: it is kept
    path = write_recipe(tmp_path / "two.yaml", models=models, **{"training.epochs": 1})
    res = CliRunner().invoke(
        app, ["train", str(path), "--model", "task2-efficientnet_lite0", "--backbone", "efficientnet_lite1"]
    )
    assert res.exit_code == 0, res.output
    (run,) = mlflow_client.search_runs([mlflow_client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FINISHED"
    assert (
        run.data.tags["backbone"] == "efficientnet_lite1" and run.data.params["model.backbone"] == "efficientnet_lite1"
    )
    assert run.data.params["head.units"] == "[8]"


def test_a_backbone_override_the_schema_refuses_is_blamed_on_the_option_not_the_recipe(tmp_path):
    res = CliRunner().invoke(
        app, ["train", str(ROOT / "recipes" / "demo.yaml"), "--model", "task2-efficientnet_lite0", "--backbone", "x"]
    )
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith("error: --backbone x: not a valid override of model task2-efficientnet_lite0 (")
    assert "demo.yaml" not in lines[0] and "Traceback" not in res.output


@pytest.mark.slow
def test_a_recipe_without_an_operating_point_logs_none_and_its_model_answers_probabilities_only(
    tmp_path, mlflow_client
):
    import mlflow

    from conftest import write_recipe

    path = write_recipe(tmp_path / "r.yaml", **{"evaluation.operating_point": None})
    res = CliRunner().invoke(app, ["train", str(path), "--epochs", "1"])
    assert res.exit_code == 0, res.output
    (run,) = mlflow_client.search_runs([mlflow_client.get_experiment_by_name("tiny").experiment_id])
    assert "op.class" not in run.data.tags and not any(k.startswith("op.") for k in run.data.metrics)
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    assert "operating_point" not in model.model_config
    out = model.predict(np.zeros((2, 32, 32, 3), "float32"))
    assert list(out.columns) == ["covid", "normal", "pneumonia_bac", "pneumonia_vir"]
