"""The harness's training loop: K fold models stepped together train as K separate fits would, its optimizers
update exactly like Keras', restoring the best epoch restores it, and training augmentation moves the training
batches (one resampling per image) but not the validation images. (That a finished fit gives its memory back is
measured by bench/trial.py, not tested.)"""

import keras
import numpy as np
import pytest

from harness.training.fit import OPTIMIZERS, Fold, fit_models, optimizer_factory


def _data(n=40, d=12, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype("float32"), rng.integers(0, classes, n)


def _model(d=12, classes=3, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((d,))
    return keras.Model(inputs, keras.layers.Dense(classes, activation="softmax")(keras.layers.Dense(8)(inputs)))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizers_update_exactly_like_keras(name):
    import tensorflow as tf

    x, y = _data()
    ours, ref = _model(), _model()
    ref.set_weights(ours.get_weights())
    loss = keras.losses.SparseCategoricalCrossentropy()
    opt_ours, opt_ref = (
        OPTIMIZERS[name](learning_rate=0.01),
        getattr(keras.optimizers, type(OPTIMIZERS[name]()).__name__)(learning_rate=0.01),
    )
    opt_ours.build(ours.trainable_variables)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            value = loss(yb, ours(xb))
        opt_ours.apply_gradients(zip(tape.gradient(value, ours.trainable_variables), ours.trainable_variables))

    for i in range(3):
        step(x[i * 8 : i * 8 + 8], y[i * 8 : i * 8 + 8])
        with tf.GradientTape() as tape:
            value = loss(y[i * 8 : i * 8 + 8], ref(x[i * 8 : i * 8 + 8]))
        opt_ref.apply_gradients(zip(tape.gradient(value, ref.trainable_variables), ref.trainable_variables))
    for a, b in zip(ours.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_folds_stepped_together_train_as_separate_fits():
    x, y = _data(n=60)
    folds = [Fold(np.arange(0, 40), np.arange(40, 60)), Fold(np.arange(20, 60), np.arange(0, 20))]
    together = [_model(seed=1), _model(seed=2)]
    apart = [_model(seed=1), _model(seed=2)]
    joint = fit_models(together, x, y, folds, 3, 4, 8, optimizer_factory("adam", 0.01), seed=5, monitor="val_loss")
    alone = [
        fit_models([m], x, y, [f], 3, 4, 8, optimizer_factory("adam", 0.01), seed=5 + k, monitor="val_loss")[0]
        for k, (m, f) in enumerate(zip(apart, folds))
    ]
    for t, a in zip(together, apart):
        for wt, wa in zip(t.get_weights(), a.get_weights()):
            np.testing.assert_allclose(wt, wa, rtol=1e-5, atol=1e-6)
    for j, a in zip(joint, alone):
        np.testing.assert_allclose(j.history["val_loss"], a.history["val_loss"], rtol=1e-5)
        assert j.best_epoch == a.best_epoch


def test_restore_best_keeps_the_best_validation_epoch():
    x, y = _data(n=60)
    model = _model()
    (r,) = fit_models(
        [model],
        x,
        y,
        [Fold(np.arange(40), np.arange(40, 60))],
        3,
        6,
        8,
        optimizer_factory("adam", 0.05),
        seed=0,
        monitor="val_loss",
        restore_best=True,
    )
    best = int(np.argmin(r.history["val_loss"]))
    assert r.best_epoch == best
    from harness.training.fit import make_loss

    p = model(x[40:60])
    assert float(make_loss(3)(y[40:60], p)) == pytest.approx(r.history["val_loss"][best], rel=1e-5)


def test_a_memory_mapped_input_trains_exactly_as_one_in_memory(tmp_path):
    """Large inputs are read batch by batch from disk; the result is the same fit."""
    x, y = _data(n=60)
    path = tmp_path / "x.npy"
    np.save(path, x)
    folds = [Fold(np.arange(0, 40), np.arange(40, 60))]
    in_memory, streamed = _model(seed=3), _model(seed=3)
    a = fit_models([in_memory], x, y, folds, 3, 3, 8, optimizer_factory("adam", 0.01), seed=1, monitor="val_loss")
    b = fit_models(
        [streamed],
        np.load(path, mmap_mode="r"),
        y,
        folds,
        3,
        3,
        8,
        optimizer_factory("adam", 0.01),
        seed=1,
        monitor="val_loss",
    )
    np.testing.assert_allclose(a[0].history["val_loss"], b[0].history["val_loss"], rtol=1e-5)
    for wa, wb in zip(in_memory.get_weights(), streamed.get_weights()):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)


def _images(n=24, size=16, seed=0):
    """Raw 0-255 images with structure (a bright square at a random place) and labels of 3 classes."""
    rng = np.random.default_rng(seed)
    x = np.full((n, size, size, 3), 40.0, np.float32)
    for i, (r, c) in enumerate(rng.integers(2, size - 8, (n, 2))):
        x[i, r : r + 6, c : c + 6] = 220.0
    return x, rng.integers(0, 3, n)


def _image_model(size=16, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(x)))


def _frozen_fit(x, y, augment, streamed_from=None):
    """One epoch with a learning rate of 0 on train = validation = every image: the weights never move, so the
    training loss is the loss on what the training steps saw and val_loss the loss on the images themselves."""
    model = _image_model()
    (r,) = fit_models(
        [model],
        x if streamed_from is None else np.load(streamed_from, mmap_mode="r"),
        y,
        [Fold(np.arange(len(y)), np.arange(len(y)))],
        3,
        1,
        8,
        optimizer_factory("sgd", 0.0),
        seed=4,
        augment=augment,
    )
    return r.history


def test_augmentation_moves_the_training_batches_and_never_the_validation_images():
    x, y = _images()
    plain, moved = _frozen_fit(x, y, 0.0), _frozen_fit(x, y, 1.0)
    assert plain["loss"][0] == pytest.approx(plain["val_loss"][0], rel=1e-5)  # no augmentation: the same images
    assert moved["loss"][0] != pytest.approx(moved["val_loss"][0], rel=1e-3)  # the steps saw moved images
    assert moved["val_loss"][0] == pytest.approx(plain["val_loss"][0], rel=1e-6)  # validation saw the originals


def test_training_augmentation_is_one_resampling_of_each_image_drawn_from_the_seeded_stream(tmp_path):
    """The in-memory and the memory-mapped (batch by batch) paths move every image the same way, and the training
    loss is the loss on `random_transform` of each image by its draw: one resampling, not a chain of layers."""
    from harness.models.heads import random_transform, transform_params
    from harness.training.fit import make_loss

    x, y = _images()
    np.save(tmp_path / "x.npy", x)
    in_memory, streamed = _frozen_fit(x, y, 1.0), _frozen_fit(x, y, 1.0, streamed_from=tmp_path / "x.npy")
    assert streamed["loss"][0] == pytest.approx(in_memory["loss"][0], rel=1e-5)
    # The stream: the epoch's order from default_rng(seed), the draws from default_rng([seed, 1]), in that order.
    order = np.random.default_rng(4).permutation(len(y))
    params = transform_params(np.random.default_rng([4, 1]).uniform(-1, 1, (len(y), 5)), 1.0)
    model = _image_model()
    expected = float(make_loss(3)(y[order], model(np.asarray(random_transform(x[order], params)))))
    assert in_memory["loss"][0] == pytest.approx(expected, rel=1e-4)
