"""Fit stage: the one training loop of the harness, for a head on cached features and for backbone + head on images.

Why not `model.fit`: on cached features an average-pooled head's epoch is ~10 ms of arithmetic, and Keras' per-epoch
machinery (data adapter, callbacks, a separate validation pass) adds ~0.1 s to it, so a 40-epoch trial cost 5 s
instead of 1 s (bench/trial.py). Here the data are tensors in memory, an epoch is one compiled call (a loop over
compiled steps) plus one compiled validation pass, and the per-epoch metrics come back as a history that the caller
writes to MLflow in one batch. Large heads (a flatten head on 7x7x1280 maps has 16M weights) compile their step with
XLA, which fuses the optimizer update into one pass over the weights: 2.7x faster per epoch here, while for small
heads the ~0.6 s compile costs more than it saves.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np

OPTIMIZERS = {
    "adam": keras.optimizers.Adam,
    "adamw": keras.optimizers.AdamW,
    "sgd": keras.optimizers.SGD,
    "rmsprop": keras.optimizers.RMSprop,
}
JIT_MIN_PARAMS = 1_000_000


def make_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    """`training.optimizer` with Keras' defaults for everything but the learning rate."""
    return OPTIMIZERS[name](learning_rate=learning_rate)


def make_loss(n_classes: int) -> keras.losses.Loss:
    return keras.losses.BinaryCrossentropy() if n_classes == 2 else keras.losses.SparseCategoricalCrossentropy()


