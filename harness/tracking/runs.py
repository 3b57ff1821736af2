"""MLflow plumbing: one absolute store, experiments with an explicit artifact root, runs that never stay RUNNING,
device and model tags, and batched writes of a fit's per-epoch metrics.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import time
from collections import Counter
from collections.abc import Iterator

import keras
import mlflow
import yaml
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from harness.paths import get_paths
from harness.process import pid_alive
from harness.tracking import schema


def setup(study: str) -> str:
    """Point MLflow at the harness store and return the study's experiment id (created with an absolute root)."""
    paths = get_paths()
    mlflow.set_tracking_uri(paths.tracking_uri)
    exp = mlflow.get_experiment_by_name(study)
    if exp is None:
        # A tracking server keeps the artifacts itself (proxied, `harness server`); a local store keeps them here.
        remote = paths.tracking_uri.startswith(("http://", "https://"))
        location = None if remote else (paths.artifact_root / study).as_uri()
        try:
            exp_id = mlflow.create_experiment(study, artifact_location=location)
        except mlflow.exceptions.MlflowException:  # another process (a worker, a second study) made it first
            exp_id = mlflow.get_experiment_by_name(study).experiment_id
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def client() -> MlflowClient:
    return MlflowClient(get_paths().tracking_uri)


def _sigterm_to_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _owner() -> dict[str, str]:
    """Which process runs a run: a run left RUNNING by a process that no longer exists can then be told apart from
    one in progress (`end_orphans`)."""
    return {"harness.host": socket.gethostname(), "harness.pid": str(os.getpid())}


@contextlib.contextmanager
def run(name: str, nested: bool = False, run_id: str | None = None, tags: dict | None = None) -> Iterator:
    """A run that ends FINISHED, FAILED (exception) or KILLED (Ctrl-C / SIGTERM), never left RUNNING; tagged with
    its process (a resumed run with the resuming one)."""
    previous = signal.getsignal(signal.SIGTERM)
    with contextlib.suppress(ValueError):  # only the main thread may install handlers
        signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    # A resumed run gets the tags too (MLflow sets them on it): its owner is now this process.
    tags = {**(tags or {}), **_owner()}
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


def end_orphans(experiment_id: str, kind: str) -> int:
    """Runs of `kind` left RUNNING by a process of this host that no longer runs (kill -9) become KILLED; runs of
    live processes, of other hosts or without an owner tag are left alone."""
    c, n, host = client(), 0, socket.gethostname()
    for r in c.search_runs(
        [experiment_id], filter_string=f"attributes.status = 'RUNNING' and {schema.kind_filter(kind)}"
    ):
        t = r.data.tags
        if (
            t.get("harness.host") == host
            and t.get("harness.pid", "").isdigit()
            and not pid_alive(int(t["harness.pid"]))
        ):
            c.set_terminated(r.info.run_id, "KILLED")
            c.set_tag(r.info.run_id, "error", f"its process (pid {t['harness.pid']}) ended without ending the run")
            n += 1
    return n


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
        schema.DEVICE: "GPU" if gpus else "CPU",
        schema.DEVICE_NAME: ", ".join(names) if names else _cpu_model(),
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


def model_tags(recipe, mcfg) -> dict[str, str]:
    """The tags that say which model of which study a run belongs to (search, trial, final, baseline, train)."""
    return {
        schema.STUDY: recipe.study,
        schema.TASK: mcfg.task,
        schema.BACKBONE: mcfg.backbone,
        schema.MODEL_KEY: mcfg.key,
    }


def model_params(prep, head_cfg, tcfg) -> dict[str, str]:
    """The parameters of a model run: data, task, model, head and training settings as they ran."""
    r, m = prep.recipe, prep.mcfg
    return flatten(
        {
            "data": r.data.model_dump(mode="json"),
            "task": {"name": m.task, **r.tasks[m.task].model_dump(mode="json")},
            "model": {
                **m.model_dump(mode="json", exclude={"head", "training"}),
                "image_size": prep.image_size,
                "colour": prep.colour,
            },
            "head": head_cfg.model_dump(mode="json"),
            "training": tcfg.model_dump(mode="json"),
        }
    )


