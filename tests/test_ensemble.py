"""Cross-backbone ensembles (recipe `ensembles:`): the recipe refuses a member of another task; a study builds the
average of two backbones' final models as a final model of its own, scored on its members' validation predictions
averaged, loadable by plain MLflow, not rebuilt on resume, in the report and competing for the champion alias; a
skipped member skips it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import log_loss
from typer.testing import CliRunner

from harness.cli import app
from harness.errors import HarnessError
from harness.recipe import load_recipe

from conftest import own_store, use_module_store, write_recipe

LITE0, LITE1, ENSEMBLE = "task2-efficientnet_lite0", "task2-efficientnet_lite1", "task2-ensemble"
TWO_BACKBONES = [
    {"task": "task2", "backbone": "efficientnet_lite0"},
    {"task": "task2", "backbone": "efficientnet_lite1"},
]


def _finals(client, study: str) -> dict:
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`harness.kind` = 'final'")
    return {r.data.tags["model_key"]: r for r in runs}


def _val(client, run_id: str, folder: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """(files, probabilities, true classes) of a final run's validation rows, by file."""
    from harness.evaluation.metrics import read_predictions

    rows = sorted(
        (r for r in read_predictions(client, run_id, str(folder)) if r["split"] == "val"), key=lambda r: r["file"]
    )
    classes = sorted(k.removeprefix("p.") for k in rows[0] if k.startswith("p."))
    return (
        [r["file"] for r in rows],
        np.array([[r[f"p.{c}"] for c in classes] for r in rows]),
        [r["true"] for r in rows],
    )


def test_an_ensemble_member_of_another_task_is_refused_in_one_line_naming_it(tmp_path):
    path = write_recipe(
        tmp_path / "r.yaml",
        models=[
            {"task": "task2", "backbone": "efficientnet_lite0"},
            {"task": "task1", "backbone": "efficientnet_lite0"},
        ],
        ensembles=[{"task": "task2", "members": [LITE0, "task1-efficientnet_lite0"]}],
    )
    with pytest.raises(HarnessError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert "ensembles.0.members.1" in msg and "task1-efficientnet_lite0" in msg and "\n" not in msg


def test_members_validated_on_different_images_fail_naming_the_ensemble_and_the_member(tmp_path):
    from harness.data import prepare_task
    from harness.evaluation.metrics import prediction_rows
    from harness.stages.ensemble import averaged_validation

    recipe = load_recipe(
        write_recipe(
            tmp_path / "r.yaml", models=TWO_BACKBONES, ensembles=[{"task": "task2", "members": [LITE0, LITE1]}]
        )
    )
    task = prepare_task(recipe, "task2", 32)
    val = task.splits["val"]
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(len(task.classes)), size=(2, len(val)))
    tables = {LITE0: prediction_rows(task, val, p[0], "val"), LITE1: prediction_rows(task, val, p[1], "val")}
    idx, proba = averaged_validation(recipe.ensembles[0], task, tables)
    order = np.argsort([str(task.files[i]) for i in val])
    assert sorted(idx) == sorted(val)
    np.testing.assert_allclose(proba, p.mean(axis=0)[order], atol=2e-6)  # logged rounded to 6 places
    tables[LITE1] = prediction_rows(task, val[1:], p[1][1:], "val")
    with pytest.raises(HarnessError) as e:
        averaged_validation(recipe.ensembles[0], task, tables)
    msg = str(e.value)
    assert f"ensemble {ENSEMBLE}" in msg and f"member {LITE1}" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "objective,values,winner", [("val_loss", (0.5, 0.4, 0.3), ENSEMBLE), ("val_accuracy", (0.7, 0.9, 0.8), LITE1)]
)
def test_choose_takes_the_ensemble_when_its_validation_objective_is_best(objective, values, winner):
    from harness.tracking.registry import Candidate, choose

    keys = (LITE0, LITE1, ENSEMBLE)
    cands = [Candidate("task2", k, f"tiny-{k}", "1", f"run-{k}", objective, v) for k, v in zip(keys, values)]
    assert choose(sorted(cands, key=lambda c: c.model_key)).model_key == winner


def test_a_skipped_member_skips_the_ensemble_with_its_reason_on_the_experiment(tmp_path, mlflow_client):
    path = write_recipe(
        tmp_path / "r.yaml",
        models=[
            {"task": "task2", "backbone": "efficientnet_lite0"},
            {"task": "task2", "backbone": "vgg19", "required": False},
        ],
        ensembles=[{"task": "task2", "members": [LITE0, "task2-vgg19"]}],
    )
    res = CliRunner().invoke(app, ["tune", str(path), "--only", "task2-vgg19"])
    assert res.exit_code == 0, res.output
    assert f"{ENSEMBLE}: skipped (its member task2-vgg19 was skipped)" in res.output
    exp = mlflow_client.get_experiment_by_name("tiny")
    assert exp.tags[f"harness.skipped.{ENSEMBLE}"] == "its member task2-vgg19 was skipped"
    assert _finals(mlflow_client, "tiny") == {}


@pytest.fixture(scope="module")
def ensemble_study(tmp_path_factory, session_cache):
    """Two backbones of task 2 and their ensemble, tuned once in a store of their own."""
    tmp = tmp_path_factory.mktemp("ensemble")
    with own_store(tmp / "home", tmp / "k", session_cache):
        recipe = write_recipe(
            tmp / "r.yaml", models=TWO_BACKBONES, ensembles=[{"task": "task2", "members": [LITE0, LITE1]}]
        )
        res = CliRunner().invoke(app, ["tune", str(recipe)])
        assert res.exit_code == 0, res.output
        yield {"tmp": tmp, "home": tmp / "home", "recipe": recipe, "output": res.output}


