"""Preprocessing inside the model, so a logged model predicts from raw 0-255 RGB pixels with no outside code.

The colour policy and each backbone's own `preprocess_input` are per-pixel affine maps, so together they are one
built-in `Dense(3)` on the channel axis with fixed weights: `out = x @ A + b`, where A applies the colour policy (with
`grey`, PIL's own L weights, replicated to 3 channels, so a colour image sent to a served model is treated exactly as
training treated it) and then the backbone's scaling: `caffe` (VGG: RGB->BGR and ImageNet mean subtraction), `torch`
(DenseNet: scale to 0-1, ImageNet mean/std), `lite` (EfficientNet-Lite: (x-127)/128). A model made of built-in layers
loads with Keras' safe mode on, in a process that never imports the harness (`mlflow models serve`).

`Preprocess` is the layer models logged before this used; it stays registered so they still load.
"""

import keras
import numpy as np
from keras import ops

_MEANS = {"caffe": (103.939, 116.779, 123.68), "torch": (0.485, 0.456, 0.406)}
_STDS = {"torch": (0.229, 0.224, 0.225)}
# PIL's fixed-point ITU-R 601-2 luma weights for convert("L") (they sum to exactly 1).
PIL_GREY = np.array([19595, 38470, 7471]) / 65536.0


def affine(mode: str, colour: str) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) of `x @ A + b` for a backbone's preprocessing mode and a colour policy."""
    if mode not in ("caffe", "torch", "lite"):
        raise ValueError(f"unknown preprocessing mode {mode}")
    grey = np.tile(PIL_GREY[:, None], (1, 3)) if colour == "grey" else np.eye(3)
    if mode == "caffe":
        scale, bias = np.eye(3)[:, ::-1], -np.array(_MEANS["caffe"])
    elif mode == "torch":
        std = np.array(_STDS["torch"])
        scale, bias = np.diag(1 / (255 * std)), -np.array(_MEANS["torch"]) / std
    else:
        scale, bias = np.eye(3) / 128, np.full(3, -127 / 128)
    return grey @ scale, bias


def preprocessing(mode: str, colour: str, name: str = "preprocess") -> keras.layers.Dense:
    """The fixed, non-trainable Dense(3) of `affine`. float64, so a GPU's TF32 matmuls cannot round the pixels."""
    layer = keras.layers.Dense(3, trainable=False, dtype="float64", name=name)
    layer.build((None, 3))
    a, b = affine(mode, colour)
    layer.set_weights([a, b])
    return layer


@keras.saving.register_keras_serializable(package="harness")
class Preprocess(keras.layers.Layer):
    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("caffe", "torch", "lite"):
            raise ValueError(f"unknown preprocessing mode {mode}")
        self.mode = mode

    def call(self, x):
        x = ops.cast(x, "float32")
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.convert_to_tensor(_MEANS["caffe"])
        if self.mode == "torch":
            return (x / 255.0 - ops.convert_to_tensor(_MEANS["torch"])) / ops.convert_to_tensor(_STDS["torch"])
        return (x - 127.0) / 128.0

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
