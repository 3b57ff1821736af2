"""Fit stage: the one training loop of the harness, for heads on cached features and for backbone + head on images,
for one model or for K models at once (the K folds of a cross-validated trial).

Why not `model.fit`: on cached features an average-pooled head's epoch is ~10 ms of arithmetic, and Keras' per-epoch
machinery (data adapter, callbacks, a separate validation pass) adds ~0.1 s to it, so a 40-epoch trial cost 5 s
instead of 1 s (bench/trial.py). Here the data are tensors in memory, an epoch is one compiled call (a loop over
compiled steps) plus one compiled validation pass per model, and the per-epoch metrics come back as histories that
the caller writes to MLflow in one batch.

K models whose folds have the same number of batches per epoch take their steps together: one compiled step runs
all K forward and backward passes and one optimizer applies all K updates (Adam and friends act per variable, so
this equals K separate optimizers), so the K heads of a cross-validated trial pay the per-step overhead once.

Large heads (a flatten head on 7x7x1280 maps has 16M weights) compile their step with XLA, which fuses the
optimizer update into one pass over the weights: 2.7x faster per epoch here, while for small heads the ~0.6 s
compile costs more than it saves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np

from harness.features.store import rows
from harness.recipe import minimised


def _per_variable(cls: type) -> type:
    """`cls` updating each variable with Keras' own `update_step`, without TensorFlow's distribution merge_call.

    Inside a tf.function, the default strategy's merge_call keeps every variable the optimizer touched alive after
    the function and the model are gone: a 16M-weight flatten head leaked its weights and Adam slots, ~190 MB per
    trial that never came back (the study of six models peaked at 9 GB; tensorflow/tensorflow#92094). A harness fit
    is never distributed, so the same update runs per variable, and memory stays flat."""
    from keras import ops

    class PerVariable(cls):
        # id(variable) -> factor on the learning rate (discriminative fine-tuning); a variable not in it: 1.
        lr_scales: dict[int, float] = {}

        def _backend_update_step(self, grads, trainable_variables, learning_rate):
            for grad, variable in zip(grads, trainable_variables):
                scale = self.lr_scales.get(id(variable), 1.0)
                self.update_step(grad, variable, learning_rate * scale if scale != 1.0 else learning_rate)

        def _apply_weight_decay(self, variables):
            if self.weight_decay is None:
                return
            for variable in variables:
                if self._use_weight_decay(variable):
                    lr = ops.cast(self.learning_rate, variable.dtype)
                    wd = ops.cast(self.weight_decay, variable.dtype)
                    variable.assign(variable - variable * wd * lr)

    PerVariable.__name__ = PerVariable.__qualname__ = cls.__name__
    return PerVariable


OPTIMIZERS = {
    name: _per_variable(cls)
    for name, cls in {
        "adam": keras.optimizers.Adam,
        "adamw": keras.optimizers.AdamW,
        "sgd": keras.optimizers.SGD,
        "rmsprop": keras.optimizers.RMSprop,
    }.items()
}
JIT_MIN_PARAMS = 1_000_000
STREAM_BYTES = 256 * 2**20  # inputs above this are read batch by batch instead of held as one tensor


def optimizer_factory(name: str, learning_rate) -> Callable[[], keras.optimizers.Optimizer]:
    """`training.optimizer` with Keras' defaults for everything but the learning rate (a number or a Keras
    schedule); a factory, because every group of models stepped together needs its own (its step counter drives
    Adam's bias correction and the schedule)."""
    return lambda: OPTIMIZERS[name](learning_rate=learning_rate)


class WarmupConstant(keras.optimizers.schedules.LearningRateSchedule):
    """The rate rises linearly from 0 to `rate` over `warmup_steps` steps, then stays."""

    def __init__(self, rate: float, warmup_steps: int):
        self.rate, self.warmup_steps = rate, max(1, warmup_steps)

    def __call__(self, step):
        ops = keras.ops
        return self.rate * ops.minimum(1.0, (ops.cast(step, "float32") + 1.0) / self.warmup_steps)

    def get_config(self):
        return {"rate": self.rate, "warmup_steps": self.warmup_steps}


def schedule(rate: float, kind: str, warmup_steps: int, total_steps: int):
    """A learning rate for `total_steps` steps: flat (`constant`, no warm-up: the number itself), linear warm-up
    from 0 then flat, or warm-up then a cosine to 0 at `total_steps` (Keras' CosineDecay with its warm-up)."""
    if kind == "cosine":
        warm = min(warmup_steps, total_steps - 1)
        return keras.optimizers.schedules.CosineDecay(
            0.0 if warm else rate, max(1, total_steps - warm), warmup_target=rate if warm else None, warmup_steps=warm
        )
    return WarmupConstant(rate, warmup_steps) if warmup_steps else rate


def make_loss(n_classes: int, label_smoothing: float = 0.0):
    """The cross-entropy of the head's output; with `label_smoothing` (training only) the targets move that far
    towards uniform. Sparse class indices in both cases (the smoothed categorical loss one-hot encodes them)."""
    if n_classes == 2:
        return keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing)
    if not label_smoothing:
        return keras.losses.SparseCategoricalCrossentropy()
    smoothed = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
    return lambda y, p: smoothed(keras.ops.one_hot(keras.ops.reshape(y, (-1,)), n_classes), p)


