"""Decoding, validation and preprocessing of image files, with a per-image cache on disk.

Each file is decoded and resized once per (content, size, colour) and stored as a small entry file
(`harness.entries`), so later runs, trials and tasks sharing images (Task 1's files are a subset of Task 2's) skip
JPEG decoding of multi-megapixel originals.
Greyscale is the default because in the COVID data colour mode alone separates the classes (a source shortcut).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from harness.data.dupes import dhash
from harness.entries import read_entry, write_entry

CACHE_VERSION = "v4"  # bump when the decoding or the entry format changes, so stale entries are never reused


@dataclass
class Decoded:
    array: np.ndarray | None  # (size, size, 3) uint8, None when the file has a problem
    sha1: str
    mode: str  # the original colour mode (L, RGB, RGBA, P, I;16...): a proxy for the image's source
    width: int
    height: int
    problem: str | None = None
    format: str = "?"  # the file's format (JPEG, PNG...): with mode and size, the image's source signature
    dhash: np.ndarray | None = None  # 256-bit difference hash of the decoded image, for near-duplicate search


def to_grey_or_rgb(img: Image.Image, colour: str) -> Image.Image:
    """Any PIL mode to 8-bit L or RGB; 16-bit and float images are scaled by their own range, alpha over black."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        img = Image.fromarray(a.astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    if colour == "grey":
        return img.convert("L")
    return img.convert("RGB")


def preprocess(img: Image.Image, size: int, colour: str) -> np.ndarray:
    """PIL image -> (size, size, 3) uint8: greyscale replicated to 3 channels unless colour == 'rgb'."""
    img = to_grey_or_rgb(img, colour).resize((size, size), Image.BILINEAR, reducing_gap=3.0)
    a = np.asarray(img, dtype=np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return a


def cache_path(cache_dir: Path, sha1: str, size: int, colour: str) -> Path:
    """An entry of three parts: the original's metadata (JSON), the decoded pixels, the packed difference hash."""
    return cache_dir / CACHE_VERSION / f"{size}-{colour}" / sha1[:2] / f"{sha1}.entry"


def cached_array(cache_dir: Path, sha1: str, size: int, colour: str) -> np.ndarray | None:
    """The decoded image of these bytes from the cache (only its pixels part, and no re-hashing of a multi-megabyte
    original), or None when the entry is missing or broken."""
    parts = read_entry(cache_path(cache_dir, sha1, size, colour), 1)
    if parts is None or len(parts[0]) != size * size * 3:
        return None
    return np.frombuffer(parts[0], np.uint8).reshape(size, size, 3)


def decode(path: Path, size: int, colour: str, cache_dir: Path, min_side: int, max_pixels: int) -> Decoded:
    """Validate and preprocess one file; problems are returned (not raised) so all can be reported at once."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return Decoded(None, "", "?", 0, 0, f"{path}: unreadable ({e.strerror or e})")
    if not data:
        return Decoded(None, "", "?", 0, 0, f"{path}: empty file (0 bytes)")
    sha1 = hashlib.sha1(data).hexdigest()
    cached = cache_path(cache_dir, sha1, size, colour)
    parts = read_entry(cached)
    if parts is not None and len(parts) == 3 and len(parts[1]) == size * size * 3:
        meta = json.loads(parts[0])
        return Decoded(
            np.frombuffer(parts[1], np.uint8).reshape(size, size, 3),
            sha1,
            meta["mode"],
            meta["w"],
            meta["h"],
            format=meta["fmt"],
            dhash=np.unpackbits(np.frombuffer(parts[2], np.uint8)).astype(bool),
        )
    Image.MAX_IMAGE_PIXELS = max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                mode, (w, h), fmt = img.mode, img.size, img.format or path.suffix.lstrip(".").upper()
                if w * h > max_pixels:
                    return Decoded(None, sha1, mode, w, h, f"{path}: {w}x{h} exceeds the {max_pixels} pixel limit")
                if min(w, h) < min_side:
                    return Decoded(None, sha1, mode, w, h, f"{path}: too small ({w}x{h}, minimum side {min_side})")
                # draft() lets libjpeg decode at a reduced scale: large originals decode several times faster.
                img.draft("RGB" if colour == "rgb" else "L", (size * 2, size * 2))
                img.load()
                arr = preprocess(img, size, colour)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return Decoded(
            None, sha1, "?", 0, 0, f"{path}: exceeds the {max_pixels} pixel limit (decompression bomb guard)"
        )
    except Image.UnidentifiedImageError:
        return Decoded(None, sha1, "?", 0, 0, f"{path}: not a readable image")
    except (OSError, SyntaxError, ValueError) as e:
        return Decoded(None, sha1, "?", 0, 0, f"{path}: corrupt or truncated image ({e})")
    dh = dhash(arr)
    meta = json.dumps({"mode": mode, "w": w, "h": h, "fmt": fmt}).encode()
    write_entry(cached, meta, np.ascontiguousarray(arr).tobytes(), np.packbits(dh).tobytes())
    return Decoded(arr, sha1, mode, w, h, format=fmt, dhash=dh)
