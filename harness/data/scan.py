"""Finding images in the class-folder layout and the folder-level problems (empty/single class, class mismatch).

File-level problems (corrupt, truncated, too small, bombs) are found while decoding, in `images.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
JUNK = {"desktop.ini", "thumbs.db"}  # OS litter, never an image and never worth failing a study over


@dataclass
class Item:
    path: Path
    label: str


def class_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan(root: Path, classes: list[str] | None = None) -> tuple[list[Item], list[str]]:
    """Items (sorted, deterministic) and problems found in `root/<class>/*`."""
    problems: list[str] = []
    if not root.is_dir():
        return [], [f"{root}: folder not found"]
    found = class_folders(root)
    wanted = classes if classes is not None else found
    for c in wanted:
        if c not in found:
            problems.append(f"{root / c}: class folder not found")
    items: list[Item] = []
    for c in wanted:
        folder = root / c
        if not folder.is_dir():
            continue
        n = 0
        for f in sorted(folder.iterdir()):
            if f.name.startswith(".") or f.name.lower() in JUNK:
                continue
            if f.is_dir():
                problems.append(f"{f}: nested folder inside a class folder (ignored layouts are not guessed)")
                continue
            if f.suffix.lower() not in IMAGE_EXTS:
                problems.append(f"{f}: not an image file (extension '{f.suffix or 'none'}')")
                continue
            items.append(Item(f, c))
            n += 1
        if n == 0:
            problems.append(f"{folder}: empty class folder")
    if len([c for c in wanted if (root / c).is_dir()]) < 2:
        problems.append(f"{root}: needs at least two class folders, found {len(found)}")
    return items, problems


def class_mismatch(train_root: Path, train_classes: list[str], test_root: Path, test_classes: list[str]) -> list[str]:
    problems = []
    for c in sorted(set(test_classes) - set(train_classes)):
        problems.append(f"{test_root / c}: class '{c}' is in test but not in train ({train_root})")
    for c in sorted(set(train_classes) - set(test_classes)):
        problems.append(f"{test_root}: class '{c}' from train ({train_root}) has no test folder")
    return problems
