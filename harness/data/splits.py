"""Stratified train/validation/test splits with a fixed seed, optionally grouped so a patient never straddles splits."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold


def groups_from_names(paths: list[Path], pattern: str | None) -> np.ndarray:
    """Group id per file: the first non-empty regex group (or the whole match) of the file name; a non-match is its
    own group. Alternatives with one group each let one pattern cover several naming schemes."""
    if not pattern:
        return np.array([str(p) for p in paths])
    rx = re.compile(pattern)
    out = []
    for p in paths:
        m = rx.search(p.name)
        gid = (next((g for g in m.groups() if g), m.group(0)) if m.groups() else m.group(0)) if m else p.name
        out.append(f"{p.parent.name}/{gid}")
    return np.array(out)


def carve(indices: np.ndarray, labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int):
    """Split `indices` into (rest, held) with about `fraction` held out, stratified by label, grouped by `groups`."""
    if fraction <= 0 or len(indices) == 0:
        return indices, indices[:0]
    n_splits = max(2, int(round(1.0 / fraction)))
    min_class = np.bincount(labels[indices]).min() if len(indices) else 0
    n_splits = min(n_splits, max(2, int(min_class)))
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    rest, held = next(sgkf.split(indices, labels[indices], groups[indices]))
    return indices[np.sort(rest)], indices[np.sort(held)]


def make_splits(
    labels: np.ndarray,
    groups: np.ndarray,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    test_indices: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """{'train', 'val', 'test'} index arrays. `test_indices` (an explicit test folder) skips carving a test split."""
    all_idx = np.arange(len(labels))
    if test_indices is not None:
        pool = np.setdiff1d(all_idx, test_indices)
        test = np.sort(test_indices)
    else:
        pool, test = carve(all_idx, labels, groups, test_fraction, seed)
    # Validation is a fraction of the whole, so test 0.2 + val 0.2 leaves 0.6 for training.
    val_of_pool = min(0.5, val_fraction / max(1e-9, 1.0 - (0 if test_indices is not None else test_fraction)))
    train, val = carve(pool, labels, groups, val_of_pool, seed + 1)
    return {"train": train, "val": val, "test": test}


def cv_folds(
    pool: np.ndarray, labels: np.ndarray, groups: np.ndarray, k: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """K (train, validation) folds of the images `pool` (indices), stratified by label and grouped by patient, so
    one patient's images are all in the same fold. K is capped by the smallest class's count in the pool."""
    k = min(k, int(np.bincount(labels[pool]).min()))
    if k < 2:
        raise ValueError("cross-validation needs at least two images of every class")
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(pool[np.sort(tr)], pool[np.sort(va)]) for tr, va in sgkf.split(pool, labels[pool], groups[pool])]