def targets(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Labels as the loss expects them: a column of floats for the sigmoid head, class indices otherwise."""
    return y.astype("float32").reshape(-1, 1) if n_classes == 2 else y.astype("int64")


def count_correct(binary: bool):
    """Right predictions in a batch: threshold 0.5 on a sigmoid column, argmax on softmax rows."""
    import tensorflow as tf

    def correct(yb, p):
        if binary:
            return tf.reduce_sum(tf.cast(tf.equal(tf.cast(p > 0.5, yb.dtype), yb), tf.float32))
        return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(p, axis=-1), yb), tf.float32))

    return correct


@dataclass
class Fold:
    """Which images (indices into the fit's x) one model trains on and which validate it."""

    train: np.ndarray
    val: np.ndarray | None = None


@dataclass
class FitOptions:
    """What a fine-tuning fit adds to the plain loop; the defaults change nothing.

    - `lr_scales`: id(variable) -> factor on the learning rate (discriminative rates);
    - `label_smoothing`: of the training loss (validation is always the plain loss);
    - `ema`: momentum of an exponential moving average of the trainable weights, updated every step; each epoch is
      validated (and its best kept) with the averaged weights, and the models end with them;
    - `patience`: stop after this many epochs without a better mean of `monitor` over the models;
    - `stop(epoch, mean_logs)`: asked after every epoch; True stops the fit as pruned;
    - `views`: x holds the images then `views` augmented copies of them (row v*N + i: view v of image i); each
      epoch every training image is read as one of its views, drawn afresh (validation reads the originals).
    """

    lr_scales: dict[int, float] | None = None
    label_smoothing: float = 0.0
    ema: float = 0.0
    patience: int | None = None
    stop: Callable[[int, dict], bool] | None = None
    views: int = 0


@dataclass
class FitResult:
    history: dict[str, list[float]]  # loss, accuracy (+ val_loss, val_accuracy) per epoch
    epoch_seconds: list[float]
    seconds: float  # the whole fit of this model's group, tracing and compiling included
    n_train: int
    monitor: str | None = None
    best_epoch: int | None = None  # index of the monitored best epoch (its weights are the model's when restored)
    jit: bool = False
    stopped: str | None = None  # "early" (patience ran out) or "pruned" (`FitOptions.stop` said so), else None

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
        return float(min(series) if minimised(metric) else max(series))

    def metrics(self, offset: int = 0) -> list[tuple[str, float, int]]:
        """(name, value, step) of every epoch, plus the epoch timings, for one batched MLflow write."""
        rows = [(k, float(v), offset + i) for k, series in self.history.items() for i, v in enumerate(series)]
        rows += [("epoch_seconds", s, offset + i) for i, s in enumerate(self.epoch_seconds)]
        rows += [
            ("epoch_images_per_s", self.n_train / s if s > 0 else 0.0, offset + i)
            for i, s in enumerate(self.epoch_seconds)
        ]
        return rows


def fit_models(
    models: list[keras.Model],
    x: np.ndarray,
    y: np.ndarray,
    folds: list[Fold],
    n_classes: int,
    epochs: int,
    batch_size: int,
    optimizer: Callable[[], keras.optimizers.Optimizer],
    seed: int,
    monitor: str | None = None,
    restore_best: bool = False,
    jit: bool | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
    augment: float = 0.0,
    options: FitOptions | None = None,
) -> list[FitResult]:
    """Train model k in place on the images folds[k].train of (x, y) for `epochs`, each epoch in a fresh order
    (seeded per model), validating on folds[k].val after every epoch.

    `monitor` (val_loss or val_accuracy) marks each model's best epoch; with `restore_best` the model ends with that
    epoch's weights. Dropout runs in training mode, BatchNorm inside a frozen or fine-tuned backbone stays in
    inference mode (`assemble` calls the backbone with training=False). `augment` > 0 (x are raw images): every
    training image of every epoch is moved by a transform of its own drawn at that strength (`transform_params`,
    seeded per model), in one resampling (`random_transform`); validation images are not. `options`: the
    fine-tuning additions (`FitOptions`).
    """
    import tensorflow as tf

    options = options or FitOptions()
    # Small data live on the device as tensors and batches are gathered inside the compiled epoch; a memory-mapped
    # or large x (tens of thousands of images) stays where it is and each batch is read from it for its step.
    stream = isinstance(x, np.memmap) or x.nbytes > STREAM_BYTES
    x_t = x if stream else tf.constant(x)
    y_t = targets(y, n_classes) if stream else tf.constant(targets(y, n_classes))
    groups: dict[int, list[int]] = {}
    for k, f in enumerate(folds):
        groups.setdefault(max(1, -(-len(f.train) // batch_size)), []).append(k)
    results: list[FitResult | None] = [None] * len(models)
    for steps, members in groups.items():
        loop = _GroupLoop(
            [models[k] for k in members],
            [folds[k] for k in members],
            n_classes=n_classes,
            batch_size=batch_size,
            steps=steps,
            augment=augment,
            options=options,
            n_images=len(x) // (options.views + 1),
        )
        group = loop.fit(
            x_t,
            y_t,
            [seed + k for k in members],
            epochs,
            optimizer(),
            monitor=monitor,
            restore_best=restore_best,
            jit=jit,
            on_epoch=on_epoch if len(groups) == 1 else None,
        )
        for k, r in zip(members, group):
            results[k] = r
    return results


class _GroupLoop:
    """The compiled training of K models whose folds have the same number of steps per epoch."""

    def __init__(self, models, folds, *, n_classes, batch_size, steps, augment, options: FitOptions, n_images):
        self.models, self.folds, self.n_classes = models, folds, n_classes
        self.batch_size, self.steps, self.augment = batch_size, steps, augment
        self.options, self.n_images = options, n_images
        self.variables = [v for m in models for v in m.trainable_variables]
        self.shadows = None  # the moving averages of `variables` (options.ema)

    def compile_step(self, optimizer, jit: bool):
        import tensorflow as tf

        from harness.models.heads import random_transform

        models, variables, augment, ema = self.models, self.variables, self.augment, self.options.ema
        loss_fn, correct = make_loss(self.n_classes, self.options.label_smoothing), count_correct(self.n_classes == 2)
        if ema:
            self.shadows = [tf.Variable(v.value, trainable=False) for v in variables]
        shadows = self.shadows

        @tf.function(jit_compile=jit, reduce_retracing=True)
        def step(batches):
            if augment:
                batches = [(random_transform(xb, ub), yb, ub) for xb, yb, ub in batches]
            with tf.GradientTape() as tape:
                outs = [(m(xb, training=True), yb) for m, (xb, yb, _) in zip(models, batches)]
                losses = [loss_fn(yb, p) for p, yb in outs]
                total = tf.add_n(losses)
            optimizer.apply_gradients(zip(tape.gradient(total, variables), variables))
            if shadows is not None:
                for s, v in zip(shadows, variables):
                    s.assign(ema * s + (1.0 - ema) * v)
            return tf.stack(losses), tf.stack([correct(yb, p) for p, yb in outs])

        return step

    def swap_average(self) -> list[np.ndarray] | None:
        """Put the moving averages in the variables' place; returns the raw weights to put back (None: no EMA)."""
        if self.shadows is None:
            return None
        raw = [v.numpy() for v in self.variables]
        for s, v in zip(self.shadows, self.variables):
            v.assign(s)
        return raw

    def unswap(self, raw) -> None:
        if raw is not None:
            for r, v in zip(raw, self.variables):
                v.assign(r)

    def draw(self, rngs, aug_rngs, view_rngs):
        """One epoch's order of every model's training images, each image's transform (zeros, unread, without
        augmentation: one signature) and, with cached views, which view of each image is read."""
        from harness.models.heads import transform_params

        perms = tuple(f.train[rng.permutation(len(f.train))] for f, rng in zip(self.folds, rngs))
        if self.options.views:
            perms = tuple(
                p + self.n_images * r.integers(1, self.options.views + 1, len(p)) for p, r in zip(perms, view_rngs)
            )
        draws = tuple(
            transform_params(r.uniform(-1, 1, (len(p), 5)), self.augment)
            if self.augment
            else np.zeros((len(p), 5), np.float32)
            for p, r in zip(perms, aug_rngs)
        )
        return perms, draws

    def fit(self, x_t, y_t, seeds, epochs, optimizer, *, monitor, restore_best, jit, on_epoch) -> list[FitResult]:
        """The epochs (fewer when early stopping or pruning ends them); the models end with their best epoch's
        weights under `restore_best`, else with their last (averaged, with EMA) weights."""
        t0 = time.perf_counter()
        models, folds, opts = self.models, self.folds, self.options
        if jit is None:
            jit = max(sum(int(np.prod(v.shape)) for v in m.trainable_variables) for m in models) >= JIT_MIN_PARAMS
        optimizer.build(self.variables)
        if opts.lr_scales:
            optimizer.lr_scales = opts.lr_scales
        step = self.compile_step(optimizer, jit)
        run_epoch = self.epoch_function(step, x_t, y_t)
        evaluators = [
            make_evaluator(m, x_t, y_t, f.val, self.n_classes) if f.val is not None else None
            for m, f in zip(models, folds)
        ]
        rngs = [np.random.default_rng(s) for s in seeds]
        # The augmentation's (and the views') draws come from generators of their own, so the epochs' orders are
        # the same with or without them.
        aug_rngs = [np.random.default_rng([s, 1]) for s in seeds]
        view_rngs = [np.random.default_rng([s, 2]) for s in seeds]
        histories = [{"loss": [], "accuracy": []} for _ in models]
        epoch_seconds: list[float] = []
        best = [(None, None, None)] * len(models)  # (epoch, value, weights) per model
        stopped, since_better, best_mean = None, 0, None
        for e in range(epochs):
            te = time.perf_counter()
            loss, acc = run_epoch(*self.draw(rngs, aug_rngs, view_rngs))
            raw = self.swap_average()
            logs = [
                {"loss": float(loss[k]), "accuracy": float(acc[k]), **(ev() if ev else {})}
                for k, ev in enumerate(evaluators)
            ]
            epoch_seconds.append(time.perf_counter() - te)
            for k, lg in enumerate(logs):
                for name, v in lg.items():
                    histories[k].setdefault(name, []).append(v)
                if monitor and monitor in lg:
                    b_epoch, b_value, b_weights = best[k]
                    v = lg[monitor]
                    if b_value is None or (v < b_value if minimised(monitor) else v > b_value):
                        # Strictly better, as Keras' EarlyStopping: ties keep the earlier epoch.
                        best[k] = (e, v, [w.numpy() for w in models[k].weights] if restore_best else None)
            if e < epochs - 1 or restore_best:
                self.unswap(raw)  # the last epoch's averaged weights stay: they are the model's
            mean = logs[0] if len(logs) == 1 else mean_logs(logs)
            if on_epoch:
                on_epoch(e, mean)
            if monitor and monitor in mean:
                better = best_mean is None or (
                    mean[monitor] < best_mean if minimised(monitor) else mean[monitor] > best_mean
                )
                best_mean, since_better = (mean[monitor], 0) if better else (best_mean, since_better + 1)
            if opts.stop is not None and e < epochs - 1 and opts.stop(e, mean):
                stopped = "pruned"
            elif opts.patience and since_better >= opts.patience and e < epochs - 1:
                stopped = "early"
            if stopped:
                if not restore_best and raw is not None:
                    self.swap_average()  # the models end with their averaged weights, as after the last epoch
                break
        seconds = time.perf_counter() - t0
        for m, (_, _, weights) in zip(models, best):
            if restore_best and weights is not None:
                m.set_weights(weights)
        return [
            FitResult(h, list(epoch_seconds), seconds, len(f.train), monitor, b[0], jit, stopped)
            for h, f, b in zip(histories, folds, best)
        ]

    def epoch_function(self, step, x_t, y_t):
        """`epoch(perms, draws) -> (mean losses, accuracies)`: one compiled call over tensors in memory, or a
        Python loop over batches read from a host array."""
        import tensorflow as tf

        models, steps, batch_size = self.models, self.steps, self.batch_size
        sizes = tf.constant([float(len(f.train)) for f in self.folds])

        # The data are arguments, not captured: a function that captures a tensor keeps it alive as long as
        # TensorFlow keeps the function's graph, and that measured ~100 MB per trial that never came back.
        @tf.function
        def epoch(x_t, y_t, perms, draws):
            total, right = tf.zeros(len(models)), tf.zeros(len(models))
            for s in tf.range(steps):
                idx = [p[s * batch_size : (s + 1) * batch_size] for p in perms]
                ub = [d[s * batch_size : (s + 1) * batch_size] for d in draws]
                losses, c = step(tuple((tf.gather(x_t, i), tf.gather(y_t, i), u) for i, u in zip(idx, ub)))
                total += losses * tf.cast(tf.stack([tf.shape(i)[0] for i in idx]), tf.float32)
                right += c
            return total / sizes, right / sizes

        def streamed_epoch(perms, draws):
            total, right = np.zeros(len(models)), np.zeros(len(models))
            for s in range(steps):
                sl = slice(s * batch_size, (s + 1) * batch_size)
                losses, c = step(
                    tuple(
                        (tf.constant(rows(x_t, p[sl])), tf.constant(y_t[p[sl]]), tf.constant(d[sl]))
                        for p, d in zip(perms, draws)
                    )
                )
                total += losses.numpy() * np.array([len(p[sl]) for p in perms])
                right += c.numpy()
            return total / sizes.numpy(), right / sizes.numpy()

        if isinstance(x_t, np.ndarray):
            return streamed_epoch

        def in_memory(perms, draws):
            args = tuple(tf.constant(p) for p in perms), tuple(tf.constant(d) for d in draws)
            return tuple(t.numpy() for t in epoch(x_t, y_t, *args))

        return in_memory


def mean_logs(logs: list[dict]) -> dict:
    return {k: float(np.mean([lg[k] for lg in logs])) for k in logs[0]}


def make_evaluator(model: keras.Model, x_t, y_t, idx: np.ndarray, n_classes: int, batch_size: int = 256):
    """A compiled validation pass over the images `idx` of (x_t, y_t) (tensors, or host arrays read batch by
    batch): mean loss and accuracy in inference mode, or None when there are none."""
    import tensorflow as tf

    if idx is None or not len(idx):
        return None
    loss_fn, correct = make_loss(n_classes), count_correct(n_classes == 2)
    chunks = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    host = isinstance(x_t, np.ndarray)

    @tf.function(reduce_retracing=True)
    def batch(xb, yb):
        p = model(xb, training=False)
        return loss_fn(yb, p) * tf.cast(tf.shape(xb)[0], tf.float32), correct(yb, p)

    def evaluate() -> dict:
        total = right = 0.0
        for i in chunks:
            if host:
                loss, c = batch(tf.constant(rows(x_t, i)), tf.constant(y_t[i]))
            else:
                loss, c = batch(tf.gather(x_t, i), tf.gather(y_t, i))
            total, right = total + float(loss), right + float(c)
        return {"val_loss": total / len(idx), "val_accuracy": right / len(idx)}

    return evaluate


def fit_on(
    prep,
    models: list[keras.Model],
    pooling: str,
    folds: list[Fold],
    epochs: int,
    batch_size: int,
    optimizer: Callable[[], keras.optimizers.Optimizer],
    seed: int,
    monitor: str | None = None,
    restore_best: bool = False,
    on_epoch=None,
    augment: float | None = None,
    options: FitOptions | None = None,
) -> list[FitResult]:
    """`fit_models` on a prepared model's images: its cached features (pooled for `avg`, with every view of
    each training image when the recipe asks for views) or the images themselves (no XLA there: compiling a whole
    backbone costs more than a few epochs on a CPU gain), moved by the augmentation of strength `augment` (default:
    the recipe's `training.augment`; cached features are never augmented: `prepare` bypasses the store then)."""
    if augment is None:
        augment = 0.0 if prep.on_features else prep.recipe.training_for(prep.mcfg).augment
    x, y = prep.source(pooling), prep.task.y
    if prep.views is not None and prep.on_features and pooling == "avg":
        # Every view of a training image is a training row of its own; validation stays on the originals.
        n, copies = len(y), len(prep.views) + 1
        x, y = prep.pooled_with_views, np.tile(y, copies)
        folds = [Fold(np.concatenate([f.train + v * n for v in range(copies)]), f.val) for f in folds]
    return fit_models(
        models,
        x,
        y,
        folds,
        prep.n_classes,
        epochs,
        batch_size,
        optimizer,
        seed,
        monitor=monitor,
        restore_best=restore_best,
        jit=None if prep.on_features else False,
        on_epoch=on_epoch,
        augment=augment,
        options=options,
    )


def evaluate_on(prep, model: keras.Model, pooling: str, idx: np.ndarray) -> dict:
    """val_loss and val_accuracy of a model on some of a prepared model's images, outside a fit."""
    ev = make_evaluator(
        model, prep.source(pooling), targets(prep.task.y, prep.n_classes), np.asarray(idx), prep.n_classes
    )
    return ev() if ev else {}


def predict(model: keras.Model, x: np.ndarray, batch_size: int = 256, idx: np.ndarray | None = None) -> np.ndarray:
    """Inference-mode outputs for x (or its rows `idx`, read batch by batch: x may be memory-mapped) through one
    compiled function per model (`model.predict` re-plans every call, and a new tf.function per call would retrace
    every time). The function lives on the model, so both go away together (a cache keyed by model would keep
    every model alive through the function's closure)."""
    import tensorflow as tf

    idx = np.arange(len(x)) if idx is None else np.asarray(idx)
    if not len(idx):
        return np.zeros((0,) + tuple(model.output.shape[1:]), np.float32)
    forward = getattr(model, "_harness_forward", None)
    if forward is None:
        forward = tf.function(lambda b: model(b, training=False), reduce_retracing=True)
        model._harness_forward = forward
    return np.concatenate(
        [forward(tf.constant(rows(x, idx[i : i + batch_size]))).numpy() for i in range(0, len(idx), batch_size)]
    )
