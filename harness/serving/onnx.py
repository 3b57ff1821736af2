"""The ONNX export of a harness model and what it costs to serve: converting a Keras model of raw 0-255 RGB images to
an `.onnx` file (tf2onnx), an ONNX Runtime session tuned for a shared CPU, the parity check against Keras, optional
dynamic INT8 quantization, and latency figures (Keras against ONNX Runtime) as flat metrics for `mlflow.log_metrics`.

Plain functions on Keras models and files; they know nothing of recipes, stores or runs (docs/onnx.md: the probe).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import onnx
import onnxruntime
import tensorflow as tf
import tf2onnx
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from harness.errors import HarnessError
from harness.tracking.schema import COST

PARITY_BOUND = 1e-4  # the largest absolute probability difference between Keras and ONNX Runtime accepted
INPUT_NAME = "image"
# ONNX Runtime's Python errors (InvalidProtobuf, NoSuchFile, Fail, ...) derive from Exception, not RuntimeError.
_ORT_ERRORS = (
    RuntimeError,
    *(e for e in vars(_ort_state).values() if isinstance(e, type) and issubclass(e, Exception)),
)


def export(model: keras.Model, size: int, path: Path, *, opset: int = 17) -> Path:
    """Write `model` (raw (N, size, size, 3) float32 images in, probabilities out) as an ONNX file at `path` with a
    dynamic batch dimension. Atomic: a reader sees the old file or the whole new one, never a half-written one."""
    path = Path(path)
    spec = [tf.TensorSpec((None, size, size, 3), tf.float32, name=INPUT_NAME)]
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
    onnx.checker.check_model(proto)
    _write_atomically(path, proto.SerializeToString())
    return path


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def session(path: Path, *, threads: int | None = None) -> onnxruntime.InferenceSession:
    """An ONNX Runtime CPU session on `path`; `threads` intra-op threads (None: ONNX Runtime's default).

    Idle worker threads do not spin: on this shared 2-core machine spinning made ONNX Runtime slower than Keras
    (docs/onnx.md). A missing or unreadable file is a HarnessError of one line naming it."""
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads is not None:
        options.intra_op_num_threads = threads
    if not Path(path).is_file():
        raise HarnessError(f"{path}: no ONNX model there")
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except _ORT_ERRORS as e:
        reason = " ".join(str(e).split())  # ONNX Runtime's message can span lines; the user gets one
        raise HarnessError(f"{path}: not a readable ONNX model ({reason})") from None


def run(sess: onnxruntime.InferenceSession, images: np.ndarray) -> np.ndarray:
    """The model's raw outputs (N, k) as float64 for raw 0-255 RGB images (N, S, S, 3)."""
    x = np.asarray(images, dtype="float32")
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x})
    return np.asarray(out, dtype="float64")


def keras_call(model: keras.Model, size: int) -> Callable[[np.ndarray], np.ndarray]:
    """Keras' fastest per-request call: the model traced once as a graph for any batch of (size, size, 3) images.

    Measured on the demo champion (Lite1, 96 px, 2 shared cores, 40 alternating calls): this call and
    `predict_on_batch` both took a median 18 ms at batch 1 and 101 ms at batch 32, an eager `model(x)` 197 and
    374 ms (it runs op by op). Either is fair to Keras against ONNX Runtime; this one fixes the signature, so a new
    batch size never retraces."""
    spec = tf.TensorSpec((None, size, size, 3), tf.float32)
    graph = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    return lambda images: graph(tf.constant(images, dtype=tf.float32)).numpy().astype("float64")


def parity(model: keras.Model, sess: onnxruntime.InferenceSession, images: np.ndarray) -> float:
    """The largest absolute difference between Keras' and ONNX Runtime's outputs on `images`."""
    x = np.asarray(images, dtype="float32")
    return float(np.max(np.abs(keras_call(model, x.shape[1])(x) - run(sess, x))))


def check_parity(diff: float, path: Path) -> None:
    """A HarnessError naming the file when its outputs differ from Keras' by more than PARITY_BOUND."""
    if not diff <= PARITY_BOUND:  # written so that a NaN difference fails too
        raise HarnessError(f"{path}: ONNX outputs differ from Keras' by {diff:.2g} (more than {PARITY_BOUND:g})")


