"""Studies that survive interruption, each through the CLI on a real store: resume a whole study, skip a finished
search, redo a cut-short refit once, refuse a changed recipe, Ctrl-C once and SIGTERM, two studies on one store, one
process per study, and a failed write that loses nothing."""

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness.cli import app

from conftest import spawn_cli as _spawn
from conftest import write_recipe

TWO_MODELS = [{"task": "task2", "backbone": "efficientnet_lite0"}, {"task": "task1", "backbone": "efficientnet_lite0"}]


def _runs(client, kind, study="tiny", **tags):
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`harness.kind` = '{kind}'")
    return [r for r in runs if all(r.data.tags.get(k) == v for k, v in tags.items())]


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"process ended first: {proc.stdout.read()[-2000:]}"
        time.sleep(0.2)
    pytest.fail("the awaited moment never came")


def _completed_trials(folder: Path) -> int:
    return sum('"COMPLETED"' in p.read_text() for p in folder.glob("trial_*/trial.json"))


def _assert_one_of_each(client, keys: list[str]) -> None:
    """The end state of a resumed study: per model one search, one final, one floor and one model version; every
    trial one FINISHED run; nothing RUNNING."""
    for key in keys:
        (parent,) = _runs(client, "search", model_key=key)
        assert parent.info.status == "FINISHED"
        for kind in ("final", "baseline"):
            (run,) = _runs(client, kind, model_key=key)
            assert run.info.status == "FINISHED"
        trials = [t for t in _runs(client, "trial") if t.data.tags["mlflow.parentRunId"] == parent.info.run_id]
        ids = [t.data.tags["trial_id"] for t in trials]
        assert ids and len(ids) == len(set(ids)) and all(t.info.status == "FINISHED" for t in trials)
        assert len(client.search_model_versions(f"name = 'tiny-{key}'")) == 1
    exp = client.get_experiment_by_name("tiny")
    assert not client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'")


