"""Scale-out search through the CLI, all on 127.0.0.1: local workers find the same trials as one worker; a worker
killed mid-trial and restarted finishes it; a worker that never comes back does not hold the search; a chief killed
and resumed finishes it, handing no trial out twice; a worker's call in flight when the chief dies is answered by the
restarted chief; and a search on a real PostgreSQL store behind `harness server`. Every search ends with one
FINISHED run per trial and nothing RUNNING."""

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness.cli import app

from conftest import spawn_cli as _spawn
from conftest import write_recipe


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trials(client, study="tiny"):
    exp = client.get_experiment_by_name(study)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string="tags.`harness.kind` = 'trial'")


def _wait(predicate, procs, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        for p in procs:
            assert p.poll() is None, p.stdout.read()[-3000:]
        time.sleep(0.3)
    pytest.fail("the awaited moment never came")


def _finish(proc, others, timeout=400) -> str:
    """`proc`'s output once it ends; fails at once, with the output, when one of `others` dies with an error first
    (a chief left without workers would wait for them) or when `proc` outlives `timeout`."""
    deadline = time.time() + timeout
    while proc.poll() is None:
        for p in others:
            code = p.poll()
            assert code in (None, 0), f"exit code {code} while the chief ran:\n{p.stdout.read()[-3000:]}"
        if time.time() > deadline:
            _kill(proc)
            pytest.fail(f"still running after {timeout} s:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.5)
    return proc.stdout.read()


def _kill(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _assert_clean(client, n_trials, study="tiny"):
    trials = _trials(client, study)
    ids = sorted(t.data.tags["trial_id"] for t in trials)
    assert len(ids) == n_trials and len(set(ids)) == n_trials, ids  # none lost, none counted twice
    assert all(t.info.status == "FINISHED" for t in trials)
    exp = client.get_experiment_by_name(study)
    assert not client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'")
    finals = client.search_runs([exp.experiment_id], filter_string="tags.`harness.kind` = 'final'")
    assert [f.info.status for f in finals] == ["FINISHED"]  # the refit happened once, in the chief
    return trials


@pytest.mark.slow
def test_two_local_workers_run_the_trials_one_worker_runs(tmp_path, mlflow_client):
    hps = {}
    for workers, study in ((1, "one"), (2, "two")):
        path = write_recipe(tmp_path / f"{study}.yaml", study=study, **{"search.max_trials": 4})
        res = CliRunner().invoke(app, ["tune", str(path), "--workers", str(workers)])
        assert res.exit_code == 0, res.output
        trials = _assert_clean(mlflow_client, 4, study)
        hps[workers] = {
            t.data.tags["trial_id"]: {k: v for k, v in t.data.params.items() if k.startswith("hp.")} for t in trials
        }
        assert {t.data.tags["worker"] for t in trials} <= {f"worker{i}" for i in range(workers)}
    assert hps[1] == hps[2]


@pytest.mark.slow
def test_a_worker_killed_mid_trial_and_restarted_finishes_it(tmp_path, harness_home, mlflow_client):
    path = write_recipe(tmp_path / "r.yaml", **{"search.max_trials": 3, "training.epochs": 300})
    port = _port()
    chief = _spawn(["tune", str(path), "--chief", "--oracle-port", str(port)], harness_home)
    worker = _spawn(["tune", str(path), "--worker", "worker0", "--oracle", f"127.0.0.1:{port}"], harness_home)
    try:
        _wait(lambda: any(t.info.status == "RUNNING" for t in _trials(mlflow_client)), [chief, worker])
        _kill(worker)
        worker = _spawn(["tune", str(path), "--worker", "worker0", "--oracle", f"127.0.0.1:{port}"], harness_home)
        out = chief.communicate(timeout=400)[0]
        assert chief.returncode == 0, out[-3000:]
        assert worker.wait(timeout=120) == 0
        # the chief extracted the features before serving; the worker read them: nothing extracted twice
        assert "(0 images extracted here, the rest read from the store)" in worker.stdout.read()
    finally:
        _kill(chief)
        _kill(worker)
    _assert_clean(mlflow_client, 3)


@pytest.mark.slow
def test_a_worker_that_never_comes_back_does_not_hold_the_search(tmp_path, harness_home, mlflow_client):
    path = write_recipe(tmp_path / "r.yaml", **{"search.max_trials": 3, "training.epochs": 300})
    port = _port()
    chief = _spawn(["tune", str(path), "--chief", "--oracle-port", str(port), "--worker-timeout", "8"], harness_home)
    w0 = _spawn(
        ["tune", str(path), "--worker", "worker0", "--oracle", f"127.0.0.1:{port}", "--worker-timeout", "8"],
        harness_home,
    )
    w1 = None
    try:
        _wait(
            lambda: any(
                t.info.status == "RUNNING" and t.data.tags["worker"] == "worker0" for t in _trials(mlflow_client)
            ),
            [chief, w0],
        )
        _kill(w0)  # gone for good: its trial must go to worker1 after 8 s of silence
        w1 = _spawn(
            ["tune", str(path), "--worker", "worker1", "--oracle", f"127.0.0.1:{port}", "--worker-timeout", "8"],
            harness_home,
        )
        out = chief.communicate(timeout=400)[0]
        assert chief.returncode == 0, out[-3000:]
        assert "worker worker0 silent" in out
    finally:
        for p in (chief, w0, w1):
            if p is not None:
                _kill(p)
    trials = _assert_clean(mlflow_client, 3)
    assert {t.data.tags["worker"] for t in trials} == {"worker1"}  # the lost trial was run again by worker1


@pytest.mark.slow
def test_a_chief_killed_and_resumed_finishes_the_search(tmp_path, harness_home, mlflow_client):
    path = write_recipe(tmp_path / "r.yaml", **{"search.max_trials": 3, "training.epochs": 300})
    port = _port()
    chief = _spawn(["tune", str(path), "--chief", "--oracle-port", str(port)], harness_home)
    worker = _spawn(["tune", str(path), "--worker", "worker0", "--oracle", f"127.0.0.1:{port}"], harness_home)
    try:
        _wait(lambda: any(t.info.status == "FINISHED" for t in _trials(mlflow_client)), [chief, worker])
        _kill(chief)  # the worker keeps its trial, or the call it had in flight, and waits for a chief
        chief = _spawn(["tune", str(path), "--chief", "--oracle-port", str(port), "--resume"], harness_home)
        out = _finish(chief, [worker])
        assert chief.returncode == 0, out[-3000:]
        assert worker.wait(timeout=120) == 0
        # the resumed chief reloaded its oracle: no trial was handed to the worker twice
        ran = re.findall(r"head trial (\d+):", worker.stdout.read())
        assert sorted(ran) == ["0", "1", "2"], ran
    finally:
        _kill(chief)
        _kill(worker)
    _assert_clean(mlflow_client, 3)


_HANGING_CHIEF = """
import sys, time
from concurrent import futures
import grpc
from keras_tuner.src import protos

class Hang(protos.get_service_grpc().OracleServicer):
    def GetSpace(self, request, context):
        print("called", flush=True)
        time.sleep(600)

server = grpc.server(futures.ThreadPoolExecutor(2))
protos.get_service_grpc().add_OracleServicer_to_server(Hang(), server)
server.add_insecure_port("127.0.0.1:" + sys.argv[1])
server.start()
print("serving", flush=True)
time.sleep(600)
"""


def test_a_workers_call_in_flight_when_the_chief_dies_is_answered_by_the_restarted_chief():
    import threading
    from concurrent import futures

    import grpc
    import keras_tuner as kt
    from keras_tuner.src import protos

    from harness.training.distributed import patient_stub

    port = _port()
    first = subprocess.Popen(
        [sys.executable, "-c", _HANGING_CHIEF, str(port)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    server = None
    try:
        assert first.stdout.readline().strip() == "serving"
        stub, answer = patient_stub("127.0.0.1", port, chief_timeout=60), {}

        def ask():
            try:
                answer["space"] = stub.GetSpace(protos.get_service().GetSpaceRequest(), wait_for_ready=True, timeout=90)
            except grpc.RpcError as e:
                answer["error"] = e.code()

        caller = threading.Thread(target=ask, daemon=True)
        caller.start()
        assert first.stdout.readline().strip() == "called"  # the call is in flight in the first chief
        _kill(first)
        time.sleep(2.0)
        assert "error" not in answer  # not given up while no chief is there

        class Restarted(protos.get_service_grpc().OracleServicer):
            def GetSpace(self, request, context):
                hp = kt.HyperParameters()
                hp.Fixed("from_the_restarted_chief", 1)
                return protos.get_service().GetSpaceResponse(hyperparameters=hp.to_proto())

        server = grpc.server(futures.ThreadPoolExecutor(2))
        protos.get_service_grpc().add_OracleServicer_to_server(Restarted(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        caller.join(60)
        assert "error" not in answer, answer
        names = [h.name for h in kt.HyperParameters.from_proto(answer["space"].hyperparameters).space]
        assert names == ["from_the_restarted_chief"]
    finally:
        _kill(first)
        if server is not None:
            server.stop(0)


def _postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL cluster on 127.0.0.1 (initdb + pg_ctl in a temporary folder, a free port)."""
    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found: .ci/run installs Debian's postgresql")
    folder = Path(tempfile.mkdtemp(prefix="harness-pg-"))
    run_as = []
    if os.geteuid() == 0:  # initdb refuses to run as root: the cluster belongs to the postgres user
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a postgres user to own the cluster")
        os.chown(folder, pw.pw_uid, pw.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    port = _port()
    data = folder / "data"
    subprocess.run([*run_as, initdb, "-D", str(data), "-U", "harness", "--auth=trust"], check=True, capture_output=True)
    subprocess.run(
        [
            *run_as,
            pg_ctl,
            "-D",
            str(data),
            "-l",
            str(folder / "log"),
            "-w",
            "-o",
            f"-c listen_addresses=127.0.0.1 -p {port} -k {folder}",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        createdb = _postgres_bin("createdb")
        subprocess.run(
            [*run_as, createdb, "-h", "127.0.0.1", "-p", str(port), "-U", "harness", "mlflow"],
            check=True,
            capture_output=True,
        )
        yield f"postgresql://harness@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*run_as, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_a_two_worker_search_on_postgresql_behind_harness_server(tmp_path, harness_home, postgres):
    import mlflow

    port = _port()
    log = tmp_path / "server.log"
    server = _spawn(["server", "--port", str(port), "--backend-store-uri", postgres], harness_home, log=log)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:  # loopback only: the server this test started
                if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                    break
            except OSError:
                assert server.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
        path = write_recipe(tmp_path / "r.yaml", **{"search.max_trials": 4})
        tune = _spawn(["tune", str(path), "--workers", "2"], harness_home, uri=uri)
        out = tune.communicate(timeout=600)[0]
        assert tune.returncode == 0, out[-3000:]
        client = mlflow.MlflowClient(uri)
        trials = _assert_clean(client, 4)
        assert {t.data.tags["worker"] for t in trials} <= {"worker0", "worker1"}
        (final,) = client.search_runs(
            [client.get_experiment_by_name("tiny").experiment_id], filter_string="tags.`harness.kind` = 'final'"
        )
        assert "predictions.csv.gz" in {a.path for a in client.list_artifacts(final.info.run_id)}  # via the server
        (version,) = client.search_model_versions("name = 'tiny-task2-efficientnet_lite0'")
        assert version.run_id == final.info.run_id
    finally:
        _kill(server)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT"])
def test_stopping_harness_server_stops_every_process_it_started_and_frees_the_port(tmp_path, how):
    """`mlflow server` runs uvicorn and a job runner as processes of their own: a signal to `harness server` (kill,
    Ctrl-C) must end all of them, not leave them serving the store."""
    import psutil

    port, started = _port(), []
    server = _spawn(["server", "--port", str(port)], tmp_path / "home")
    try:
        _wait(lambda: _answers(f"http://127.0.0.1:{port}/health"), [server], timeout=120)
        started = psutil.Process(server.pid).children(recursive=True)
        assert any("mlflow" in " ".join(p.cmdline()) for p in started)
        os.kill(server.pid, getattr(signal, how))  # the launcher alone, as `kill PID` or a terminal's Ctrl-C would
        assert server.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # closed connections may linger; no listener
            s.bind(("127.0.0.1", port))
            s.listen()
    finally:
        _kill(server)
        for p in started:  # the group kill above reaches them, unless one moved out of the group
            with contextlib.suppress(psutil.Error):
                p.kill()


def _answers(url: str) -> bool:
    try:  # loopback only: the server this test started
        return urllib.request.urlopen(url, timeout=2).status == 200
    except OSError:
        return False