@pytest.fixture(autouse=True)
def use_ensemble_store(request, monkeypatch):
    use_module_store(request, monkeypatch, "ensemble_study")


@pytest.mark.slow
def test_ensemble_objective_is_the_log_loss_of_its_members_averaged_validation_predictions(
    ensemble_study, mlflow_client, tmp_path
):
    finals = _finals(mlflow_client, "tiny")
    assert set(finals) == {LITE0, LITE1, ENSEMBLE}
    ens = finals[ENSEMBLE]
    assert ens.info.status == "FINISHED" and ens.data.tags["ensemble.members"] == f"{LITE0},{LITE1}"
    assert ens.data.tags["registered_model"] == f"tiny-{ENSEMBLE}" and ens.data.tags["task"] == "task2"
    (f0, p0, y0), (f1, p1, _) = (_val(mlflow_client, finals[k].info.run_id, tmp_path / k) for k in (LITE0, LITE1))
    assert f0 == f1 and len(f0) > 0
    classes = json.loads(
        Path(mlflow_client.download_artifacts(ens.info.run_id, "data.json", str(tmp_path))).read_text()
    )["classes"]
    mean = (p0 + p1) / 2
    expected = log_loss(
        [classes.index(c) for c in y0], mean / mean.sum(axis=1, keepdims=True), labels=range(len(classes))
    )
    assert ens.data.metrics["search.val_loss"] == pytest.approx(expected, rel=1e-9)
    ef, ep, _ = _val(mlflow_client, ens.info.run_id, tmp_path / "ens")
    assert ef == f0 and np.allclose(ep, mean / mean.sum(axis=1, keepdims=True), atol=1e-6)  # its validation record
    assert ens.data.metrics["test_reads"] == 1 and "test.accuracy" in ens.data.metrics


@pytest.mark.slow
def test_registered_ensemble_loads_without_harness_and_answers_its_members_mean(ensemble_study, tmp_path):
    from harness.data import prepare_task

    task = prepare_task(load_recipe(ensemble_study["recipe"]), "task2", 32)
    np.save(tmp_path / "x.npy", task.images(task.splits["test"][:4]).astype("float32"))
    script = tmp_path / "load.py"
    script.write_text(f"""
import importlib.util, json, sys
# The venv's editable install would find the project: without its finder, only a plain MLflow install is left.
sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path_hooks = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
sys.path_importer_cache.clear()
assert importlib.util.find_spec("harness") is None, "harness is importable"
import mlflow, numpy as np
x = np.load({str(tmp_path / "x.npy")!r})
keys = {[ENSEMBLE, LITE0, LITE1]!r}
# the raw probabilities (the pyfunc calibrates each model with its own temperature), and the pyfunc's answer
out = {{k: np.asarray(mlflow.keras.load_model(f"models:/tiny-{{k}}/1")(x)).tolist() for k in keys}}
served = mlflow.pyfunc.load_model(f"models:/tiny-{ENSEMBLE}/1").predict(x)
out["served"] = served.to_numpy().tolist()
assert "harness" not in sys.modules
print("RESULT" + json.dumps(out))
""")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{ensemble_study['home'] / 'mlflow.db'}"}
    res = subprocess.run(
        [sys.executable, "-I", str(script)], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = {k: np.array(v) for k, v in json.loads(res.stdout.split("RESULT", 1)[1]).items()}
    assert out[ENSEMBLE].shape == (4, len(task.classes))
    np.testing.assert_allclose(out[ENSEMBLE], (out[LITE0] + out[LITE1]) / 2, atol=1e-5)
    served = out["served"][:, : len(task.classes)]  # then the operating point's decision column
    np.testing.assert_allclose(served.sum(axis=1), 1.0, atol=1e-6)
    assert (served.argmax(axis=1) == out[ENSEMBLE].argmax(axis=1)).all()  # a temperature never changes the label


@pytest.mark.slow
def test_resumed_study_keeps_the_built_ensemble_and_the_report_ranks_it_for_the_champion(ensemble_study, mlflow_client):
    before = _finals(mlflow_client, "tiny")[ENSEMBLE].info.run_id
    res = CliRunner().invoke(app, ["tune", str(ensemble_study["recipe"]), "--resume"])
    assert res.exit_code == 0, res.output
    finals = _finals(mlflow_client, "tiny")
    assert finals[ENSEMBLE].info.run_id == before  # not built again
    assert len(mlflow_client.search_model_versions(f"name = 'tiny-{ENSEMBLE}'")) == 1
    out = ensemble_study["tmp"] / "report"
    res = CliRunner().invoke(app, ["compare", str(ensemble_study["recipe"]), "--out", str(out)])
    assert res.exit_code == 0, res.output
    best = min(finals.values(), key=lambda r: r.data.metrics["search.val_loss"]).data.tags["model_key"]
    champion = mlflow_client.get_model_version_by_alias("tiny-task2", "champion")
    assert champion.tags["model_key"] == best  # the best validation objective of the three, the ensemble included
    compare_run = mlflow_client.search_runs(
        [mlflow_client.get_experiment_by_name("tiny").experiment_id], filter_string="tags.`harness.kind` = 'compare'"
    )[0]
    assert f"({best})" in compare_run.data.tags["champion.task2"]
    md = (out / "report.md").read_text()
    summary = md.split("\n## Summary\n", 1)[1].split("\n## ", 1)[0]
    row = next(line for line in summary.splitlines() if line.startswith(f"| {ENSEMBLE} "))
    assert f"average of {LITE0},{LITE1}" in row and "members averaged" in row
    assert "| 3 |" in md.split("\n## Champions\n", 1)[1].split("\n## ", 1)[0]  # three candidates for the alias
