"""Cache entry files: a few byte parts in one file, each with its length and CRC32 in a small header, written
atomically. The decode cache and the feature store keep one entry per image, so an entry's cost is paid per image
on the extraction path: reading the one part asked for costs an open, two reads and a CRC (~0.03 ms), where an
`.npz` costs a zip directory parse per member (~0.2 ms), and writing costs one write and a rename.

A truncated entry, a flipped byte or a foreign file reads as None: the caller recomputes it, never uses it.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from pathlib import Path

MAGIC = b"HXE1"
_COUNT = struct.Struct("<4sI")
_PART = struct.Struct("<QI")  # length, CRC32


def write_entry(path: Path, *parts: bytes) -> None:
    """`parts` into `path` through a temporary file and a rename: a killed writer leaves the old entry or none,
    never half of one. The temporary name carries process and thread, so concurrent writers of one entry (workers of
    a study, the decode-ahead threads meeting a duplicate image) never share a file. The folder is made on first
    use."""
    head = _COUNT.pack(MAGIC, len(parts)) + b"".join(_PART.pack(len(p), zlib.crc32(p)) for p in parts)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        f = open(tmp, "wb")
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(tmp, "wb")
    with f:
        f.write(head)
        for p in parts:
            f.write(p)
    os.replace(tmp, path)


def read_entry(path: Path, *which: int) -> list[bytes] | None:
    """The parts numbered `which` (all when none are named), each checked against its length and CRC; None when
    the file is missing, truncated, corrupt or not an entry."""
    try:
        with open(path, "rb") as f:
            magic, n = _COUNT.unpack(f.read(_COUNT.size))
            if magic != MAGIC or n > 64:
                return None
            table = [_PART.unpack(f.read(_PART.size)) for _ in range(n)]
            starts = [0]
            for length, _ in table:
                starts.append(starts[-1] + length)
            base, out = f.tell(), []
            for k in which or range(n):
                length, crc = table[k]
                f.seek(base + starts[k])
                data = f.read(length)
                if len(data) != length or zlib.crc32(data) != crc:
                    return None
                out.append(data)
            return out
    except (OSError, struct.error, IndexError):
        return None
