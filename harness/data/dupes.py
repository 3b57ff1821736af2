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


def find_duplicates(sha1s: list[str], arrays: np.ndarray, names: list[str], split_of: list[str]) -> list[dict]:
    """Pairs (i < j) that are exact or near duplicates, with their splits, sorted by distance."""
    hashes = np.stack([dhash(a) for a in arrays]) if len(arrays) else np.zeros((0, 256), bool)
    pairs = []
    for i in range(len(names)):
        if len(names) - i - 1 <= 0:
            break
        dist = (hashes[i + 1 :] != hashes[i]).sum(axis=1)
        for k in np.nonzero(dist <= NEAR_THRESHOLD)[0]:
            j = i + 1 + int(k)
            exact = sha1s[i] == sha1s[j]
            pairs.append(
                {
                    "a": names[i],
                    "b": names[j],
                    "kind": "exact" if exact else "near",
                    "distance": int(dist[k]),
                    "splits": f"{split_of[i]}/{split_of[j]}",
                    "cross_split": split_of[i] != split_of[j],
                }
            )
    return sorted(pairs, key=lambda p: p["distance"])
