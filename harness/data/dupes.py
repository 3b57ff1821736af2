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


def find_duplicates(sha1s: list[str], hashes: np.ndarray, names: list[str], split_of: list[str]) -> list[dict]:
    """Pairs (i < j) that are exact or near duplicates, with their splits, sorted by distance.

    Linear in the number of images for real collections: the 256-bit hashes are cut into 16 bands of 16 bits, and
    two hashes at most NEAR_THRESHOLD (10) bits apart share at least 6 bands, so only images sharing a band are
    compared (pigeonhole), instead of every pair."""
    n = len(names)
    bits = hashes.reshape(n, -1).astype(bool) if n else np.zeros((0, 256), bool)
    bands = np.packbits(bits, axis=1).view(">u2") if n else np.zeros((0, 16), ">u2")
    candidates: set[tuple[int, int]] = set()
    for b in range(bands.shape[1]):
        order = np.argsort(bands[:, b], kind="stable")
        values = bands[order, b]
        starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
        for start, stop in zip(starts, np.r_[starts[1:], n]):
            members = order[start:stop]
            if len(members) > 1:
                candidates.update(
                    (int(min(i, j)), int(max(i, j))) for k, i in enumerate(members) for j in members[k + 1 :]
                )
    pairs = []
    for i, j in sorted(candidates):
        dist = int((bits[i] != bits[j]).sum())
        if dist <= NEAR_THRESHOLD:
            pairs.append(
                {
                    "a": names[i],
                    "b": names[j],
                    "kind": "exact" if sha1s[i] == sha1s[j] else "near",
                    "distance": dist,
                    "splits": f"{split_of[i]}/{split_of[j]}",
                    "cross_split": split_of[i] != split_of[j],
                }
            )
    return sorted(pairs, key=lambda p: (p["distance"], p["a"], p["b"]))
