"""The embedded default data: deterministic chest-X-ray-like phantoms in the real data's four class folders.

Thorax, mediastinum, ribs and two lung fields, with class-dependent opacities: `normal` clear lungs, `covid` bilateral
peripheral ground-glass patches, `pneumonia_bac` one dense lobar consolidation, `pneumonia_vir` diffuse interstitial
streaks. Written once per (per_class, size, seed) under the harness cache and then read like any real folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("covid", "normal", "pneumonia_bac", "pneumonia_vir")
VERSION = "v1"


def _blob(yy, xx, cy, cx, ry, rx):
    return np.exp(-(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2))


def phantom(label: str, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    jitter = rng.normal(0, 0.02, 4)
    body = _blob(yy, xx, 0.55 + jitter[0], 0.5 + jitter[1], 0.55, 0.42) > 0.35
    img = 0.15 + 0.55 * body
    lungs = np.zeros_like(img)
    for side in (-1, 1):
        cx = 0.5 + side * (0.18 + jitter[2])
        lungs += _blob(yy, xx, 0.5 + jitter[3], cx, 0.28, 0.13) > 0.3
    lungs = np.clip(lungs, 0, 1)
    img = img - 0.45 * lungs
    ribs = 0.06 * (np.sin(yy * size * 0.35 + rng.uniform(0, 6)) > 0.6) * lungs
    img += ribs + 0.25 * _blob(yy, xx, 0.5, 0.5, 0.35, 0.05)  # ribs and mediastinum
    if label == "covid":
        for _ in range(rng.integers(3, 6)):
            side = rng.choice([-1, 1])
            cy, cx = rng.uniform(0.4, 0.7), 0.5 + side * rng.uniform(0.25, 0.32)
            img += 0.22 * _blob(yy, xx, cy, cx, rng.uniform(0.06, 0.1), rng.uniform(0.04, 0.07)) * lungs
    elif label == "pneumonia_bac":
        side = rng.choice([-1, 1])
        cy, cx = rng.uniform(0.45, 0.65), 0.5 + side * rng.uniform(0.15, 0.22)
        img += 0.45 * (_blob(yy, xx, cy, cx, 0.12, 0.09) > 0.4) * lungs
    elif label == "pneumonia_vir":
        streaks = np.sin(xx * size * rng.uniform(0.8, 1.2)) * np.sin(yy * size * rng.uniform(0.3, 0.5))
        img += 0.18 * (streaks > 0.3) * lungs
    img += rng.normal(0, 0.04, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def ensure_demo_data(base: Path, per_class: int = 24, size: int = 128, seed: int = 0) -> Path:
    """Generate (once) and return the folder holding `<class>/*.png`."""
    root = base / f"{VERSION}-n{per_class}-s{size}-seed{seed}"
    done = root / ".complete"
    if done.is_file():
        return root
    rng = np.random.default_rng(seed)
    for label in CLASSES:
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(phantom(label, size, rng)).save(root / label / f"{label}-{i:03d}.png")
    done.write_text("ok\n")
    return root
