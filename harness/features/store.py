"""Feature store: a frozen backbone's outputs, computed once per image and kept on disk, so every trial and epoch
trains only the head (measured ~100x faster than running VGG19 each epoch) and a study never extracts an image twice.

Entries are per image, addressed by the image's content hash inside a shelf for (backbone, weights file hash, image
size, colour policy, preprocessing, store version): Task 1, whose images are a subset of Task 2's, extracts nothing
after Task 2, and ten new images in a folder extract ten. An entry (`harness.entries`) holds the average-pooled vector
(float32) beside the whole feature map (float16: half the disk, and a head casts its batches back to float32), so
average-pooled heads read a few KB an image and never the maps. Each part's CRC and length catch a corrupt or
truncated entry: it is extracted again, never used. Extraction streams: images are decoded ahead of use by a
small thread pool while the backbone runs on the previous batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.progress import Progress

from harness.data import TaskData
from harness.entries import read_entry, write_entry
from harness.models.backbones import SPECS, WeightsInfo
from harness.models.layers import preprocessing
from harness.paths import get_paths

log = logging.getLogger(__name__)
FEATURE_VERSION = "v4"  # v4: entry files (v3: per-image .npz; v2: the in-model affine preprocessing)


def shelf_key(backbone: str, weights: WeightsInfo, image_size: int, colour: str, view: str = "") -> str:
    """A shelf per backbone, weights, size, colour policy and preprocessing, and per view of the images
    (`training.views`; the originals' key is unchanged by the views' existence)."""
    parts = [FEATURE_VERSION, backbone, weights.id, str(image_size), colour, SPECS[backbone].preprocess]
    if view:
        parts.append(view)
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:20]


def entry_path(shelf: Path, sha1: str) -> Path:
    """An entry of two parts: the pooled vector (float32), then the feature map (float16)."""
    return shelf / sha1[:2] / f"{sha1}.entry"


def forward_fn(backbone_model, preprocess: str, colour: str, view=None):
    """`forward(images, sha1s=None)`: the backbone behind the model's own preprocessing layer, compiled once, on uint8
    image batches. A fixed view (`fixed_views`) transforms the preprocessed images first (geometric: it commutes
    with the per-pixel preprocessing); a random view (`random_views`) moves each raw image by the params its hash
    draws (its contrast step needs the 0-255 range), so it needs the batch's `sha1s`."""
    import tensorflow as tf

    pre = preprocessing(preprocess, colour)
    spec = tf.TensorSpec((None, *backbone_model.input_shape[1:]), tf.uint8)
    if getattr(view, "per_image", False):  # a random view moves each image by its own params, on raw pixels

        @tf.function(input_signature=[spec, tf.TensorSpec((None, 5), tf.float32)])
        def forward_each(batch, params):
            return backbone_model(pre(view(batch, params)), training=False)

        return lambda images, sha1s: forward_each(tf.constant(images), tf.constant(view.params(sha1s)))

    def inputs(batch):
        x = pre(batch)
        return x if view is None else view(x, training=True)  # in inference mode a view is the identity

    # One trace for every batch size: without a signature the short last batch traced the graph again (~0.8 s for
    # Lite0, a sixth of extracting 1,000 images here).
    @tf.function(input_signature=[spec])
    def forward(batch):
        return backbone_model(inputs(batch), training=False)

    return lambda images, sha1s=None: forward(tf.constant(images))


def extract(
    backbone_model,
    preprocess: str,
    colour: str,
    task: TaskData,
    idx=None,
    batch_size: int = 32,
    label: str = "Extracting",
    on_batch=None,
    view=None,
) -> np.ndarray | None:
    """Backbone outputs (feature maps) for images `idx` of a task (default all), streamed: decoding of the next
    batches overlaps the backbone's work on this one. With `on_batch(positions, maps)` nothing is kept and None is
    returned (the store writes as it goes, in a thread of its own so that writing one batch's entries overlaps the
    next batch's forward pass); otherwise the maps come back as one array."""
    from concurrent.futures import ThreadPoolExecutor

    idx = np.arange(len(task.y)) if idx is None else np.asarray(idx, dtype=int)
    forward = forward_fn(backbone_model, preprocess, colour, view)
    out, pending = [], []
    with Progress(transient=True) as progress, ThreadPoolExecutor(1) as writer:
        job = progress.add_task(label, total=len(idx))
        for pos, images in task.batches(idx, batch_size):
            maps = forward(images, [task.sha1s[i] for i in idx[pos]]).numpy()
            if on_batch is not None:
                pending.append(writer.submit(on_batch, pos, maps))
                if len(pending) > 2:  # at most two batches of maps wait for the disk: memory stays flat
                    pending.pop(0).result()
            else:
                out.append(maps)
            progress.advance(job, len(pos))
        for f in pending:
            f.result()  # a write that failed raises here, before the store is used
    if on_batch is not None:
        return None
    return np.concatenate(out) if out else np.zeros((0,) + tuple(backbone_model.output.shape[1:]), np.float32)


