"""Shared fixtures: every test gets its own MLflow store; decoded images, features and converted weights are cached
once per session. KERAS_HOME points at an empty folder and weights fetches at a closed loopback port, so nothing
reaches for ImageNet downloads on the network."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import harness.paths  # noqa: F401  imported before any test changes the environment (it reads it once)

REAL_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "covid-xray").resolve()
# The lab (bench/lab.py, bench/readouts_lab.py) lives outside the installed package, importable as its scripts
# import it; appended, not inserted, so a script's name there never shadows an installed module.
sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def harness_home(tmp_path, session_cache, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("HARNESS_HOME", str(home))
    monkeypatch.setenv("HARNESS_CACHE", str(session_cache))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    # Weights fetches go to a closed loopback port unless a test serves a mirror itself: tests never leave the machine.
    monkeypatch.setenv("HARNESS_WEIGHTS_MIRROR", "http://127.0.0.1:9/")
    # setenv (not delenv) so pytest restores them: MLflow itself exports both variables once it is used.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")
    monkeypatch.setattr("harness.paths._USER_TRACKING_URI", None)
    return home


def write_recipe(path: Path, **changes) -> Path:
    """The demo recipe, shrunk: tiny phantoms, 32 px, 2 epochs, 2 trials; `changes` are dotted-key overrides."""
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml").read_text())
    raw["study"] = "tiny"
    raw["data"]["synthetic"] = {"per_class": 10, "size": 48, "seed": 1}
    raw["data"]["image_size"] = 32
    raw["training"] = {"epochs": 2, "batch_size": 8, "learning_rate": 0.001}
    raw["search"]["max_trials"] = 2
    raw["search"]["cv_folds"] = 1  # the single split unless a test asks for folds (test_selection does)
    raw["models"] = [{"task": "task2", "backbone": "efficientnet_lite0", "weights": "imagenet"}]
    raw.pop("ensembles", None)  # the demo's ensemble names models the shrunk recipe no longer has
    for dotted, value in changes.items():
        node = raw
        keys = dotted.split(".")
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
        node[keys[-1]] = value
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def tiny_recipe(tmp_path) -> Path:
    return write_recipe(tmp_path / "tiny.yaml")


@pytest.fixture
def mlflow_client():
    from harness.tracking import runs as tracking

    return tracking.client()


def pytest_collection_modifyitems(config, items):
    if not REAL_DATA.is_dir():
        skip = pytest.mark.skip(reason=f"real data not found at {REAL_DATA}")
        for item in items:
            if "realdata" in item.keywords:
                item.add_marker(skip)


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextlib.contextmanager
def own_store(home: Path, keras_home: Path, cache: Path):
    """The environment of a store of its own, for a module-scoped study built once: HARNESS_HOME and its SQLite
    tracking URI, the session's cache, a Keras home and the loopback weights mirror; afterwards every variable is as
    it was."""
    keys = ("HARNESS_HOME", "HARNESS_CACHE", "KERAS_HOME", "MLFLOW_TRACKING_URI", "HARNESS_WEIGHTS_MIRROR")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(
        HARNESS_HOME=str(home),
        HARNESS_CACHE=str(cache),
        KERAS_HOME=str(keras_home),
        HARNESS_WEIGHTS_MIRROR="http://127.0.0.1:9/",
        MLFLOW_TRACKING_URI=f"sqlite:///{home / 'mlflow.db'}",
    )
    try:
        yield home
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def use_module_store(request, monkeypatch, fixture: str) -> None:
    """For a test that asks for the module-scoped study `fixture`: point HARNESS_HOME and the tracking URI at that
    study's store (the per-test home the autouse `harness_home` set is left otherwise)."""
    if fixture in request.fixturenames:
        home = request.getfixturevalue(fixture)["home"]
        monkeypatch.setenv("HARNESS_HOME", str(home))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")


def wait_for_ping(port: int, proc: subprocess.Popen, seconds: float, output) -> None:
    """Until the model server this test started on 127.0.0.1:`port` answers /ping; fails with the server's
    `output()` if it exits first, or when `seconds` pass."""
    import time
    import urllib.request

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:  # loopback only: the server this test started
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).status == 200:
                return
        except OSError:
            assert proc.poll() is None, output()[-3000:]
            time.sleep(0.5)
    pytest.fail(f"the model server on port {port} did not answer /ping in {seconds:.0f} s")


def spawn_cli(args, home: Path, uri: str | None = None, *, log: Path | None = None) -> subprocess.Popen:
    """`harness ARGS` in a process of its own (own session, so a test can kill its group), with its own home and
    store (the local SQLite file unless `uri` names another), output captured — into `log` for a long-lived server
    no one reads while it serves (its request log would fill a pipe, and a full pipe blocks the server)."""
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HARNESS_HOME": str(home),
        "MLFLOW_TRACKING_URI": uri or f"sqlite:///{home / 'mlflow.db'}",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "harness.cli", *args],
        env=env,
        stdout=subprocess.PIPE if log is None else log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        # Ctrl-C as a terminal delivers it: a suite started in the background (`cmd &`, CI) inherits SIGINT ignored,
        # and Python then installs no KeyboardInterrupt handler in the child.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
