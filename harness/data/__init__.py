"""Data stage of the pipeline: recipe task -> validated, decoded, split arrays (`prepare_task`), and `check_folder`.

Images of the train folder (and the explicit test folder, when the task names one that exists) are validated together;
every problem is collected before deciding, so a user sees all bad files at once.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.progress import track

from harness.data.dupes import find_duplicates
from harness.data.images import Decoded, cached_array, decode
from harness.data.scan import Item, class_folders, class_mismatch, scan
from harness.data.splits import groups_from_names, make_splits
from harness.data.synthetic import ensure_demo_data
from harness.errors import HarnessError
from harness.paths import get_paths
from harness.recipe import Recipe

IN_MEMORY_BYTES = 512 * 2**20  # a task's decoded images above this are memory-mapped, not held


@dataclass
class TaskData:
    name: str
    classes: list[str]
    y: np.ndarray  # (N,) int class index, classes sorted by folder name
    files: list[Path]
    sha1s: list[str]
    modes: list[str]  # original colour modes: a proxy for image source
    splits: dict[str, np.ndarray]
    groups: np.ndarray  # patient / figure id per image (data.group_pattern), kept together by every split and fold
    test_source: str
    train_root: Path
    skipped: list[str] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)  # original file format per image (JPEG, PNG...)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # original (width, height) per image
    image_size: int = 224  # the decoded images' side and colour policy (what `images` returns)
    colour: str = "grey"
    decode_limits: tuple[int, int] = (32, 60_000_000)  # (min_side, max_pixels) they were validated with

    def images(self, idx) -> np.ndarray:
        """(len(idx), S, S, 3) uint8 images, decoded as the task decoded them (read back from the decode cache, so
        no task holds all its images in memory). The cache is addressed by the content hash recorded when the task
        was prepared, so what comes back is always the image that was validated; only an entry gone missing sends
        the original file through decoding again, and then its bytes must still hash to the recorded value."""
        cache = get_paths().image_cache
        out = np.empty((len(idx), self.image_size, self.image_size, 3), np.uint8)
        for k, i in enumerate(np.asarray(idx, dtype=int)):
            a = cached_array(cache, self.sha1s[i], self.image_size, self.colour)
            if a is not None:
                out[k] = a
                continue
            d = decode(self.files[i], self.image_size, self.colour, cache, *self.decode_limits)
            if d.problem or d.sha1 != self.sha1s[i]:
                raise HarnessError(
                    f"{self.files[i]}: changed or unreadable since the task was prepared "
                    f"({d.problem or 'different contents'}); run again to prepare it anew"
                )
            out[k] = d.array
        return out

    def batches(self, idx, batch_size: int = 64, workers: int = 2):
        """(positions, images) batches of `idx` in order, decoded ahead of use by a small thread pool so decoding
        overlaps whatever the caller does with the previous batch (a backbone's forward pass)."""
        from concurrent.futures import ThreadPoolExecutor

        idx = np.asarray(idx, dtype=int)
        chunks = [np.arange(i, min(i + batch_size, len(idx))) for i in range(0, len(idx), batch_size)]
        with ThreadPoolExecutor(workers) as pool:
            ahead = [pool.submit(self.images, idx[c]) for c in chunks[:workers]]
            for k, c in enumerate(chunks):
                if k + workers < len(chunks):
                    ahead.append(pool.submit(self.images, idx[chunks[k + workers]]))
                yield c, ahead[k].result()
                ahead[k] = None  # let a consumed batch go

    @property
    def x(self) -> np.ndarray:
        """Every image of the task, for the fits that train on images (augmentation, fine-tuning, a trainable
        backbone): in memory up to IN_MEMORY_BYTES, else a memory-mapped file built once in the cache."""
        if getattr(self, "_x", None) is None:
            n, s = len(self.y), self.image_size
            if n * s * s * 3 <= IN_MEMORY_BYTES:
                self._x = self.images(np.arange(n))
            else:
                path = get_paths().cache / "tasks" / f"{self.content_key()}-{s}-{self.colour}.u8"
                if not path.is_file() or path.stat().st_size != n * s * s * 3:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(f".{os.getpid()}.tmp")
                    mm = np.lib.format.open_memmap(tmp, "w+", np.uint8, (n, s, s, 3))
                    for pos, batch in self.batches(np.arange(n)):
                        mm[pos] = batch
                    mm.flush()
                    del mm
                    os.replace(tmp, path)
                self._x = np.load(path, mmap_mode="r")
        return self._x

    def content_key(self) -> str:
        """Changes whenever any image's bytes, label or the class list change."""
        h = hashlib.sha1("|".join(self.classes).encode())
        for s, y in sorted(zip(self.sha1s, self.y.tolist())):
            h.update(f"{s}:{y};".encode())
        return h.hexdigest()[:16]

    def pool(self) -> np.ndarray:
        """Every labelled image that is not test: train + validation, what cross-validation folds are made of."""
        return np.sort(np.concatenate([self.splits["train"], self.splits["val"]]))

    def counts(self) -> dict[str, dict[str, int]]:
        return {
            s: {c: int((self.y[idx] == k).sum()) for k, c in enumerate(self.classes)} for s, idx in self.splits.items()
        }


def data_root(recipe: Recipe) -> Path:
    if recipe.data.synthetic is not None:
        s = recipe.data.synthetic
        return ensure_demo_data(get_paths().demo_data, s.per_class, s.size, s.seed)
    if recipe.data.root is not None:
        return recipe.data.root
    return recipe.source.parent if recipe.source else Path.cwd()


def _decode_all(items: list[Item], recipe: Recipe, size: int, colour: str, label: str) -> list[Decoded]:
    """Validate and decode every image (into the decode cache), keeping only what describes it: a task of tens of
    thousands of images never holds their pixels."""
    d, cache = recipe.data, get_paths().image_cache
    out = []
    for it in track(items, description=label, transient=True):
        dec = decode(it.path, size, colour, cache, d.min_side, d.max_pixels)
        dec.array = None
        out.append(dec)
    return out


def cap_per_class(items: list[Item], cap: int | None, seed: int) -> list[Item]:
    """At most `cap` images per class, drawn at random (seeded), in their original order."""
    if cap is None:
        return items
    rng = np.random.default_rng(seed)
    keep = set()
    for label in sorted({it.label for it in items}):
        idx = [i for i, it in enumerate(items) if it.label == label]
        keep.update(idx if len(idx) <= cap else rng.choice(idx, cap, replace=False).tolist())
    return [it for i, it in enumerate(items) if i in keep]


def prepare_task(recipe: Recipe, task_name: str, image_size: int | None = None, colour: str | None = None) -> TaskData:
    """The task's images decoded at `image_size` (default the recipe's, else 224 px) with a colour policy (default
    the recipe's), labelled and split."""
    size = image_size or recipe.data.image_size or 224
    colour = colour or recipe.data.colour
    task = recipe.tasks[task_name]
    root = data_root(recipe)
    train_root = task.train_dir if task.train_dir.is_absolute() else root / task.train_dir
    items, problems = scan(train_root, task.classes)
    items = cap_per_class(items, recipe.data.max_per_class, recipe.data.seed)
    classes = sorted(task.classes) if task.classes else (class_folders(train_root) if train_root.is_dir() else [])
    test_items: list[Item] = []
    test_source = f"carved from train (stratified, {recipe.data.test_fraction:.0%})"
    if task.test_dir is not None:
        test_root = task.test_dir if task.test_dir.is_absolute() else root / task.test_dir
        if test_root.is_dir():
            test_items, test_problems = scan(test_root, task.classes)
            test_items = cap_per_class(test_items, recipe.data.max_per_class, recipe.data.seed)
            problems += test_problems
            if task.classes is None:
                problems += class_mismatch(train_root, classes, test_root, class_folders(test_root))
            test_source = f"folder {test_root}"
        else:
            test_source += f"; test folder {test_root} not found"
    if any("folder not found" in p or "at least two class" in p or "empty class" in p for p in problems):
        raise HarnessError(f"task '{task_name}' in {recipe.source}: " + "; ".join(problems))
    all_items = items + test_items
    decoded = _decode_all(all_items, recipe, size, colour, f"Checking {len(all_items)} images of {task_name}")
    problems += [dec.problem for dec in decoded if dec.problem]
    if problems and recipe.data.on_bad_file == "fail":
        head = f"{len(problems)} data problem(s) in task '{task_name}' (data.on_bad_file: fail in {recipe.source}):"
        raise HarnessError("\n".join([head] + problems))
    keep = [i for i, dec in enumerate(decoded) if dec.problem is None]
    is_test = np.array([i >= len(items) for i in keep], dtype=bool)
    files = [all_items[i].path for i in keep]
    y = np.array([classes.index(all_items[i].label) for i in keep], dtype=np.int64)
    if len(np.unique(y[~is_test])) < 2:
        raise HarnessError(f"task '{task_name}': fewer than two classes with usable training images")
    groups = groups_from_names(files, recipe.data.group_pattern)
    d = recipe.data
    splits = make_splits(
        y, groups, d.val_fraction, d.test_fraction, d.seed, test_indices=np.nonzero(is_test)[0] if test_items else None
    )
    split_of = ["?"] * len(files)
    for s, idx in splits.items():
        for i in idx:
            split_of[i] = s
    sha1s = [decoded[i].sha1 for i in keep]
    hashes = np.stack([decoded[i].dhash for i in keep]) if keep else np.zeros((0, 256), bool)
    names = [f"{f.parent.name}/{f.name}" for f in files]
    return TaskData(
        name=task_name,
        classes=classes,
        y=y,
        files=files,
        sha1s=sha1s,
        modes=[decoded[i].mode for i in keep],
        formats=[decoded[i].format for i in keep],
        sizes=[(decoded[i].width, decoded[i].height) for i in keep],
        splits=splits,
        groups=groups,
        test_source=test_source,
        train_root=train_root,
        skipped=problems,
        duplicates=find_duplicates(sha1s, hashes, names, split_of),
        image_size=size,
        colour=colour,
        decode_limits=(d.min_side, d.max_pixels),
    )


def check_folder(folder: Path, min_side: int = 32, max_pixels: int = 60_000_000) -> dict:
    """Class counts, sizes, colour modes and problems of one class-folder tree (for `harness data check`)."""
    items, problems = scan(folder)
    cache = get_paths().image_cache
    per_class: dict[str, dict] = {}
    for it in track(items, description=f"Checking {len(items)} images", transient=True):
        dec = decode(it.path, 64, "grey", cache, min_side, max_pixels)
        c = per_class.setdefault(
            it.label, {"n": 0, "modes": Counter(), "min_w": 10**9, "max_w": 0, "min_h": 10**9, "max_h": 0, "bytes": 0}
        )
        if dec.problem:
            problems.append(dec.problem)
            continue
        c["n"] += 1
        c["modes"][dec.mode] += 1
        c["bytes"] += it.path.stat().st_size
        c["min_w"], c["max_w"] = min(c["min_w"], dec.width), max(c["max_w"], dec.width)
        c["min_h"], c["max_h"] = min(c["min_h"], dec.height), max(c["max_h"], dec.height)
    return {"folder": str(folder), "classes": per_class, "problems": problems}