@dataclass
class Features:
    """A task's features from the store: pooled vectors in memory, maps read from disk only when asked for."""

    shelf: Path
    sha1s: list[str]
    pooled: np.ndarray  # (N, C) float32
    map_shape: tuple
    info: dict = field(default_factory=dict)
    reextract: Callable[[list[int]], None] | None = None  # extracts the entries of these images again
    _maps: np.ndarray | None = None

    @property
    def maps(self) -> np.ndarray:
        """(N, H, W, C) float16, memory-mapped: gathered once from the entries into one file of the task's own."""
        if self._maps is None:
            digest = hashlib.sha1("".join(self.sha1s).encode()).hexdigest()[:16]
            path = self.shelf / "tasks" / f"{digest}.npy"
            shape = (len(self.sha1s), *self.map_shape)
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                mm = np.lib.format.open_memmap(tmp, "w+", np.float16, shape)
                broken = [i for i, sha1 in enumerate(self.sha1s) if not _read_maps(self.shelf, sha1, mm, i)]
                if broken:  # a map whose bytes fail their CRC: extracted again, never used
                    log.warning("feature store: %d broken entries, extracting them again", len(broken))
                    self.reextract(broken)
                    assert all(_read_maps(self.shelf, self.sha1s[i], mm, i) for i in broken)
                mm.flush()
                del mm
                os.replace(tmp, path)
            self._maps = np.load(path, mmap_mode="r")
        return self._maps


def _read_pooled(shelf: Path, sha1: str, channels: int) -> np.ndarray | None:
    """An entry's pooled vector, or None when it is missing, truncated or corrupt (its part fails its length or
    CRC); the maps are not read, so avg heads never touch them."""
    parts = read_entry(entry_path(shelf, sha1), 0)
    if parts is None or len(parts[0]) != 4 * channels:
        return None
    return np.frombuffer(parts[0], np.float32)


def _read_maps(shelf: Path, sha1: str, into: np.ndarray, i: int) -> bool:
    parts = read_entry(entry_path(shelf, sha1), 1)
    if parts is None or len(parts[0]) != into[i].nbytes:
        return False
    into[i] = np.frombuffer(parts[0], np.float16).reshape(into.shape[1:])
    return True


@contextlib.contextmanager
def shelf_lock(shelf: Path):
    """An exclusive lock on a shelf (fcntl.flock on `.lock`): released when the holder ends, even killed."""
    import fcntl

    shelf.mkdir(parents=True, exist_ok=True)
    with open(shelf / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_batch(shelf: Path, sha1s: list[str], maps: np.ndarray) -> np.ndarray:
    """One entry per image of a batch of maps; returns the batch's pooled vectors. The pooling and the float16
    cast run once on the whole batch: per image they cost as much as the file itself."""
    pooled = maps.mean(axis=(1, 2)).astype(np.float32) if maps.ndim == 4 else maps.astype(np.float32)
    maps16 = maps.astype(np.float16)
    for sha1, vec, m in zip(sha1s, pooled, maps16):
        write_entry(entry_path(shelf, sha1), vec.tobytes(), m.tobytes())  # atomic: never half an entry
    return pooled


def features_for(
    task: TaskData,
    backbone_name: str,
    backbone_model,
    weights: WeightsInfo,
    image_size: int,
    colour: str,
    view: tuple[str, object] | None = None,
) -> tuple[Features, dict]:
    """Every image of the task through the frozen backbone (after the fixed `view` (name, layer) of the images, when
    given), from the store; the images it lacks (or holds broken) are extracted and added. Info: feature_cache hit |
    miss | partial, extracted (images), extract_seconds."""
    view_name, view_layer = view or ("", None)
    shelf = get_paths().feature_cache / shelf_key(backbone_name, weights, image_size, colour, view_name)
    map_shape = tuple(backbone_model.output.shape[1:])
    pooled = np.zeros((len(task.sha1s), map_shape[-1]), np.float32)
    missing = []
    seen: dict[str, np.ndarray] = {}
    for i, sha1 in enumerate(task.sha1s):
        vec = seen.get(sha1)
        if vec is None:
            vec = _read_pooled(shelf, sha1, map_shape[-1])
        if vec is None:
            missing.append(i)
        else:
            pooled[i] = seen.setdefault(sha1, vec)
    t0 = time.perf_counter()

    def reextract(images: list[int]) -> int:
        """Extract these images' entries (once per distinct image: exact duplicates share one) into the store."""
        where: dict[str, list[int]] = {}
        for i in images:
            where.setdefault(task.sha1s[i], []).append(i)
        todo = np.array(sorted(ix[0] for ix in where.values()))

        def store(pos, maps):
            sha1s = [task.sha1s[todo[p]] for p in pos]
            for sha1, vec in zip(sha1s, _write_batch(shelf, sha1s, maps)):
                pooled[where[sha1]] = vec

        extract(
            backbone_model,
            SPECS[backbone_name].preprocess,
            colour,
            task,
            todo,
            on_batch=store,
            label=f"Extracting {backbone_name} features{f' ({view_name})' if view_name else ''} "
            f"({len(todo)} of {len(task.sha1s)} images)",
            view=view_layer,
        )
        return len(todo)

    extracted = 0
    if missing:
        # One process extracts, the others wait and then read: workers of one study never extract an image twice.
        with shelf_lock(shelf):
            still = []
            for i in missing:  # what another process extracted while this one waited for the lock
                vec = _read_pooled(shelf, task.sha1s[i], map_shape[-1])
                if vec is None:
                    still.append(i)
                else:
                    pooled[i] = vec
            missing = still
            extracted = reextract(missing) if missing else 0
    if 0 < extracted < len(set(task.sha1s)):
        log.info("feature store: %d of %d images extracted, the rest read", extracted, len(set(task.sha1s)))
    state = "hit" if not missing else ("miss" if len(missing) == len(task.sha1s) else "partial")
    info = {"feature_cache": state, "extracted": extracted, "extract_seconds": time.perf_counter() - t0}
    return Features(shelf, list(task.sha1s), pooled, map_shape, info, reextract=reextract), info


def rows(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Rows of a host array (read from disk when memory-mapped); float16 feature maps come back as float32."""
    out = np.asarray(x[idx])
    return out.astype(np.float32) if out.dtype == np.float16 else out
