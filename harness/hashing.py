"""Content hashes of files, shared by every stage that keys a cache or tags a run with what it read."""

from __future__ import annotations

import hashlib
from pathlib import Path

_HASHES: dict[tuple[str, float, int], str] = {}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_cached(path: Path) -> str:
    """sha256 of a file, computed once per (path, mtime, size) in this process: weights files are hashed per run."""
    st = path.stat()
    key = (str(path), st.st_mtime, st.st_size)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]
