"""Keras Tuner searches as nested MLflow runs: each tuner kind, the feature cache, conditional units, failures,
registration, and resume after a search is killed mid-way."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.recipe import load_recipe
from harness.training.search import clean_values

from conftest import write_recipe


def _runs(client, study, kind):
    exp = client.get_experiment_by_name(study)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`harness.kind` = '{kind}'")


def test_clean_values_drops_bookkeeping_and_float_noise():
    assert clean_values({"dropout": 0.30000000000000004, "tuner/epochs": 2, "units_1": None, "depth": 1}) == {
        "dropout": 0.3,
        "depth": 1,
    }


@pytest.mark.slow
@pytest.mark.parametrize("tuner", ["random", "bayesian", "hyperband"])
def test_search_each_tuner(tmp_path, mlflow_client, tuner):
    path = write_recipe(
        tmp_path / "r.yaml",
        **{"search.tuner": tuner, "search.depth": {"min": 1, "max": 3}, "search.max_trials": 3, "training.epochs": 3},
    )
    res = CliRunner().invoke(app, ["tune", str(path)])
    assert res.exit_code == 0, res.output
    (parent,) = _runs(mlflow_client, "tiny", "search")
    trials = _runs(mlflow_client, "tiny", "trial")
    (final,) = _runs(mlflow_client, "tiny", "final")
    assert parent.info.status == "FINISHED" and parent.data.tags["tuner"] == tuner
    assert trials and all(t.data.tags["mlflow.parentRunId"] == parent.info.run_id for t in trials)
    assert final.data.tags["mlflow.parentRunId"] == parent.info.run_id
    for t in trials:
        assert t.info.status == "FINISHED"
        hp = {k[3:]: v for k, v in t.data.params.items() if k.startswith("hp.")}
        assert not any(k.startswith("tuner/") for k in hp)
        depth = int(hp["depth"])
        assert {f"units_{i}" for i in range(depth)} <= set(hp) and f"units_{depth}" not in hp  # conditional scope
        assert len(hp["dropout"]) <= 6  # rounded: no 0.30000000000000004
        assert "trial_seconds" in t.data.metrics and "images_per_s" in t.data.metrics
    if tuner == "hyperband":
        assert any("tuner/epochs" in t.data.tags for t in trials)
    assert any(k.startswith("best.") for k in parent.data.tags)
    assert "test.accuracy" in final.data.metrics
    (model,) = mlflow_client.search_registered_models(filter_string="name = 'tiny-task2-efficientnet_lite0'")
    assert model.latest_versions


@pytest.mark.slow
def test_trial_images_per_s_counts_every_epoch(tmp_path, mlflow_client):
    """images/s of a trial = training images x epochs it ran / its training seconds (it was understated by the
    epoch count when read from a callback the tuner had deep-copied)."""
    import json

    path = write_recipe(tmp_path / "r.yaml", **{"search.max_trials": 2, "training.epochs": 4})
    assert CliRunner().invoke(app, ["tune", str(path)]).exit_code == 0
    (parent,) = _runs(mlflow_client, "tiny", "search")
    data = json.loads(
        Path(mlflow_client.download_artifacts(parent.info.run_id, "data.json", str(tmp_path))).read_text()
    )
    n_train = sum(data["counts"]["train"].values())
    trials = _runs(mlflow_client, "tiny", "trial")
    assert len(trials) == 2
    for t in trials:
        m = t.data.metrics
        assert len(mlflow_client.get_metric_history(t.info.run_id, "val_loss")) == 4
        assert m["images_per_s"] == pytest.approx(n_train * 4 / m["train_seconds"], rel=1e-6)
        assert m["train_seconds"] <= m["trial_seconds"]


@pytest.mark.slow
def test_feature_cache_hit_across_searches_and_miss_on_change(tmp_path, mlflow_client):
    from harness.study.run import tune

    # Phantoms of their own (synthetic seed 77), so no other test has extracted these features before.
    settings = {"search.max_trials": 1, "training.epochs": 1, "data.synthetic.seed": 77}
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", **settings))
    first, second = tune(recipe), tune(recipe)
    changed = tune(load_recipe(write_recipe(tmp_path / "r2.yaml", **settings, **{"data.colour": "rgb"})))
    cache_tag = [
        mlflow_client.get_run(r[0]["parent_run_id"]).data.tags["feature_cache"] for r in (first, second, changed)
    ]
    assert cache_tag == ["miss", "hit", "miss"]


@pytest.mark.slow
def test_failing_trials_recorded_and_search_bounded(tmp_path, mlflow_client, monkeypatch):
    import harness.training.search as search
    from harness.study import run as study

    def broken(*args, **kwargs):
        raise ValueError("bad head")

    monkeypatch.setattr(search, "fit_on", broken)
    recipe = load_recipe(
        write_recipe(tmp_path / "r.yaml", **{"search.max_consecutive_failures": 2, "search.max_trials": 5})
    )
    with pytest.raises(RuntimeError, match="consecutive failures"):
        study.tune(recipe)
    trials = _runs(mlflow_client, "tiny", "trial")
    assert len(trials) == 2 and all(t.info.status == "FAILED" for t in trials)
    assert all("bad head" in t.data.tags["error"] for t in trials)
    (parent,) = _runs(mlflow_client, "tiny", "search")
    assert parent.info.status == "FAILED"


@pytest.mark.slow
def test_bad_input_inside_a_trial_stops_the_search_at_once(tmp_path, mlflow_client, monkeypatch):
    """A HarnessError (bad input, not bad luck) ends the search after the first trial instead of retrying."""
    import harness.training.search as search
    from harness.errors import HarnessError

    def bad_input(*args, **kwargs):
        raise HarnessError("/data/covid/x.png: unreadable")

    monkeypatch.setattr(search, "fit_on", bad_input)
    path = write_recipe(tmp_path / "r.yaml", **{"search.max_consecutive_failures": 3, "search.max_trials": 5})
    res = CliRunner().invoke(app, ["tune", str(path)])
    assert res.exit_code == 2 and "x.png: unreadable" in res.output and "Traceback" not in res.output
    (trial,) = _runs(mlflow_client, "tiny", "trial")
    assert trial.info.status == "FAILED" and "unreadable" in trial.data.tags["error"]
    (parent,) = _runs(mlflow_client, "tiny", "search")
    assert parent.info.status == "FAILED"


@pytest.mark.slow
def test_resume_after_kill(tmp_path, harness_home, mlflow_client):
    """kill -9 a search after its first trial, resume it: every trial has exactly one run, none left RUNNING."""
    path = write_recipe(
        tmp_path / "r.yaml", **{"search.max_trials": 4, "training.epochs": 30, "search.depth": {"min": 1, "max": 1}}
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "tune", str(path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    oracle_dir = harness_home / "tuner" / "tiny" / "task2-efficientnet_lite0"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            done = [p for p in oracle_dir.glob("trial_*/trial.json") if '"COMPLETED"' in p.read_text()]
            if done:
                break
            assert proc.poll() is None, "search ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("no trial completed in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    res = CliRunner().invoke(app, ["tune", str(path), "--resume"])
    assert res.exit_code == 0, res.output
    parents = _runs(mlflow_client, "tiny", "search")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    trials = _runs(mlflow_client, "tiny", "trial")
    ids = [t.data.tags["trial_id"] for t in trials]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 4
    assert all(t.info.status == "FINISHED" for t in trials)
    assert len(_runs(mlflow_client, "tiny", "final")) == 1


def test_resume_of_a_study_never_started_starts_it(tiny_recipe, mlflow_client):
    res = CliRunner().invoke(app, ["tune", str(tiny_recipe), "--resume", "--max-trials", "1"])
    assert res.exit_code == 0, res.output
    (final,) = _runs(mlflow_client, "tiny", "final")
    assert final.info.status == "FINISHED"
