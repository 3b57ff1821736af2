"""Head factory (Flatten or global average pooling, dense layers with dropout, sigmoid/softmax), assembly, and the
image transforms the harness augments with (training batches, TTA copies, fixed and random views).

An `avg` head is built on pooled vectors (the harness trains it on cached pooled features) and `assemble` puts the
global average pooling between backbone and head; a `flatten` head takes the backbone's maps itself.

Dropout follows every hidden layer except the last, exactly as in the seed study's model summaries, so its Task 1
head (`units: [256, 256, 64]`, flatten) has the seed's 6,505,089 trainable parameters on VGG19 at 224 px.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from harness.models.layers import preprocessing


def build_head(
    feature_shape: tuple, n_classes: int, units: list[int], dropout: float, pooling: str = "flatten", name: str = "head"
) -> keras.Model:
    inputs = keras.Input(shape=feature_shape, name=f"{name}_features")  # unique inputs: heads can be ensembled
    if len(feature_shape) == 1:
        x = inputs
    elif pooling == "flatten":
        x = keras.layers.Flatten(name="flatten")(inputs)
    else:
        x = keras.layers.GlobalAveragePooling2D(name="pool")(inputs)
    for i, u in enumerate(units):
        x = keras.layers.Dense(u, activation="relu", name=f"dense_{i}")(x)
        if i < len(units) - 1 and dropout > 0:
            x = keras.layers.Dropout(dropout, name=f"dropout_{i}")(x)
    if n_classes == 2:
        out = keras.layers.Dense(1, activation="sigmoid", name="output")(x)
    else:
        out = keras.layers.Dense(n_classes, activation="softmax", name="output")(x)
    return keras.Model(inputs, out, name=name)


def transform_params(u: np.ndarray, strength: float) -> np.ndarray:
    """(N, 5) float32 transforms of strength s in (0, 1] from (N, 5) uniform draws in [-1, 1]: rotation up to 10s
    degrees (radians), zoom factor up to 10s %, shift x and y up to 5s % of the side, contrast factor up to 20s %.
    Never flips: left and right are not interchangeable on a chest X-ray. Training augmentation, TTA copies and
    random views all draw from these ranges."""
    s, u = strength, np.asarray(u, np.float64)
    return np.stack(
        [
            np.deg2rad(10 * s * u[:, 0]),
            1 + 0.1 * s * u[:, 1],
            0.05 * s * u[:, 2],
            0.05 * s * u[:, 3],
            1 + 0.2 * s * u[:, 4],
        ],
        axis=1,
    ).astype(np.float32)


def random_transform(images, params):
    """Raw 0-255 images (N, H, W, C) moved by their `transform_params` in ONE bilinear resampling (rotation and zoom
    about the centre, then the shift; borders reflected, as Keras' random layers), contrast scaled about each
    image's channel means, clipped to 0-255 (before the preprocessing). One resampling, not Keras' chain of
    RandomRotation, RandomZoom and RandomTranslation: each resampling blurs, and Lite0's pooled features feel it (a
    half-pixel shift alone: cosine 0.95 to the original's; the three kinds at their strength-0.5 extremes composed
    into one: 0.91, chained: 0.80; 32 challenge images). Keras ops: runs eagerly and inside a compiled step."""
    ops = keras.ops
    x = ops.cast(images, "float32")
    h, w = x.shape[1], x.shape[2]
    angle, zoom, tx, ty, contrast = (params[:, i] for i in range(5))
    cos, sin = ops.cos(angle) / zoom, ops.sin(angle) / zoom
    # An output pixel p reads the input at c + R(-angle) (p - c - t) / zoom: rotation and zoom about the centre c.
    cx, cy = (w - 1) / 2, (h - 1) / 2
    ox, oy = cx + tx * w, cy + ty * h
    zeros = ops.zeros_like(angle)
    transform = ops.stack(
        [cos, sin, cx - cos * ox - sin * oy, -sin, cos, cy + sin * ox - cos * oy, zeros, zeros], axis=1
    )
    x = ops.image.affine_transform(x, transform, interpolation="bilinear", fill_mode="reflect")
    mean = ops.mean(x, axis=(1, 2), keepdims=True)
    return ops.clip((x - mean) * contrast[:, None, None, None] + mean, 0.0, 255.0)


def fixed_views(copies: int, strength: float) -> list[tuple[str, keras.layers.Layer]]:
    """`copies` (name, layer) deterministic transforms of the kinds `transform_params` draws from, the same
    for every image: rotation by +/-10s degrees, zoom in and out by 10s %, a shift by +/-5s % both ways; copies past
    six repeat them twice, three times... as far. Built-in random layers with a one-point range: call them with
    training=True, directly (an enclosing model called in inference mode would switch them off). The name says the
    transform exactly, so it can key a cache."""
    kinds = [
        ("rotation{:+.4g}deg", lambda v: keras.layers.RandomRotation((v / 360,) * 2), 10),
        ("rotation{:+.4g}deg", lambda v: keras.layers.RandomRotation((v / 360,) * 2), -10),
        ("zoom{:+.4g}pct", lambda v: keras.layers.RandomZoom((v / 100,) * 2), -10),  # negative: zoom in
        ("zoom{:+.4g}pct", lambda v: keras.layers.RandomZoom((v / 100,) * 2), 10),
        ("shift{:+.4g}pct", lambda v: keras.layers.RandomTranslation((v / 100,) * 2, (v / 100,) * 2), 5),
        ("shift{:+.4g}pct", lambda v: keras.layers.RandomTranslation((v / 100,) * 2, (v / 100,) * 2), -5),
    ]
    views = []
    for k in range(copies):
        name, make, unit = kinds[k % len(kinds)]
        value = unit * strength * (1 + k // len(kinds))
        views.append((name.format(value), make(value)))
    return views


@dataclass(frozen=True)
class RandomView:
    """View k of `random_views`: every image moved by a transform of its own, drawn from its content hash and k, so
    an image's view is the same whatever batch it is extracted in, and the entry can be cached under its hash."""

    k: int
    strength: float
    per_image = True  # the feature store passes each image's `params` beside the batch

    @property
    def name(self) -> str:
        return f"random{self.k}-s{self.strength:g}-v1"  # v1: the draw below; a new draw needs a new name

    def params(self, sha1s) -> np.ndarray:
        """(N, 5) `transform_params` of the images with these hashes: each drawn from the hash and k alone."""
        u = [np.random.default_rng([int(sha1[:15], 16), self.k]).uniform(-1, 1, 5) for sha1 in sha1s]
        return transform_params(np.reshape(u, (len(sha1s), 5)), self.strength)

    def __call__(self, images, params):
        return random_transform(images, params)