@pytest.mark.slow
def test_a_study_killed_in_its_first_model_resumes_every_model(tmp_path, harness_home, mlflow_client):
    path = write_recipe(tmp_path / "r.yaml", **{"models": TWO_MODELS, "search.max_trials": 3, "training.epochs": 20})
    proc = _spawn(["tune", str(path)], harness_home)
    first = harness_home / "tuner" / "tiny" / "task2-efficientnet_lite0"
    try:
        _wait_for(lambda: _completed_trials(first) >= 1, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    res = CliRunner().invoke(app, ["tune", str(path), "--resume"])
    assert res.exit_code == 0, res.output
    _assert_one_of_each(mlflow_client, ["task2-efficientnet_lite0", "task1-efficientnet_lite0"])
    assert len(_runs(mlflow_client, "trial", stage="head")) == 6


@pytest.mark.slow
def test_resume_skips_a_finished_search_and_registers_nothing_twice(tmp_path, mlflow_client):
    path = write_recipe(tmp_path / "r.yaml")
    assert CliRunner().invoke(app, ["tune", str(path)]).exit_code == 0
    trials = {t.info.run_id for t in _runs(mlflow_client, "trial")}
    res = CliRunner().invoke(app, ["tune", str(path), "--resume"])
    assert res.exit_code == 0 and "task2-efficientnet_lite0: finished already" in res.output
    _assert_one_of_each(mlflow_client, ["task2-efficientnet_lite0"])
    assert {t.info.run_id for t in _runs(mlflow_client, "trial")} == trials


@pytest.mark.slow
def test_a_refit_cut_short_is_done_again_once_without_rerunning_trials(tmp_path, mlflow_client, monkeypatch):
    import harness.stages.search as study  # the stage that calls finish

    path = write_recipe(tmp_path / "r.yaml")
    real = study.finish

    def power_cut(*args, **kwargs):
        raise RuntimeError("power cut")

    monkeypatch.setattr(study, "finish", power_cut)
    res = CliRunner().invoke(app, ["tune", str(path)])
    assert res.exit_code == 1 and "power cut" in res.output
    (failed,) = _runs(mlflow_client, "final")
    assert failed.info.status == "FAILED"
    trials = {t.info.run_id for t in _runs(mlflow_client, "trial")}
    monkeypatch.setattr(study, "finish", real)
    res = CliRunner().invoke(app, ["tune", str(path), "--resume"])
    assert res.exit_code == 0, res.output
    _assert_one_of_each(mlflow_client, ["task2-efficientnet_lite0"])  # the failed final is gone, one new one
    assert {t.info.run_id for t in _runs(mlflow_client, "trial")} == trials  # no trial ran again


@pytest.mark.slow
def test_resume_against_a_changed_recipe_is_refused_and_restart_starts_over(tmp_path, mlflow_client):
    path = write_recipe(tmp_path / "r.yaml", **{"search.max_trials": 1, "search.units": [32, 64]})
    assert CliRunner().invoke(app, ["tune", str(path)]).exit_code == 0
    write_recipe(path, **{"search.max_trials": 1, "search.units": [16, 32], "data.image_size": 40})
    res = CliRunner().invoke(app, ["tune", str(path), "--resume"])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "recipe changed" in lines[0]  # before any image is read
    assert "search space" in lines[0] and "image size" in lines[0] and "--restart" in lines[0]
    write_recipe(path, **{"search.max_trials": 1, "search.units": [32, 64], "search.max_consecutive_failures": 3})
    assert CliRunner().invoke(app, ["tune", str(path), "--resume"]).exit_code == 0  # max_trials etc. may change
    write_recipe(path, **{"search.max_trials": 1, "search.units": [16, 32]})
    assert CliRunner().invoke(app, ["tune", str(path), "--restart"]).exit_code == 0
    assert len(_runs(mlflow_client, "search")) == 2 and len(_runs(mlflow_client, "final")) == 2


@pytest.mark.slow
def test_ctrl_c_once_finishes_the_current_trial_then_stops_resumably(tmp_path, harness_home, mlflow_client):
    path = write_recipe(tmp_path / "r.yaml", **{"search.max_trials": 3, "training.epochs": 60})
    proc = _spawn(["tune", str(path)], harness_home)
    folder = harness_home / "tuner" / "tiny" / "task2-efficientnet_lite0"
    _wait_for(lambda: any(folder.glob("trial_*")), proc)  # trial 0 is running
    os.killpg(proc.pid, signal.SIGINT)
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == 130 and "stopped after the current trial" in output and "--resume" in output
    trials = _runs(mlflow_client, "trial")
    assert len(trials) == 1 and trials[0].info.status == "FINISHED"  # the running trial finished; none started
    (parent,) = _runs(mlflow_client, "search")
    assert parent.info.status == "KILLED" and not _runs(mlflow_client, "final")
    assert CliRunner().invoke(app, ["tune", str(path), "--resume"]).exit_code == 0
    _assert_one_of_each(mlflow_client, ["task2-efficientnet_lite0"])
    assert len(_runs(mlflow_client, "trial")) == 3


@pytest.mark.slow
def test_sigterm_stops_at_once_and_leaves_nothing_running(tmp_path, harness_home, mlflow_client):
    path = write_recipe(tmp_path / "r.yaml", **{"search.max_trials": 3, "training.epochs": 1000})
    proc = _spawn(["tune", str(path)], harness_home)
    folder = harness_home / "tuner" / "tiny" / "task2-efficientnet_lite0"
    _wait_for(lambda: any(folder.glob("trial_*")), proc)
    time.sleep(1.0)
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "interrupted" in output and time.time() - t0 < 60
    exp = mlflow_client.get_experiment_by_name("tiny")
    runs = mlflow_client.search_runs([exp.experiment_id])
    assert runs and all(r.info.status != "RUNNING" for r in runs)
    assert [t.info.status for t in _runs(mlflow_client, "trial")] == ["KILLED"]  # not left to finish


@pytest.mark.slow
def test_two_studies_write_one_store_at_the_same_time(tmp_path, harness_home, mlflow_client):
    paths = [write_recipe(tmp_path / f"{s}.yaml", study=s, **{"search.max_trials": 3}) for s in ("one", "two")]
    procs = [_spawn(["tune", str(p)], harness_home) for p in paths]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    for study in ("one", "two"):
        (final,) = _runs(mlflow_client, "final", study=study)
        assert final.info.status == "FINISHED" and len(_runs(mlflow_client, "trial", study=study)) == 3


@pytest.mark.slow
def test_a_second_process_on_the_same_study_is_refused(tmp_path, harness_home):
    import socket

    path = write_recipe(tmp_path / "r.yaml", **{"search.max_trials": 2, "training.epochs": 200})
    proc = _spawn(["tune", str(path)], harness_home)
    lock = harness_home / "tuner" / "tiny" / ".lock"
    try:
        _wait_for(lock.is_file, proc)
        res = CliRunner().invoke(app, ["tune", str(path), "--resume"])
        assert res.exit_code == 2
        assert f"study 'tiny' is in use by pid {proc.pid} on host {socket.gethostname()}" in res.output
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # the holder is gone: its lock is taken over, and the study continues
    assert CliRunner().invoke(app, ["tune", str(path), "--resume"]).exit_code == 0


@pytest.mark.slow
def test_disk_full_while_logging_the_final_model_fails_it_in_one_line_and_resume_completes(
    tmp_path, mlflow_client, monkeypatch
):
    import harness.serving.flavor as registry

    path = write_recipe(tmp_path / "r.yaml")
    real = registry.log_classifier
    where = tmp_path / "home" / "mlartifacts" / "model.keras"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))

    monkeypatch.setattr(registry, "log_classifier", full)
    res = CliRunner().invoke(app, ["tune", str(path)])
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.exit_code == 2 and lines == [
        f"error: {where}: No space left on device; fix it, then continue with `harness tune RECIPE --resume`"
    ]
    (final,) = _runs(mlflow_client, "final")
    assert final.info.status == "FAILED" and "No space left on device" in final.data.tags["error"]
    trials = {t.info.run_id for t in _runs(mlflow_client, "trial")}
    monkeypatch.setattr(registry, "log_classifier", real)
    assert CliRunner().invoke(app, ["tune", str(path), "--resume"]).exit_code == 0
    _assert_one_of_each(mlflow_client, ["task2-efficientnet_lite0"])
    assert {t.info.run_id for t in _runs(mlflow_client, "trial")} == trials


@pytest.mark.slow
def test_read_only_tuner_folder_stops_the_search_and_resume_loses_nothing(
    tmp_path, harness_home, mlflow_client, monkeypatch
):
    import harness.process as resume

    path = write_recipe(tmp_path / "r.yaml", **{"search.max_trials": 3})
    real, saves = resume.atomic_json, []

    def read_only(target, obj):
        saves.append(target)
        if Path(target).name == "oracle.json" and _completed_trials(Path(target).parent) >= 1:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(target))
        return real(target, obj)

    monkeypatch.setattr(resume, "atomic_json", read_only)
    import harness.training.search as search

    monkeypatch.setattr(search, "atomic_json", read_only)
    res = CliRunner().invoke(app, ["tune", str(path)])
    assert res.exit_code == 2 and "oracle.json: Read-only file system" in res.output
    monkeypatch.setattr(search, "atomic_json", real)
    monkeypatch.setattr(resume, "atomic_json", real)
    assert CliRunner().invoke(app, ["tune", str(path), "--resume"]).exit_code == 0
    _assert_one_of_each(mlflow_client, ["task2-efficientnet_lite0"])
    assert len(_runs(mlflow_client, "trial")) == 3