def quantize_int8(src: Path, dst: Path) -> Path:
    """Dynamic INT8 quantization of `src`'s weights into `dst` (atomic). Optional: on the harness's EfficientNets it
    moved probabilities by up to 0.1 and ran slower than float32 (docs/onnx.md), so the caller decides."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        quantize_dynamic(Path(src), tmp, weight_type=QuantType.QInt8)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def _batch(images: np.ndarray, batch: int) -> np.ndarray:
    """The first `batch` images, cycling through them when there are fewer."""
    x = np.asarray(images, dtype="float32")
    return x[np.arange(batch) % len(x)]


def _call_seconds(fns: dict[str, Callable], x: np.ndarray, repeats: int, warmup: int) -> dict[str, np.ndarray]:
    """Per-call wall seconds of each function on `x`, the functions taking turns call by call, so that a burst of
    load from another job on this shared machine falls on all of them alike."""
    for _ in range(warmup):  # first calls trace, allocate and fill caches
        for fn in fns.values():
            fn(x)
    seconds = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(x)
            seconds[name].append(time.perf_counter() - t0)
    return {name: np.asarray(s) for name, s in seconds.items()}


def _summary(seconds: np.ndarray, batch: int) -> dict:
    ms = 1000 * seconds
    median = float(np.percentile(ms, 50))
    return {"median_ms": median, "p95_ms": float(np.percentile(ms, 95)), "per_image_ms": median / batch}


def latency(predict_fn: Callable, images: np.ndarray, *, batch: int, repeats: int, warmup: int = 2) -> dict:
    """Wall time of one call of `predict_fn` on `batch` images: `median_ms` and `p95_ms` per call (the whole batch),
    `per_image_ms` the median call divided by the batch."""
    (seconds,) = _call_seconds({"fn": predict_fn}, _batch(images, batch), repeats, warmup).values()
    return _summary(seconds, batch)


def random_images(size: int, n: int, *, seed: int = 0) -> np.ndarray:
    """`n` images of uniform random 0-255 values (float32), the same for a given seed."""
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def serving_cost(
    model: keras.Model,
    onnx_path: Path,
    size: int,
    *,
    keras_path: Path | None = None,
    int8_path: Path | None = None,
    repeats: int = 20,
    batches: tuple[int, ...] = (1, 32),
    threads: int | None = None,
) -> dict[str, float]:
    """What serving `model` costs, Keras against its ONNX export at `onnx_path` (and its INT8 version at `int8_path`
    when given), on random images from a fixed seed: parameters, file sizes, each export's parity with Keras and
    label agreement, and per batch size the median and p95 milliseconds per call, as flat metric keys for
    `mlflow.log_metrics` (`cost.onnx.b1.median_ms`). `cost.onnx_vs_keras_latency_ratio` is ONNX Runtime's batch-1
    median over Keras': below 1, the export serves faster."""
    sessions = {"onnx": session(onnx_path, threads=threads)}
    if int8_path is not None:
        sessions["int8"] = session(int8_path, threads=threads)
    fns = {"keras": keras_call(model, size), **{name: functools.partial(run, s) for name, s in sessions.items()}}
    files = {"keras": keras_path, "onnx": onnx_path, "int8": int8_path}
    out = {f"{COST}params": float(model.count_params())}
    out.update({f"{COST}{name}_file_mb": Path(p).stat().st_size / 2**20 for name, p in files.items() if p is not None})
    images = random_images(size, max(batches), seed=0)
    reference = fns["keras"](images)
    for name in sessions:
        p = fns[name](images)
        out[f"{COST}{name}.parity"] = float(np.max(np.abs(p - reference)))
        out[f"{COST}{name}.label_agreement"] = float(np.mean(labels(p) == labels(reference)))
    for b in batches:
        for name, seconds in _call_seconds(fns, _batch(images, b), repeats, warmup=2).items():
            out.update({f"{COST}{name}.b{b}.{k}": v for k, v in _summary(seconds, b).items()})
    out[f"{COST}onnx_vs_keras_latency_ratio"] = out[f"{COST}onnx.b1.median_ms"] / out[f"{COST}keras.b1.median_ms"]
    return out


def labels(outputs: np.ndarray) -> np.ndarray:
    """Predicted class indices: the larger output, or above 0.5 for a single sigmoid column."""
    return (outputs[:, 0] > 0.5).astype(int) if outputs.shape[1] == 1 else outputs.argmax(axis=1)