def targets(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Labels as the loss expects them: a column of floats for the sigmoid head, class indices otherwise."""
    return y.astype("float32").reshape(-1, 1) if n_classes == 2 else y.astype("int64")


@dataclass
class FitResult:
    history: dict[str, list[float]]  # loss, accuracy (+ val_loss, val_accuracy) per epoch
    epoch_seconds: list[float]
    seconds: float  # the whole fit, tracing and compiling included
    n_train: int
    monitor: str | None = None
    best_epoch: int | None = None  # index of the monitored best epoch (its weights are the model's when restored)
    jit: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def epochs(self) -> int:
        return len(self.epoch_seconds)

    @property
    def images_per_s(self) -> float:
        return self.n_train * self.epochs / self.seconds if self.seconds > 0 else 0.0

    def best(self, metric: str) -> float:
        series = self.history.get(metric, [])
        if not series:
            return float("nan")
        return float(min(series) if metric.endswith("loss") else max(series))

    def metrics(self, offset: int = 0) -> list[tuple[str, float, int]]:
        """(name, value, step) of every epoch, plus the epoch timings, for one batched MLflow write."""
        rows = [(k, float(v), offset + i) for k, series in self.history.items() for i, v in enumerate(series)]
        rows += [("epoch_seconds", s, offset + i) for i, s in enumerate(self.epoch_seconds)]
        rows += [
            ("epoch_images_per_s", self.n_train / s if s > 0 else 0.0, offset + i)
            for i, s in enumerate(self.epoch_seconds)
        ]
        return rows


def fit_model(
    model: keras.Model,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray] | None,
    n_classes: int,
    epochs: int,
    batch_size: int,
    optimizer: keras.optimizers.Optimizer,
    seed: int,
    monitor: str | None = None,
    restore_best: bool = False,
    jit: bool | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> FitResult:
    """Train `model` in place on (x, y) for `epochs`, shuffling each epoch with a seeded permutation.

    `monitor` (val_loss or val_accuracy) marks the best epoch; with `restore_best` the model ends with that epoch's
    weights (the final refit). Dropout and augmentation layers run in training mode, BatchNorm inside a frozen or
    fine-tuned backbone stays in inference mode (`assemble` calls the backbone with training=False).
    """
    import tensorflow as tf

    t0 = time.perf_counter()
    x, y = train
    n = len(x)
    loss_fn = make_loss(n_classes)
    variables = model.trainable_variables
    if jit is None:
        jit = sum(int(np.prod(v.shape)) for v in variables) >= JIT_MIN_PARAMS
    optimizer.build(variables)
    x_t, y_t = tf.constant(x), tf.constant(targets(y, n_classes))
    steps = max(1, -(-n // batch_size))

    correct = count_correct(n_classes == 2)

    @tf.function(jit_compile=jit, reduce_retracing=True)
    def step(xb, yb):
        with tf.GradientTape() as tape:
            p = model(xb, training=True)
            loss = loss_fn(yb, p)
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss, correct(yb, p)

    @tf.function
    def epoch(perm):
        total, right = tf.constant(0.0), tf.constant(0.0)
        for s in tf.range(steps):
            idx = perm[s * batch_size : (s + 1) * batch_size]
            loss, c = step(tf.gather(x_t, idx), tf.gather(y_t, idx))
            total += loss * tf.cast(tf.shape(idx)[0], tf.float32)
            right += c
        return total / n, right / n

    evaluate = make_evaluator_for(model, val, n_classes) if val is not None else None
    rng = np.random.default_rng(seed)
    history: dict[str, list[float]] = {"loss": [], "accuracy": []}
    if evaluate:
        history.update(val_loss=[], val_accuracy=[])
    epoch_seconds: list[float] = []
    best_epoch, best_value, best_weights = None, None, None
    for e in range(epochs):
        te = time.perf_counter()
        loss, acc = epoch(tf.constant(rng.permutation(n)))
        logs = {"loss": float(loss), "accuracy": float(acc)}
        if evaluate:
            logs.update(evaluate())
        epoch_seconds.append(time.perf_counter() - te)
        for k, v in logs.items():
            history[k].append(v)
        if monitor and monitor in logs:
            value = logs[monitor]
            better = best_value is None or (value < best_value if monitor.endswith("loss") else value > best_value)
            if better:  # strictly better, as Keras' EarlyStopping: ties keep the earlier epoch
                best_epoch, best_value = e, value
                if restore_best:
                    best_weights = [w.numpy() for w in model.weights]
        if on_epoch:
            on_epoch(e, logs)
    if restore_best and best_weights is not None:
        model.set_weights(best_weights)
    return FitResult(history, epoch_seconds, time.perf_counter() - t0, n, monitor, best_epoch, jit)


def count_correct(binary: bool):
    """Right predictions in a batch: threshold 0.5 on a sigmoid column, argmax on softmax rows."""
    import tensorflow as tf

    def correct(yb, p):
        if binary:
            return tf.reduce_sum(tf.cast(tf.equal(tf.cast(p > 0.5, yb.dtype), yb), tf.float32))
        return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(p, axis=-1), yb), tf.float32))

    return correct


def make_evaluator_for(model: keras.Model, val: tuple[np.ndarray, np.ndarray], n_classes: int):
    """A validation pass (val_loss, val_accuracy) of a model outside a fit, or None when the split is empty."""
    if not len(val[0]):
        return None
    return make_evaluator(model, make_loss(n_classes), count_correct(n_classes == 2), val, n_classes)


def fit_on(
    prep,
    model: keras.Model,
    pooling: str,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    epochs: int,
    batch_size: int,
    optimizer: keras.optimizers.Optimizer,
    seed: int,
    monitor: str | None = None,
    restore_best: bool = False,
    on_epoch=None,
) -> FitResult:
    """`fit_model` on some images of a prepared model: its cached features (pooled for `avg`) or its images."""
    return fit_model(
        model,
        prep.take(train_idx, pooling),
        prep.take(val_idx, pooling),
        prep.n_classes,
        epochs,
        batch_size,
        optimizer,
        seed,
        monitor=monitor,
        restore_best=restore_best,
        on_epoch=on_epoch,
    )


def make_evaluator(
    model: keras.Model, loss_fn, correct, val: tuple[np.ndarray, np.ndarray], n_classes: int, batch_size: int = 256
):
    """A compiled validation pass: mean loss and accuracy over the whole split in inference mode."""
    import tensorflow as tf

    xv, yv = val
    batches = [
        (tf.constant(xv[i : i + batch_size]), tf.constant(targets(yv[i : i + batch_size], n_classes)))
        for i in range(0, len(xv), batch_size)
    ]

    @tf.function(reduce_retracing=True)
    def batch(xb, yb):
        p = model(xb, training=False)
        return loss_fn(yb, p) * tf.cast(tf.shape(xb)[0], tf.float32), correct(yb, p)

    def evaluate() -> dict:
        total = right = 0.0
        for xb, yb in batches:
            loss, c = batch(xb, yb)
            total, right = total + float(loss), right + float(c)
        return {"val_loss": total / len(xv), "val_accuracy": right / len(xv)}

    return evaluate


_FORWARD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def predict(model: keras.Model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Inference-mode outputs in batches through one compiled function per model (`model.predict` re-plans every
    call, and a new tf.function per call would retrace every time)."""
    import tensorflow as tf

    if not len(x):
        return np.zeros((0,) + tuple(model.output.shape[1:]), np.float32)
    if model not in _FORWARD:
        _FORWARD[model] = tf.function(lambda b: model(b, training=False), reduce_retracing=True)
    forward = _FORWARD[model]
    return np.concatenate([forward(tf.constant(x[i : i + batch_size])).numpy() for i in range(0, len(x), batch_size)])
