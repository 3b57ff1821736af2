"""Duplicate report: exact copies (same bytes) and near-duplicates (difference hash) within and across splits."""

from __future__ import annotations

import numpy as np
from PIL import Image

NEAR_THRESHOLD = 10  # of 256 bits; the real data's closest distinct test/train pair is 19 bits apart


def dhash(array: np.ndarray, bits: int = 16) -> np.ndarray:
    """Difference hash of an (H, W, 3) uint8 image: bits*bits booleans, robust to resizing and recompression."""
    grey = Image.fromarray(array[:, :, 0]).resize((bits + 1, bits), Image.BILINEAR)
    a = np.asarray(grey, dtype=np.int16)
    return (a[:, 1:] > a[:, :-1]).ravel()


BANDS = 11  # hashes at most NEAR_THRESHOLD (10) bits apart agree on at least one of 11 bands (pigeonhole)


def find_duplicates(sha1s: list[str], hashes: np.ndarray, names: list[str], split_of: list[str]) -> list[dict]:
    """Pairs (i < j) that are exact or near duplicates, with their splits, sorted by distance.

    Close to linear for real collections: the 256 hash bits are dealt into 11 bands, the most varied bits spread over
    all bands (bits every image shares would put every image in one band's bucket), and only images that agree on a
    whole band are compared, bucket by bucket, with vectorised distances; two hashes within the threshold always
    agree on at least one band."""
    n = len(names)
    if n < 2:
        return []
    bits = hashes.reshape(n, -1).astype(bool)
    packed = np.packbits(bits, axis=1)
    order = np.argsort(np.abs(bits.mean(axis=0) - 0.5), kind="stable")  # most varied bits first
    found: dict[tuple[int, int], int] = {}
    for b in range(BANDS):
        keys = np.packbits(bits[:, order[b::BANDS]], axis=1)
        _, inverse = np.unique(keys, axis=0, return_inverse=True)
        inverse = inverse.ravel()
        for members in np.split(np.argsort(inverse, kind="stable"), np.flatnonzero(np.diff(np.sort(inverse))) + 1):
            for start in range(0, len(members) - 1, 1024):  # a large bucket in blocks: memory stays bounded
                rows = members[start : start + 1024]
                dist = np.bitwise_count(packed[rows][:, None, :] ^ packed[members][None, :, :]).sum(axis=2)
                for r, c in zip(*np.nonzero(dist <= NEAR_THRESHOLD)):
                    i, j = int(rows[r]), int(members[c])
                    if i < j:
                        found[(i, j)] = int(dist[r, c])
    pairs = [
        {
            "a": names[i],
            "b": names[j],
            "kind": "exact" if sha1s[i] == sha1s[j] else "near",
            "distance": d,
            "splits": f"{split_of[i]}/{split_of[j]}",
            "cross_split": split_of[i] != split_of[j],
        }
        for (i, j), d in found.items()
    ]
    return sorted(pairs, key=lambda p: (p["distance"], p["a"], p["b"]))
