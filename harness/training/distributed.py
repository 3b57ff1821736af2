"""Scale-out search: Keras Tuner's own distributed engine (a chief serving the oracle over gRPC, workers asking it for
trials) made to survive faults, with the MLflow tracking store as the one record every process shares.

Keras Tuner 1.4.8's chief waits for every worker it has seen, with no heartbeat (keras-team/keras-tuner#915): a
worker that dies keeps it waiting forever; a restarted chief hands out again the trials its workers are still
running; `max_consecutive_failed_trials` raises inside the gRPC handler and kills the workers (#927); the oracle's
lock stays held after an exception. Here the chief's oracle (`robust`) hears a heartbeat from each worker, ends the
trial of a worker silent for `worker_timeout` (handed once to another worker, then FAILED), gives ongoing trials back
to their own workers after a restart, counts failures itself, and never counts a trial twice; `serve` replaces
Keras Tuner's wait loop with one that ends. A worker's calls to the chief ride out a chief restart (`patient_stub`:
Keras Tuner lets a call in flight when the chief dies kill the worker), and its heartbeat thread exits it when the
chief is gone for good. The final model, the floor, the audit and the nested estimate run once, in the chief, after
the last trial.

Workers find the search being served through the store: while the chief serves a model's search, that search run
carries the tags `oracle.port` and `oracle.state=serving`. The oracle's port has no authentication (Keras Tuner's
design): it binds to 127.0.0.1 unless the user names another interface. The gRPC servicer and stubs come from
`keras_tuner.src` (not its public API): keras-tuner is pinned below 1.5.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from datetime import datetime

import keras_tuner as kt

from harness.errors import HarnessError

log = logging.getLogger(__name__)
RUNNING, IDLE, STOPPED, INVALID, FAILED, COMPLETED = "RUNNING", "IDLE", "STOPPED", "INVALID", "FAILED", "COMPLETED"
HEARTBEAT_KEY = "kt-tuner-id"


@dataclass
class Distributed:
    """How a search is spread: `workers` local worker processes spawned by the chief (0: they come from other
    machines), the oracle's interface and port, and how long a silent worker keeps its trial."""

    workers: int = 0
    bind: str = "127.0.0.1"
    port: int = 0
    worker_timeout: float = 60.0
    startup_timeout: float = 600.0  # how long the chief waits for a first worker
    spawn: list = field(default_factory=list)  # command line of a local worker, its id appended


def safe_synchronized(func):
    """Keras Tuner's `synchronized` releases the oracle's lock only when the method returns: an exception leaves it
    held. The same lock, released in `finally`."""
    from keras_tuner.src.engine.oracle import LOCKS, THREADS

    @functools.wraps(func)
    def wrapped(oracle, *args, **kwargs):
        name = threading.current_thread().name
        need = THREADS[oracle] != name
        if need:
            LOCKS[oracle].acquire()
            THREADS[oracle] = name
        try:
            return func(oracle, *args, **kwargs)
        finally:
            if need:
                THREADS[oracle] = None
                LOCKS[oracle].release()

    return wrapped


