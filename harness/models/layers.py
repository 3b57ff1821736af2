"""A serialisable preprocessing layer, so a logged model predicts from raw 0-255 pixels with no outside code.

Each backbone's own `preprocess_input` is reproduced exactly (a test compares them): `caffe` (VGG: RGB->BGR and ImageNet
mean subtraction), `torch` (DenseNet: scale to 0-1, ImageNet mean/std), `lite` (EfficientNet-Lite: (x-127)/128).
"""

import keras
from keras import ops

_MEANS = {"caffe": (103.939, 116.779, 123.68), "torch": (0.485, 0.456, 0.406)}
_STDS = {"torch": (0.229, 0.224, 0.225)}


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