def random_views(copies: int, strength: float) -> list[tuple[str, RandomView]]:
    """`copies` (name, view) views in which every image has transforms of its own, drawn on all of
    `transform_params`' kinds at once (rotation, zoom, shift, contrast), where `fixed_views` moves every image
    the same way, one kind at a time."""
    return [(v.name, v) for v in (RandomView(k, strength) for k in range(copies))]


def assemble(
    backbone: keras.Model,
    head: keras.Model,
    preprocess: str,
    colour: str,
    image_size: int,
    trainable_backbone: bool,
    name: str | None = None,
) -> keras.Model:
    """Raw 0-255 RGB images -> colour policy and preprocessing -> backbone -> head: one model logged and reloaded,
    built-in layers only. Training augmentation is not in it: the fit moves the training batches
    (`random_transform`), so the served model is the same with or without it."""
    backbone.trainable = trainable_backbone
    inputs = keras.Input(shape=(image_size, image_size, 3), name=f"{name}_image" if name else "image")
    x = preprocessing(preprocess, colour)(inputs)
    # training=False keeps BatchNorm in inference mode, frozen or fine-tuned (Keras transfer-learning guide):
    # on a few hundred images, updating BatchNorm statistics wrecks the pretrained features.
    x = backbone(x, training=False)
    if len(head.input.shape) == 2 and len(x.shape) == 4:
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, head(x), name=name or f"{backbone.name}_{head.name}")


def average(models: list[keras.Model], name: str) -> keras.Model:
    """One model whose output is the mean of the members' outputs (an ensemble); a single member is itself.
    Members need distinct names, and so do their inputs: Keras refuses two operations of one name."""
    if len(models) == 1:
        return models[0]
    inputs = keras.Input(shape=models[0].input.shape[1:], name=f"{name}_input")
    return keras.Model(inputs, keras.layers.Average(name="average")([m(inputs) for m in models]), name=name)


def penultimate(head: keras.Model) -> keras.Model:
    """Head sub-model whose output is the last hidden layer: the features the seed plotted with t-SNE."""
    return keras.Model(head.input, head.layers[-2].output)
