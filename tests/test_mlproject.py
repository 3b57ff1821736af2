"""`mlflow run` drives the same CLI through the MLproject entry points."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.mlproject import to_cli_args

from conftest import write_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_empty_parameters_are_dropped_and_flags_converted():
    assert to_cli_args(["tune", "r.yaml", "--only", "", "--max-trials", "2", "--resume", "false"]) == [
        "tune",
        "r.yaml",
        "--max-trials",
        "2",
    ]
    assert to_cli_args(["tune", "r.yaml", "--resume", "true"]) == ["tune", "r.yaml", "--resume"]


@pytest.mark.slow
def test_mlflow_run_tune_entry_point(tmp_path, harness_home, mlflow_client):
    recipe = write_recipe(tmp_path / "r.yaml")
    # MLflow runs the entry point's `python` from PATH: the environment must be the active one, as after activation.
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{harness_home / 'mlflow.db'}",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    harness_home.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlflow",
            "run",
            str(ROOT),
            "-e",
            "tune",
            "--env-manager",
            "local",
            "--experiment-name",
            "mlproject",
            "-P",
            f"recipe={recipe}",
            "-P",
            "max_trials=2",
            "-P",
            "epochs=1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    exp = mlflow_client.get_experiment_by_name("tiny")
    runs = mlflow_client.search_runs([exp.experiment_id])
    kinds = sorted(r.data.tags.get("harness.kind") for r in runs)
    assert kinds.count("search") == 1 and kinds.count("trial") == 2 and kinds.count("final") == 1
