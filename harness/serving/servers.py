"""The `server` and `ui` launchers: MLflow's tracking server and UI on the harness store, run as child processes
that end with the launcher."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys

from harness.paths import get_paths


def server(
    host: str, port: int, backend_store_uri: str | None, artifacts: str | None, auth: bool, allowed_hosts: str | None
) -> list[str]:
    """The command line of an MLflow tracking server for the harness: its store (the local SQLite file unless a
    database URI is given), artifacts proxied from the harness's artifact folder."""
    p = get_paths()
    if backend_store_uri and backend_store_uri.startswith("postgresql://"):
        # SQLAlchemy 2.1 picks psycopg 3 for a bare postgresql:// URI; the harness ships psycopg2.
        backend_store_uri = "postgresql+psycopg2://" + backend_store_uri.removeprefix("postgresql://")
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend_store_uri or p.tracking_uri,
        "--artifacts-destination",
        artifacts or p.artifact_root.as_uri(),
        "--serve-artifacts",
        "--host",
        host,
        "--port",
        str(port),
    ]
    if auth:
        cmd += ["--app-name", "basic-auth"]
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    return cmd


def ui_url(port: int = 5000, study: str | None = None) -> str:
    """Where the UI of the harness store will answer: its study's runs table. A study the store does not hold is
    refused (naming the studies it holds) before any server starts."""
    url = f"http://127.0.0.1:{port}"
    if study:
        from harness.errors import HarnessError
        from harness.tracking import runs as tracking

        client = tracking.client()
        exp = client.get_experiment_by_name(study)
        if exp is None:
            # MLflow's "Default" experiment exists in every store; no harness command writes to it.
            studies = sorted(e.name for e in client.search_experiments() if e.name != "Default")
            held = f"studies here: {', '.join(studies)}" if studies else "it holds no study yet"
            raise HarnessError(f"--study {study}: no such study in {get_paths().tracking_uri} ({held})")
        url += f"/#/experiments/{exp.experiment_id}/runs"
    return url


def ui(port: int = 5000) -> None:
    """The MLflow UI of the harness store on 127.0.0.1 (until Ctrl-C)."""
    p = get_paths()
    if p.tracking_uri.startswith(("http://", "https://")):
        from harness.errors import HarnessError

        raise HarnessError(f"the store is the tracking server at {p.tracking_uri}: open it in a browser, it is the UI")
    serve(
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            p.tracking_uri,
            "--default-artifact-root",
            p.artifact_root.as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
    )


def _stop(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def serve(cmd: list[str], grace_s: float = 15.0) -> int:
    """Run a server command until it ends and return its exit code; on Ctrl-C or SIGTERM stop it with every
    process it started (0). `mlflow server` runs uvicorn and a job runner as processes of their own, and a SIGTERM
    to the launcher alone used to leave all of them serving the port. The child stays in the launcher's process
    group, so a kill of the group (kill -9 included) still reaches the whole tree."""
    import psutil

    proc = subprocess.Popen(cmd)
    previous = signal.getsignal(signal.SIGTERM)
    with contextlib.suppress(ValueError):  # only the main thread may install handlers
        signal.signal(signal.SIGTERM, _stop)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(proc.pid)
            tree = [root, *root.children(recursive=True)]
            for p in tree:
                with contextlib.suppress(psutil.Error):
                    p.terminate()
            _, alive = psutil.wait_procs(tree, timeout=grace_s)
            for p in alive:
                with contextlib.suppress(psutil.Error):
                    p.kill()
        proc.wait()
        return 0
    finally:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, previous)
