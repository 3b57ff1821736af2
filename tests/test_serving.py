"""The winners as standard MLflow models: they load and serve in processes that cannot import the harness, the
champion alias follows the validation objective (never test), `harness predict` reads folders, naming bad files."""

import errno
import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from harness.cli import app

from conftest import own_store, use_module_store, wait_for_ping, write_recipe

NO_HARNESS = "import sys\nsys.modules['harness'] = None  # any `import harness` in this process fails\n"


def _no_harness_env(tmp_path: Path, home: Path) -> dict:
    """An environment whose Python processes (and their children) cannot import harness."""
    site = tmp_path / "no-harness"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(NO_HARNESS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARNESS_")}
    env.update(
        PYTHONPATH=str(site),
        MLFLOW_TRACKING_URI=f"sqlite:///{home / 'mlflow.db'}",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return env


@pytest.fixture(scope="module")
def served_study(tmp_path_factory, session_cache):
    """A tiny study tuned and compared once (so a champion exists), in its own store."""
    tmp = tmp_path_factory.mktemp("serve")
    with own_store(tmp / "home", tmp / "k", session_cache):
        # 3 folds: 30 out-of-fold images, enough for the temperature (the demo's operating point on covid)
        recipe = write_recipe(tmp / "r.yaml", **{"search.max_trials": 1, "training.epochs": 2, "search.cv_folds": 3})
        assert CliRunner().invoke(app, ["tune", str(recipe)]).exit_code == 0
        res = CliRunner().invoke(app, ["compare", str(recipe), "--out", str(tmp / "report")])
        assert res.exit_code == 0, res.output
        from harness.data import prepare_task
        from harness.recipe import load_recipe

        task = prepare_task(load_recipe(recipe), "task2")
        images = tmp / "images"
        images.mkdir()
        for i in task.splits["test"][:2]:
            Image.fromarray(task.x[i]).save(images / f"{i}.png")  # as training decoded them: grey, 32 px
        yield {"tmp": tmp, "home": tmp / "home", "recipe": recipe, "images": images, "classes": task.classes}


@pytest.fixture(autouse=True)
def use_served_store(request, monkeypatch):
    use_module_store(request, monkeypatch, "served_study")


@pytest.mark.slow
def test_registered_model_loads_in_a_process_that_cannot_import_harness(served_study, tmp_path):
    x = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in sorted(served_study["images"].iterdir())])
    np.save(tmp_path / "x.npy", x.astype("float32"))
    script = tmp_path / "load.py"
    script.write_text(f"""
import json, sys, numpy as np, mlflow
try:
    import harness
    sys.exit("harness was importable")
except ImportError:
    pass
uri = "models:/tiny-task2@champion"
x = np.load({str(tmp_path / "x.npy")!r})
pyfunc = mlflow.pyfunc.load_model(uri)
out = {{"pyfunc": pyfunc.predict(x).to_dict(orient="split"), "config": dict(pyfunc.model_config)}}
for name, load in (("keras", mlflow.keras.load_model), ("tensorflow", mlflow.tensorflow.load_model)):
    out[name] = np.asarray(load(uri)(x)).tolist()
print("RESULT" + json.dumps(out))
""")
    res = subprocess.run(
        [sys.executable, str(script)],
        env=_no_harness_env(tmp_path, served_study["home"]),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.split("RESULT", 1)[1])
    classes = served_study["classes"]
    assert out["pyfunc"]["columns"] == classes + ["decision"]  # the recipe's operating point adds the decision
    answer = np.array(out["pyfunc"]["data"])
    p, decision = answer[:, : len(classes)], answer[:, -1]
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out["keras"], out["tensorflow"], atol=1e-6)
    # the Keras flavors give the raw probabilities; the pyfunc the calibrated ones, softmax(log p / T)
    t, op = out["config"]["temperature"], out["config"]["operating_point"]
    z = np.log(np.asarray(out["keras"])) / t
    np.testing.assert_allclose(p, np.exp(z) / np.exp(z).sum(axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_array_equal(decision, (p[:, classes.index(op["class"])] >= op["threshold"]).astype(int))


@pytest.mark.slow
def test_served_champion_answers_like_harness_predict_and_keeps_the_grey_policy(served_study, tmp_path):
    res = CliRunner().invoke(
        app, ["predict", "models:/tiny-task2@champion", str(served_study["images"]), "--out", str(tmp_path / "p.csv")]
    )
    assert res.exit_code == 0, res.output
    expected = pd.read_csv(tmp_path / "p.csv")
    files = sorted(served_study["images"].iterdir())
    grey = [np.asarray(Image.open(f).convert("RGB"), dtype="float32") for f in files]
    # The same first image in colour: a served model must treat it as training treated colour (greyscale).
    tint = np.clip(grey[0] * np.array([1.15, 0.9, 0.8]), 0, 255).round()
    pil_grey = np.asarray(Image.fromarray(tint.astype(np.uint8)).convert("L").convert("RGB"), dtype="float32")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            "models:/tiny-task2@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env=_no_harness_env(tmp_path, served_study["home"]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        cwd=tmp_path,
    )
    try:
        wait_for_ping(port, proc, 180, lambda: proc.stderr.read())
        body = json.dumps({"inputs": [g.tolist() for g in grey] + [tint.tolist(), pil_grey.tolist()]}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        rows = json.loads(urllib.request.urlopen(req, timeout=60).read())["predictions"]
    finally:
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    classes = served_study["classes"]
    assert all(list(r) == classes + ["decision"] for r in rows)
    served = np.array([[r[c] for c in classes] for r in rows])
    assert [r["decision"] for r in rows[:2]] == expected["decision"].tolist()  # the same call as `harness predict`
    np.testing.assert_allclose(served.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(served[:2], expected[classes].to_numpy(), atol=1e-5)  # same as `harness predict`
    # colour in, PIL's grey treatment (± its rounding, which a temperature below 1 sharpens by up to 1/T)
    t = mlflow.pyfunc.load_model("models:/tiny-task2@champion").model_config["temperature"]
    np.testing.assert_allclose(served[2], served[3], atol=2e-3 / min(1.0, t))


def _registered_final(client, exp: str, study: str, key: str, metrics: dict):
    """A FINISHED final run of task `t` with these metrics, registered as `<study>-<key>` (no training)."""
    with mlflow.start_run(
        experiment_id=exp,
        tags={"harness.kind": "final", "task": "t", "model_key": key, "registered_model": f"{study}-{key}"},
    ) as r:
        mlflow.log_metrics(metrics)
    if not client.search_registered_models(f"name = '{study}-{key}'"):
        client.create_registered_model(f"{study}-{key}")
    client.create_model_version(f"{study}-{key}", f"runs:/{r.info.run_id}/model", run_id=r.info.run_id)
    return client.get_run(r.info.run_id)


def test_champion_is_chosen_by_validation_never_by_test_and_moves_only_for_better(tmp_path, mlflow_client):
    """Real runs and registered versions, no training: their logged numbers decide."""

    from harness.tracking import runs as tracking
    from harness.tracking.registry import crown_champions

    exp = tracking.setup("alias")

    def final(key, val_loss, test_accuracy):
        return _registered_final(
            mlflow_client, exp, "alias", key, {"search.val_loss": val_loss, "test.accuracy": test_accuracy}
        )

    a, b = final("a", val_loss=0.50, test_accuracy=0.95), final("b", val_loss=0.30, test_accuracy=0.60)
    first = crown_champions("alias", [a, b])["t"]
    assert first["model_key"] == "b" and first["moved"]  # better validation, worse test: validation decides
    held = mlflow_client.get_model_version_by_alias("alias-t", "champion")
    assert held.tags["source_model"] == "alias-b/1" and held.tags["selection.value"] == "0.3"
    again = crown_champions("alias", [a, b])["t"]
    assert not again["moved"] and again["version"] == first["version"]  # nothing better: the alias stays
    c = final("c", val_loss=0.40, test_accuracy=1.0)
    assert not crown_champions("alias", [a, c])["t"]["moved"]  # c is not better than the champion b
    d = final("d", val_loss=0.20, test_accuracy=0.5)
    moved = crown_champions("alias", [a, c, d])["t"]
    assert moved["moved"] and moved["model_key"] == "d" and moved["version"] != first["version"]


def test_latency_budget_crowns_the_best_model_within_it_and_names_what_it_excluded(tmp_path, mlflow_client):
    """Real runs and registered versions, no training: a tiny budget excludes the better, slower model."""

    from harness.recipe import load_recipe
    from harness.stages.champion import crown_study
    from harness.tracking import runs as tracking

    exp = tracking.setup("budget")

    def final(key, val_loss, onnx_ms):
        metrics = {"search.val_loss": val_loss, "cost.onnx.b1.median_ms": onnx_ms}
        return _registered_final(mlflow_client, exp, "budget", key, metrics)

    final("slow", val_loss=0.2, onnx_ms=40.0)
    final("fast", val_loss=0.4, onnx_ms=5.0)
    unbudgeted = load_recipe(write_recipe(tmp_path / "a.yaml", study="budget"))
    assert crown_study(unbudgeted)["t"]["model_key"] == "slow"  # no budget: the best validation objective, as before
    assert not any(k.startswith("harness.budget_excluded.") for k in mlflow_client.get_experiment(exp).tags)
    budgeted = load_recipe(write_recipe(tmp_path / "b.yaml", study="budget", **{"registry.max_latency_ms": 10}))
    crowned = crown_study(budgeted)["t"]
    assert crowned["model_key"] == "fast" and crowned["moved"]  # the holder went over budget: the alias moves
    assert mlflow_client.get_model_version_by_alias("budget-t", "champion").tags["model_key"] == "fast"
    assert "slow (40.0 ms > 10 ms, onnx)" in mlflow_client.get_experiment(exp).tags["harness.budget_excluded.t"]


@pytest.mark.slow
def test_onnx_export_answers_like_harness_predict_in_a_process_that_cannot_import_harness(served_study, tmp_path):
    res = CliRunner().invoke(
        app, ["predict", "models:/tiny-task2@champion", str(served_study["images"]), "--out", str(tmp_path / "k.csv")]
    )
    assert res.exit_code == 0, res.output
    args = ["predict", "models:/tiny-task2@champion", str(served_study["images"]), "--runtime", "onnx"]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "o.csv")])
    assert res.exit_code == 0, res.output
    keras_rows, onnx_rows = pd.read_csv(tmp_path / "k.csv"), pd.read_csv(tmp_path / "o.csv")
    classes = served_study["classes"]
    np.testing.assert_allclose(onnx_rows[classes], keras_rows[classes], atol=1e-4)  # the parity bound
    assert onnx_rows["decision"].tolist() == keras_rows["decision"].tolist()
    run_id = mlflow.models.get_model_info("models:/tiny-task2@champion").run_id
    x = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in sorted(served_study["images"].iterdir())])
    np.save(tmp_path / "x.npy", x.astype("float32"))
    script = f"""
import json, sys, numpy as np, mlflow
model = mlflow.pyfunc.load_model("runs:/{run_id}/onnx")
out = model.predict(np.load({str(tmp_path / "x.npy")!r}))
print("RESULT" + json.dumps({{"rows": out.to_dict(orient="split"), "tf": "tensorflow" in sys.modules}}))
"""
    env = _no_harness_env(tmp_path, served_study["home"])
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.split("RESULT", 1)[1])
    assert not out["tf"]  # ONNX Runtime alone: the server needs no TensorFlow
    served = pd.DataFrame(out["rows"]["data"], columns=out["rows"]["columns"])
    np.testing.assert_allclose(served[classes], keras_rows[classes], atol=1e-4)


