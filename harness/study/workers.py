"""A study's workers: the chief's local worker processes (`LocalWorkers`), the command line of a worker, and how a
worker finds the search a chief serves through the store (`serving_search`, `study_done`). The oracle side — the
fault-tolerant chief and its gRPC serving — is `harness.training.distributed`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness.training.distributed import Distributed

log = logging.getLogger(__name__)
RUNNING, IDLE, STOPPED, INVALID, FAILED, COMPLETED = "RUNNING", "IDLE", "STOPPED", "INVALID", "FAILED", "COMPLETED"


class LocalWorkers:
    """The chief's own worker processes: started once per study, each with its share of the cores, restarted (with
    the same id) when one crashes, and dying with the chief (a restarted chief starts its own)."""

    def __init__(self, dist: Distributed):
        self.dist, self.procs, self.restarts = dist, {}, {}
        cores = os.cpu_count() or 2
        self.threads = max(1, cores // max(1, dist.workers))

    def start(self, worker_id: str) -> None:
        env = {
            **os.environ,
            "TF_NUM_INTRAOP_THREADS": str(self.threads),
            "TF_NUM_INTEROP_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        for k in ("KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID"):
            env.pop(k, None)
        self.procs[worker_id] = subprocess.Popen([*self.dist.spawn, worker_id], env=env, preexec_fn=_die_with_parent)

    def start_all(self) -> None:
        for i in range(self.dist.workers):
            self.start(f"worker{i}")

    def supervise(self) -> None:
        for wid, proc in list(self.procs.items()):
            code = proc.poll()
            if code not in (None, 0) and self.restarts.get(wid, 0) < 3:
                self.restarts[wid] = self.restarts.get(wid, 0) + 1
                log.warning(
                    "worker %s ended with exit code %s: starting it again (%d of 3)", wid, code, self.restarts[wid]
                )
                self.start(wid)

    def stop(self, grace: float = 30.0) -> None:
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)


def _die_with_parent() -> None:
    """Linux: the worker gets SIGKILL when the chief dies (prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def worker_command(recipe_file: Path, host: str, port: int, only: list[str] | None) -> list[str]:
    args = [sys.executable, "-m", "harness.cli", "tune", str(recipe_file), "--oracle", f"{host}:{port}"]
    for key in only or []:
        args += ["--only", key]
    return [*args, "--worker"]


def serving_search(study: str, port: int, keys: set[str]) -> tuple[str, str] | None:
    """(model key, search run id) of the search a chief serves on `port` now, among `keys`, or None."""
    from harness.tracking import runs as tracking
    from harness.tracking import schema

    exp = tracking.client().get_experiment_by_name(study)
    if exp is None:
        return None
    runs = tracking.client().search_runs(
        [exp.experiment_id],
        filter_string=f"{schema.kind_filter(schema.SEARCH)} and {schema.tag_filter(schema.ORACLE_PORT, str(port))} and "
        f"{schema.tag_filter(schema.ORACLE_STATE, 'serving')} and attributes.status = 'RUNNING'",
    )
    for r in runs:
        if r.data.tags.get(schema.MODEL_KEY) in keys:
            return r.data.tags[schema.MODEL_KEY], r.info.run_id
    return None


def study_done(study: str, port: int) -> bool:
    from harness.tracking import runs as tracking
    from harness.tracking import schema

    exp = tracking.client().get_experiment_by_name(study)
    return exp is not None and exp.tags.get(f"{schema.ORACLE_DONE_PREFIX}{port}") == "done"
