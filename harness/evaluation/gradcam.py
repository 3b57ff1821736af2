"""Where a model looks: Grad-CAM on the harness's models, the share of it outside the lung field, and overlays.

The backbone is a nested sub-model, and in Keras 3 `Model(inputs, [inner_layer.output, model.output])` fails ("not
connected to inputs"). So the map is computed the way keras.io's Grad-CAM example computes it, from the parts: the
model's own preprocessing layer, then the backbone called as a whole (its output is the last convolutional map), then
the pooling and the head replayed layer by layer inside the gradient tape, down to the class score before its
softmax or sigmoid. Gradients are averaged over the map to weight its channels; ReLU; upsampled; scaled to [0, 1].
An ensemble's score is its members' mean score (on one shared backbone) or its members' maps averaged (fine-tuned
members, each with its own backbone).

The lung field is a fixed central box of the image, LUNG_BOX: 15-85% of the width, 10-85% of the height, where both
lungs of a PA chest X-ray lie; a model whose Grad-CAM mass lies mostly outside it looks at borders, text or markers.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

LUNG_BOX = (0.15, 0.10, 0.85, 0.85)  # (left, top, right, bottom) as fractions of the image
OUTSIDE_FLAG = 0.5  # a class whose mean share outside the box exceeds this is flagged in the report


@dataclass
class Parts:
    """A single model of raw images, taken apart for Grad-CAM."""

    preprocess: keras.layers.Layer
    backbone: keras.Model
    pool: keras.layers.Layer | None
    heads: list[keras.Model]  # one head, or the heads an ensemble averages


def parts_of(model: keras.Model) -> list[Parts]:
    """The Grad-CAM parts of a harness model: one per member (an ensemble of fine-tuned members has several)."""
    names = [layer.name for layer in model.layers]
    if "preprocess" not in names:  # an average of full models: each member is a full model
        return [p for layer in model.layers if isinstance(layer, keras.Model) for p in parts_of(layer)]
    pre = model.get_layer("preprocess")
    after = model.layers[names.index("preprocess") + 1 :]
    backbone = after[0]
    pool = next((layer for layer in after if isinstance(layer, keras.layers.GlobalAveragePooling2D)), None)
    head = after[-1]
    heads = [layer for layer in head.layers if isinstance(layer, keras.Model)] or [head]
    return [Parts(pre, backbone, pool, heads)]


def head_scores(head: keras.Model, x, n_classes: int):
    """The head replayed on features `x`, ending with the class scores before the output activation."""
    from keras import ops

    layers = [layer for layer in head.layers if not isinstance(layer, keras.layers.InputLayer)]
    for layer in layers[:-1]:
        x = layer(x, training=False)
    out = layers[-1]
    z = ops.matmul(x, out.kernel) + out.bias
    return ops.concatenate([-z, z], axis=-1) if n_classes == 2 and z.shape[-1] == 1 else z


def gradcam(model: keras.Model, images: np.ndarray, class_index: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, H, W) maps in [0, 1] for raw 0-255 images, each for its class `class_index[i]`."""
    fns = getattr(model, "_harness_gradcam", None)
    if fns is None:  # compiled once per model and kept on it (eager, the backbone's activations cost ~1 GB more)
        fns = model._harness_gradcam = [_compiled(p, n_classes) for p in parts_of(model)]
    maps = []
    for fn in fns:
        import tensorflow as tf

        cam = fn(tf.constant(images, tf.float32), tf.constant(np.asarray(class_index, dtype=np.int64)))
        cam = tf.image.resize(cam[..., None], images.shape[1:3], method="bilinear")[..., 0].numpy()
        peak = cam.reshape(len(cam), -1).max(axis=1)[:, None, None]
        maps.append(np.where(peak > 0, cam / np.where(peak > 0, peak, 1), 0.0))
    return np.mean(maps, axis=0)


def _compiled(p: Parts, n_classes: int):
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def cam(images, class_index):
        # The map needs the gradient with respect to the map only: the backbone runs outside the tape.
        conv = p.backbone(p.preprocess(images), training=False)
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(conv)
            feats = p.pool(conv) if p.pool is not None else conv
            scores = tf.reduce_mean(tf.stack([head_scores(h, feats, n_classes) for h in p.heads]), axis=0)
            chosen = tf.gather(scores, class_index, axis=1, batch_dims=1)
        weights = tf.reduce_mean(tape.gradient(chosen, conv), axis=(1, 2), keepdims=True)
        return tf.nn.relu(tf.reduce_sum(weights * conv, axis=-1))

    return cam


def outside_share(maps: np.ndarray) -> np.ndarray:
    """Per map, the share of its mass outside LUNG_BOX (0 when a map is empty)."""
    n, h, w = maps.shape
    left, top, right, bottom = LUNG_BOX
    inside = np.zeros((h, w), bool)
    inside[int(top * h) : int(round(bottom * h)), int(left * w) : int(round(right * w))] = True
    total = maps.reshape(n, -1).sum(axis=1)
    out = (maps * ~inside).reshape(n, -1).sum(axis=1)
    return np.where(total > 0, out / np.where(total > 0, total, 1), 0.0)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The image with its map laid over it in a colour scale (uint8 RGB), the lung box outlined."""
    import matplotlib

    rgb = image.astype(np.float32) / 255.0
    heat = matplotlib.colormaps["jet"](cam)[..., :3]
    out = (1 - alpha * cam[..., None]) * rgb + alpha * cam[..., None] * heat
    h, w = cam.shape
    left, top, right, bottom = LUNG_BOX
    y0, y1, x0, x1 = int(top * h), int(round(bottom * h)) - 1, int(left * w), int(round(right * w)) - 1
    out[[y0, y1], x0 : x1 + 1] = (1.0, 1.0, 1.0)
    out[y0 : y1 + 1, [x0, x1]] = (1.0, 1.0, 1.0)
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def pick_examples(y: np.ndarray, proba: np.ndarray) -> list[tuple[int, str]]:
    """Per class, the most confident correct and the most confident wrong prediction among images of that class:
    (index, "correct" | "wrong")."""
    pred, conf = proba.argmax(axis=1), proba.max(axis=1)
    picked = []
    for c in np.unique(y):
        for kind, mask in (("correct", (y == c) & (pred == c)), ("wrong", (y == c) & (pred != c))):
            idx = np.flatnonzero(mask)
            if len(idx):
                picked.append((int(idx[np.argmax(conf[idx])]), kind))
    return picked


def grid_figure(images, maps, titles: list[str], path, columns: int = 4, title: str = ""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.1 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, cam, t in zip(axes.ravel(), images, maps, titles):
        ax.imshow(overlay(image, cam))
        ax.set_title(t, fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
