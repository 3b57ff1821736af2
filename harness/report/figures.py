"""The report's figures: training curves, t-SNE of penultimate features (by class and by image source), tuning
overview. One colour per class across every figure of a report (`palette`)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402

from harness.recipe import minimised  # noqa: E402
from harness.report.collect import ModelResult  # noqa: E402


def palette(classes: list[str]) -> dict[str, tuple]:
    return dict(zip(sorted(classes), sns.color_palette("tab10", len(classes))))


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def curves(m: ModelResult, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric, label in ((axes[0], "accuracy", "accuracy"), (axes[1], "loss", "loss")):
        for key, style, name in ((metric, "-", "train"), (f"val_{metric}", "--", "validation")):
            ys = m.history.get(key, [])
            if ys:
                ax.plot(range(1, len(ys) + 1), ys, style, label=name, marker="o", markersize=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(f"{label}: train vs validation")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"{m.key} — final model training curves")
    return _save(fig, path)


def tsne(m: ModelResult, colours: dict[str, tuple], path: Path, seed: int = 0) -> Path:
    e = m.embeddings
    classes = [str(c) for c in e["classes"]]
    keep = np.isin(e["split"], ["train", "val", "test"])
    x, y, split, mode = e["embedding"][keep], e["y"][keep], e["split"][keep], e["mode"][keep]
    perplexity = float(max(2, min(30, (len(x) - 1) // 3)))
    xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x.astype(np.float64))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    markers = {"train": "o", "val": "s", "test": "^"}
    for k, c in enumerate(classes):
        for s, mk in markers.items():
            sel = (y == k) & (split == s)
            if sel.any():
                axes[0].scatter(
                    xy[sel, 0],
                    xy[sel, 1],
                    color=colours[c],
                    marker=mk,
                    s=22 if s != "test" else 40,
                    edgecolor="black" if s == "test" else "none",
                    linewidth=0.5,
                    label=f"{c} ({s})",
                    alpha=0.85,
                )
    axes[0].set_title("coloured by class (▲ test, ○ train, ■ validation)")
    modes = sorted(set(mode.tolist()))
    mode_colours = dict(zip(modes, sns.color_palette("Set2", len(modes))))
    for md in modes:
        sel = mode == md
        axes[1].scatter(xy[sel, 0], xy[sel, 1], color=mode_colours[md], s=22, label=f"original mode {md}", alpha=0.85)
    axes[1].set_title("coloured by the original file's colour mode (image source)")
    for ax in axes:
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
        ax.legend(fontsize=7, loc="best")
    shown, of = len(e["y"]), int(e["of"]) if "of" in e else len(e["y"])
    sampled = f" ({shown} of {of} images, a stratified sample)" if shown < of else ""
    fig.suptitle(f"{m.key} — t-SNE of penultimate-layer features{sampled}")
    return _save(fig, path)


def tuning(m: ModelResult, objective: str, path: Path) -> Path:
    rows = [r for r in m.head_trials if np.isfinite(r["objective"])]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    if rows:
        n = np.arange(1, len(rows) + 1)
        obj = np.array([r["objective"] for r in rows])
        best = np.minimum.accumulate(obj) if minimised(objective) else np.maximum.accumulate(obj)
        ax.scatter(n, obj, label="trial", color="tab:blue")
        ax.plot(n, best, color="tab:orange", label="best so far")
        ax.legend()
    ax.set_xlabel("trial number")
    ax.set_ylabel(objective)
    ax.set_title(f"{m.key} — head search ({len(m.head_trials)} trials)")
    ax.grid(alpha=0.3)
    return _save(fig, path)