@pytest.mark.slow
def test_predict_reads_a_folder_and_names_each_unreadable_file(served_study, tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for f in sorted(served_study["images"].iterdir()):
        (folder / "sub" / f.name).write_bytes(f.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    res = CliRunner().invoke(
        app, ["predict", "models:/tiny-task2@champion", str(folder), "--out", str(tmp_path / "p.csv")]
    )
    assert res.exit_code == 2
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "broken.png" in errors[0] and "Traceback" not in res.output
    table = pd.read_csv(tmp_path / "p.csv")
    assert sorted(Path(f).name for f in table["file"]) == sorted(f.name for f in served_study["images"].iterdir())
    assert list(table.columns) == ["file", *served_study["classes"], "decision", "predicted"]
    np.testing.assert_allclose(table[served_study["classes"]].sum(axis=1), 1.0, atol=1e-5)


def test_predict_with_an_unknown_model_is_one_line(tmp_path):
    res = CliRunner().invoke(app, ["predict", "models:/nope@champion", str(tmp_path)])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "models:/nope@champion: cannot load" in res.output


@pytest.mark.slow
def test_explain_writes_an_overlay_per_image_with_its_lung_field_share(served_study, tmp_path):
    res = CliRunner().invoke(
        app, ["explain", "models:/tiny-task2@champion", str(served_study["images"]), "--out", str(tmp_path / "cams")]
    )
    assert res.exit_code == 0, res.output
    files = sorted(served_study["images"].iterdir())
    overlays = sorted((tmp_path / "cams").glob("*.gradcam.png"))
    assert [o.name for o in overlays] == [f"{f.stem}.gradcam.png" for f in files]
    assert Image.open(overlays[0]).size == Image.open(files[0]).size
    colour = np.asarray(Image.open(overlays[0])).astype(int)
    assert np.abs(colour[..., 0] - colour[..., 2]).max() > 0  # a colour map laid over a grey image


def _folder_with_broken_links(served_study, tmp_path) -> Path:
    """The served images, plus a dangling link, a loop of two links, and a link back to the folder itself."""
    folder = tmp_path / "in"
    folder.mkdir()
    for f in sorted(served_study["images"].iterdir()):
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "gone.png").symlink_to(folder / "deleted.png")
    (folder / "ping").symlink_to(folder / "pong")
    (folder / "pong").symlink_to(folder / "ping")
    (folder / "again").symlink_to(folder)
    return folder


BROKEN = {"gone.png": errno.ENOENT, "ping": errno.ELOOP, "pong": errno.ELOOP}  # each link's error on stat


@pytest.mark.slow
def test_predict_names_each_broken_symbolic_link_and_a_link_loop_and_predicts_the_rest(served_study, tmp_path):
    folder = _folder_with_broken_links(served_study, tmp_path)
    res = CliRunner().invoke(
        app, ["predict", "models:/tiny-task2@champion", str(folder), "--out", str(tmp_path / "p.csv")]
    )
    assert res.exit_code == 2 and "Traceback" not in res.output
    errors = sorted(ln for ln in res.output.splitlines() if ln.startswith("error:"))
    assert errors == sorted(
        [f"error: {folder / name}: broken symbolic link ({os.strerror(code)})" for name, code in BROKEN.items()]
        + [f"error: {folder / 'again'}: symbolic link loop (leads back to {folder}), not followed"]
    )
    table = pd.read_csv(tmp_path / "p.csv")
    assert sorted(Path(f).name for f in table["file"]) == sorted(f.name for f in served_study["images"].iterdir())


@pytest.mark.slow
def test_explain_names_each_broken_symbolic_link_and_a_link_loop(served_study, tmp_path):
    folder = _folder_with_broken_links(served_study, tmp_path)
    res = CliRunner().invoke(
        app, ["explain", "models:/tiny-task2@champion", str(folder), "--out", str(tmp_path / "cams")]
    )
    assert res.exit_code == 2 and "Traceback" not in res.output
    named = sorted(ln.split(": ")[1] for ln in res.output.splitlines() if ln.startswith("error:"))
    assert named == sorted(str(folder / name) for name in [*BROKEN, "again"])
    assert len(list((tmp_path / "cams").glob("*.gradcam.png"))) == len(list(served_study["images"].iterdir()))


def _final_run(client):
    (run,) = client.search_runs(
        [client.get_experiment_by_name("tiny").experiment_id], filter_string="tags.`harness.kind` = 'final'"
    )
    return run


def _rows(client, run, tmp_path, split):
    from harness.evaluation.metrics import read_predictions

    return pd.DataFrame([r for r in read_predictions(client, run.info.run_id, str(tmp_path)) if r["split"] == split])


@pytest.mark.slow
def test_temperature_is_fitted_on_the_out_of_fold_predictions_and_the_test_split_is_read_once(
    served_study, mlflow_client, tmp_path
):
    from harness.evaluation.calibration import apply_temperature, fit_temperature

    run = _final_run(mlflow_client)
    classes = served_study["classes"]
    val = _rows(mlflow_client, run, tmp_path, "val")  # out of fold: each image by the fold member that left it out
    y = val["true"].map(classes.index).to_numpy()
    refit = fit_temperature(val[[f"p.{c}" for c in classes]].to_numpy(), y)
    assert run.data.metrics["calibration.temperature"] == pytest.approx(refit, rel=1e-3)
    assert run.data.metrics["test_reads"] == 1  # calibration transformed the stage's one set of test predictions
    test, cal = _rows(mlflow_client, run, tmp_path, "test"), _rows(mlflow_client, run, tmp_path, "test_calibrated")
    p = test[[f"p.{c}" for c in classes]].to_numpy()
    np.testing.assert_allclose(cal[[f"p.{c}" for c in classes]], apply_temperature(p, refit), atol=1e-4)


@pytest.mark.slow
def test_operating_threshold_meets_its_sensitivity_on_the_out_of_fold_predictions(
    served_study, mlflow_client, tmp_path
):
    run = _final_run(mlflow_client)
    cls, threshold = run.data.tags["op.class"], run.data.metrics["op.threshold"]
    val = _rows(mlflow_client, run, tmp_path, "val_calibrated")
    positive = (val["true"] == cls).to_numpy()
    called = (val[f"p.{cls}"] >= threshold).to_numpy()
    assert called[positive].mean() >= run.data.metrics["op.target_sensitivity"]
    assert run.data.metrics["op.val.sensitivity"] == pytest.approx(called[positive].mean())


@pytest.mark.slow
def test_every_registered_version_carries_the_model_card_of_its_run(served_study, mlflow_client):
    versions = mlflow_client.search_model_versions("")
    assert {v.name for v in versions} == {"tiny-task2", "tiny-task2-efficientnet_lite0"}
    for v in versions:
        card = mlflow.artifacts.load_text(f"runs:/{v.run_id}/model_card.md")
        assert card.startswith("# Model card") and v.description == card
        assert "research and teaching only" in card and "Temperature" in card and "Operating point" in card


@pytest.mark.slow
def test_every_final_run_logs_its_train_validation_and_test_sets_as_datasets_with_digests(served_study, mlflow_client):
    run = _final_run(mlflow_client)
    inputs = {
        next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset for d in run.inputs.dataset_inputs
    }
    assert set(inputs) == {"train", "validation", "test"}
    assert all(len(d.digest) >= 8 for d in inputs.values())
    assert len({d.digest for d in inputs.values()}) == 3