def robust(base: type) -> type:
    """The chief's oracle: `base` (a harness oracle with atomic state files) that survives lost workers and restarts.

    Long because it is a class: its methods are short overrides of Keras Tuner's oracle, kept together in the factory
    that subclasses whichever oracle the recipe names."""

    class Robust(base):
        worker_timeout = 60.0
        consecutive_failures_limit = 3

        def _init_live(self):
            if not hasattr(self, "_last_seen"):
                self._last_seen, self._stopped, self._exhausted, self.abort_reason = {}, set(), False, None
                self._restored_ongoing = {}

        def touch(self, tuner_id):
            self._init_live()
            self._last_seen[tuner_id] = time.monotonic()

        def alive(self, tuner_id):
            self._init_live()
            t = self._last_seen.get(tuner_id)
            return t is not None and time.monotonic() - t < self.worker_timeout

        @safe_synchronized
        def create_trial(self, tuner_id):
            self._init_live()
            self.touch(tuner_id)
            self._stopped.discard(tuner_id)
            if self.abort_reason:
                trial = kt.engine.trial.Trial(self.get_space(), status=STOPPED)
            else:
                trial = super().create_trial(tuner_id)
            if trial.status == STOPPED:
                self._exhausted = True
                if (self.ongoing_trials or self._retry_queue) and not self.abort_reason:
                    # Another worker may still lose its trial: this one waits to take it over instead of leaving.
                    self.tuner_ids.add(tuner_id)
                    trial.status = IDLE
                else:
                    self._stopped.add(tuner_id)
            return trial

        def _is_ongoing(self, trial_id):
            return any(t.trial_id == trial_id for t in self.ongoing_trials.values())

        @safe_synchronized
        def update_trial(self, trial_id, metrics, step=0):
            if not self._is_ongoing(trial_id):  # the late report of a trial ended meanwhile: ignored
                return self.trials[trial_id]
            return super().update_trial(trial_id, metrics, step=step)

        @safe_synchronized
        def end_trial(self, trial):
            self._init_live()
            if not self._is_ongoing(trial.trial_id):  # ended already (reaped, or reported twice): never twice
                return
            if trial.trial_id in self._retry_queue:
                self._retry_queue.remove(trial.trial_id)
            super().end_trial(trial)
            n = 0
            for tid in self.end_order:
                n = n + 1 if self.trials[tid].status == FAILED else 0
            if self.consecutive_failures_limit and n >= self.consecutive_failures_limit and not self.abort_reason:
                self.abort_reason = f"{n} consecutive failed trials"
            self.save()  # Keras Tuner saved before dropping the trial from the ongoing ones

        @safe_synchronized
        def reap(self):
            """End the trial of every worker silent for worker_timeout: INVALID, so it is retried once by another
            worker (max_retries_per_trial), then FAILED."""
            self._init_live()
            for tuner_id, trial in list(self.ongoing_trials.items()):
                if not self.alive(tuner_id):
                    log.warning(
                        "worker %s silent for %.0f s: its trial %s goes to another worker",
                        tuner_id,
                        self.worker_timeout,
                        trial.trial_id,
                    )
                    trial.status, trial.message = INVALID, f"worker {tuner_id} lost"
                    self.end_trial(trial)
                    self.tuner_ids.discard(tuner_id)

        def finished(self):
            self._init_live()
            if self.ongoing_trials:
                return False
            if self.abort_reason:
                return True  # queued retries stay queued for a later --resume
            if self._retry_queue:
                return False
            return self._exhausted or (bool(self.max_trials) and len(self.trials) >= self.max_trials)

        def set_state(self, state):
            super().set_state(state)
            self._init_live()
            self._restored_ongoing = dict(state["ongoing_trials"])

        def reload(self):
            super().reload()  # Keras Tuner re-queues every ongoing trial: their workers may still be running them
            self._init_live()
            now = time.monotonic()
            for tuner_id, trial_id in self._restored_ongoing.items():
                if trial_id in self._retry_queue:
                    self._retry_queue.remove(trial_id)
                if trial_id in self.end_order or self.trials[trial_id].status in (COMPLETED, FAILED):
                    continue
                self.ongoing_trials[tuner_id] = self.trials[trial_id]  # still its worker's, for worker_timeout
                self._display.trial_start.setdefault(trial_id, datetime.now())
                self._display.trial_number.setdefault(trial_id, len(self.trials))
                self.tuner_ids.add(tuner_id)
                self._last_seen[tuner_id] = now

    Robust.__name__ = f"Robust{base.__name__}"
    return Robust


def _servicer(oracle):
    from keras_tuner.src import protos
    from keras_tuner.src.distribute.oracle_chief import OracleServicer

    class Servicer(OracleServicer):
        def GetSpace(self, request, context):  # also the heartbeat: the worker's id travels in the metadata
            tid = dict(context.invocation_metadata()).get(HEARTBEAT_KEY)
            if tid:
                self.oracle.touch(tid)
            return super().GetSpace(request, context)

        def CreateTrial(self, request, context):
            resp = super().CreateTrial(request, context)
            if resp.trial.status == protos.get_proto().TrialStatus.IDLE:
                time.sleep(1.0)  # the worker asks again at once on IDLE
            return resp

    return Servicer(oracle)


