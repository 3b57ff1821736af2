"""MLflow plumbing: one absolute store, experiments with an explicit artifact root, runs that never stay RUNNING,
device tags, and a per-epoch metrics/timing callback.
"""
from __future__ import annotations

import contextlib
import os
import platform
import signal
import time
from typing import Iterator, Optional

import keras
import mlflow
from mlflow.tracking import MlflowClient

from harness.paths import get_paths


def setup(study: str) -> str:
    """Point MLflow at the harness store and return the study's experiment id (created with an absolute root)."""
    paths = get_paths()
    mlflow.set_tracking_uri(paths.tracking_uri)
    exp = mlflow.get_experiment_by_name(study)
    if exp is None:
        exp_id = mlflow.create_experiment(study, artifact_location=(paths.artifact_root / study).as_uri())
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def client() -> MlflowClient:
    return MlflowClient(get_paths().tracking_uri)


def _sigterm_to_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def run(name: str, nested: bool = False, run_id: Optional[str] = None, tags: Optional[dict] = None) -> Iterator:
    """A run that ends FINISHED, FAILED (exception) or KILLED (Ctrl-C / SIGTERM), never left RUNNING."""
    previous = signal.getsignal(signal.SIGTERM)
    with contextlib.suppress(ValueError):  # only the main thread may install handlers
        signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    active = mlflow.start_run(run_id=run_id, run_name=None if run_id else name, nested=nested, tags=tags)
    try:
        yield active
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException as e:
        with contextlib.suppress(Exception):
            mlflow.set_tag("error", f"{type(e).__name__}: {e}"[:4000])
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")
    finally:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, previous)


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_tags() -> dict[str, str]:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    names = []
    for g in gpus:
        with contextlib.suppress(Exception):
            names.append(tf.config.experimental.get_device_details(g).get("device_name", g.name))
    return {
        "device": "GPU" if gpus else "CPU",
        "device.name": ", ".join(names) if names else _cpu_model(),
        "device.cpu": _cpu_model(),
        "device.cores": str(os.cpu_count()),
        "device.gpus": str(len(gpus)),
        "versions.tensorflow": tf.__version__,
        "versions.keras": keras.__version__,
        "versions.mlflow": mlflow.__version__,
        "threads.inter_op": os.environ.get("TF_NUM_INTEROP_THREADS", ""),
        "threads.intra_op": os.environ.get("TF_NUM_INTRAOP_THREADS", ""),
        "host.python": platform.python_version(),
    }


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = "" if v is None else str(v)
    return out


class EpochLogger(keras.callbacks.Callback):
    """Logs every epoch's metrics plus seconds per epoch and training images per second to the active run."""

    def __init__(self, n_train: int, initial_epoch: int = 0, log: bool = True):
        super().__init__()
        self.n_train, self.log = n_train, log
        self.initial_epoch = initial_epoch
        self.epoch_seconds: list[float] = []
        self._t0 = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        dt = time.perf_counter() - self._t0
        self.epoch_seconds.append(dt)
        if self.log:
            metrics = {k: float(v) for k, v in (logs or {}).items()}
            metrics.update(epoch_seconds=dt, images_per_s=self.n_train / dt if dt > 0 else 0.0)
            mlflow.log_metrics(metrics, step=epoch)


class EpochProgress(keras.callbacks.Callback):
    """A Rich progress bar over epochs (fits run with verbose=0 so logs stay clean)."""

    def __init__(self, epochs: int, label: str):
        super().__init__()
        self.epochs, self.label = epochs, label
        self._progress = None

    def on_train_begin(self, logs=None):
        from rich.progress import Progress

        self._progress = Progress(transient=True)
        self._progress.start()
        self._task = self._progress.add_task(f"Training {self.label}", total=self.epochs)

    def on_epoch_end(self, epoch, logs=None):
        val = (logs or {}).get("val_loss")
        self._progress.update(self._task, advance=1, description=f"Training {self.label}"
                              + (f" (val_loss {val:.3f})" if val is not None else ""))

    def on_train_end(self, logs=None):
        self._progress.stop()