def log_context(prep) -> None:
    """Resolved recipe (artifact), data summary and duplicates, device and weights tags, feature-cache info."""
    t = prep.task
    mlflow.set_tags(
        {
            **device_tags(),
            **prep.weights.tags(),
            **model_tags(prep.recipe, prep.mcfg),
            "test_source": t.test_source,
            schema.FEATURE_CACHE: prep.info["feature_cache"],
        }
    )
    mlflow.log_text(yaml.safe_dump(prep.recipe.resolved(), sort_keys=False), "recipe.yaml")
    summary = {
        "classes": t.classes,
        "counts": t.counts(),
        "test_source": t.test_source,
        "train_root": str(t.train_root),
        "skipped": t.skipped,
        "duplicates": t.duplicates,
        "modes": {c: dict(Counter(m for m, y in zip(t.modes, t.y) if y == k)) for k, c in enumerate(t.classes)},
    }
    mlflow.log_text(json.dumps(summary, indent=1, default=str), "data.json")
    mlflow.log_metrics(
        {
            "data_seconds": prep.info["data_seconds"],
            "extract_seconds": prep.info["extract_seconds"],
            # images this run's preparation pushed through the backbone (0: all read from the store)
            "extracted_images": prep.info["extracted"],
            "images": len(t.y),
            # the views' share of the same (training.views): seconds, and view-images extracted
            **{k: prep.info[k] for k in ("views_seconds", "views_extracted") if k in prep.info},
        }
    )


def log_fit(result, offset: int = 0, run_id: str | None = None) -> None:
    """Every epoch's metrics of a fit (history, epoch seconds, images/s) in batched writes, with their epoch as the
    step, plus the fit's totals: one write instead of one per epoch, the same metric histories in MLflow."""
    run_id = run_id or mlflow.active_run().info.run_id
    now = int(time.time() * 1000)
    rows = [Metric(k, v, now, step) for k, v, step in result.metrics(offset)]
    rows += [
        Metric(k, v, now, 0)
        for k, v in {
            "train_seconds": result.seconds,
            "seconds_per_epoch": sum(result.epoch_seconds) / max(1, result.epochs),
            "images_per_s": result.images_per_s,
        }.items()
    ]
    c = client()
    for i in range(0, len(rows), 1000):  # the tracking API's limit per batch
        c.log_batch(run_id, metrics=rows[i : i + 1000])


class EpochProgress:
    """A transient Rich progress bar over epochs, fed by `fit_model(on_epoch=...)`."""

    def __init__(self, epochs: int, label: str):
        from rich.progress import Progress

        self.label = label
        self._progress = Progress(transient=True)
        self._task = self._progress.add_task(f"Training {label}", total=epochs)

    def __enter__(self):
        self._progress.start()
        return self

    def __exit__(self, *exc):
        self._progress.stop()

    def __call__(self, epoch: int, logs: dict) -> None:
        val = logs.get("val_loss")
        self._progress.update(
            self._task,
            advance=1,
            description=f"Training {self.label}" + (f" (val_loss {val:.3f})" if val is not None else ""),
        )


def log_datasets(prep) -> None:
    """The task's train / validation / test image sets as MLflow dataset inputs of the active run (file, content
    hash, label, patient group; MLflow digests each table), so the UI shows what the model was fitted and tested on."""
    import warnings

    import pandas as pd

    t = prep.task
    names = {"train": "train", "val": "validation", "test": "test"}
    for split, idx in t.splits.items():
        table = pd.DataFrame(
            {
                "file": [str(t.files[i]) for i in idx],
                "sha1": [t.sha1s[i] for i in idx],
                "label": [t.classes[t.y[i]] for i in idx],
                "group": [str(t.groups[i]) for i in idx],
            }
        )
        from_folder = split == "test" and t.test_source.startswith("folder ")  # else carved from the train folder
        source = t.test_source.removeprefix("folder ").split(";")[0] if from_folder else str(t.train_root)
        with warnings.catch_warnings():  # a local path matches two equivalent source types; MLflow warns, then picks
            warnings.simplefilter("ignore", UserWarning)
            ds = mlflow.data.from_pandas(table, source=source, targets="label", name=f"{t.name}-{split}")
        mlflow.log_input(ds, context=names.get(split, split))