def serve(oracle, dist: Distributed, supervise=None, poll: float = 0.5) -> dict:
    """Serve the oracle until its search is over (or aborted), then stop; `supervise()` runs every poll (the chief
    restarts local workers that crashed). Returns {statuses, abort}."""
    import grpc
    from keras_tuner.src import protos

    oracle.worker_timeout = dist.worker_timeout
    oracle._init_live()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=[("grpc.so_reuseport", 0)])
    protos.get_service_grpc().add_OracleServicer_to_server(_servicer(oracle), server)
    try:
        bound = server.add_insecure_port(f"{dist.bind}:{dist.port}")
    except RuntimeError:
        bound = 0
    if not bound:
        raise HarnessError(f"cannot serve the oracle on {dist.bind}:{dist.port} (in use, or not an interface here)")
    server.start()
    t0 = time.monotonic()
    try:
        while not oracle.finished():
            time.sleep(poll)
            if supervise:
                supervise()
            oracle.reap()
            # Trials wait (re-queued) for a worker to take them; with no worker at all for startup_timeout (since
            # the start, or since the last one was heard), the search stops, resumable, instead of waiting forever.
            last = max([t0, *oracle._last_seen.values()])
            silent = not oracle.ongoing_trials and not any(oracle.alive(t) for t in oracle._last_seen)
            if silent and time.monotonic() - last > dist.startup_timeout and not oracle.finished():
                oracle.abort_reason = oracle.abort_reason or (
                    f"no worker for {dist.startup_timeout:.0f} s" if oracle._last_seen else "no worker came"
                )
        # Linger until the live workers have been told STOPPED (else they wait for a chief that is gone).
        end, at_least = time.monotonic() + dist.worker_timeout, time.monotonic() + 2.0
        while time.monotonic() < end:
            waiting = [t for t in oracle._last_seen if oracle.alive(t) and t not in oracle._stopped]
            if not waiting and time.monotonic() >= at_least:
                break
            time.sleep(poll)
    finally:
        server.stop(grace=2).wait()
    return {"statuses": {tid: t.status for tid, t in oracle.trials.items()}, "abort": oracle.abort_reason}


def patient_stub(host: str, port: int, chief_timeout: float):
    """A worker's stub to the chief's oracle that rides out a chief restart. gRPC's `wait_for_ready` (Keras Tuner's
    client sets it) waits only for a channel that is not connected yet: a call in flight when the chief dies ends
    with UNAVAILABLE, and the worker, which Keras Tuner lets die of it, would leave the resumed chief with nobody to
    run its trials. Every call is sent again until the chief answers or `chief_timeout` passes (a resumed chief
    gives the worker back its own trial, and ignores a report it has already counted, so a repeat is harmless), on
    a channel that tries to reconnect at least every 5 s (gRPC's default backoff grows to 120 s)."""
    import grpc
    from keras_tuner.src import protos

    channel = grpc.insecure_channel(
        f"{host}:{port}",
        options=[("grpc.initial_reconnect_backoff_ms", 500), ("grpc.max_reconnect_backoff_ms", 5000)],
    )
    stub = protos.get_service_grpc().OracleStub(channel)

    class Patient:
        raw = stub  # without the retries: the heartbeat keeps its own count of the chief's silence

        def __getattr__(self, name):
            method = getattr(stub, name)

            @functools.wraps(method)
            def call(*args, **kwargs):
                start, warned = time.monotonic(), False
                while True:
                    try:
                        return method(*args, **kwargs)
                    except grpc.RpcError as e:
                        if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() - start > chief_timeout:
                            raise
                        if not warned:
                            log.warning("the chief is unreachable (%s): waiting for it to come back", name)
                            warned = True
                        time.sleep(1.0)

            return call

    return Patient()


class Heartbeat(threading.Thread):
    """In a worker: GetSpace with the worker's id every `period` seconds. Also its watchdog: a chief unreachable for
    `chief_timeout` seconds (longer than a restart takes) ends the worker."""

    def __init__(self, stub, worker_id: str, period: float = 5.0, chief_timeout: float = 600.0):
        super().__init__(daemon=True)
        self.stub, self.period, self.chief_timeout = stub, period, chief_timeout
        self.md = ((HEARTBEAT_KEY, worker_id),)
        self.stopped = threading.Event()

    def run(self):
        import grpc
        from keras_tuner.src import protos

        req = protos.get_service().GetSpaceRequest()
        last_ok = time.monotonic()
        while not self.stopped.wait(self.period):
            try:
                self.stub.GetSpace(req, metadata=self.md, timeout=5)
                last_ok = time.monotonic()
            except grpc.RpcError:  # the chief is restarting, or between two models' searches
                if time.monotonic() - last_ok > self.chief_timeout:
                    log.error("the chief has been unreachable for %.0f s: this worker stops", self.chief_timeout)
                    os._exit(3)
