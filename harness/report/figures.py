"""The report's figures: the per-task forest plot of test accuracy, training curves, t-SNE of penultimate features
(by class and by image source), tuning overview. One colour per class across every figure of a report (`palette`)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402

from harness.recipe import minimised  # noqa: E402
from harness.report.collect import ModelResult  # noqa: E402
from harness.report.common import trial_number  # noqa: E402


def palette(classes: list[str]) -> dict[str, tuple]:
    return dict(zip(sorted(classes), sns.color_palette("tab10", len(classes))))


def _save(fig, path: Path, rect: tuple | None = None) -> Path:
    fig.tight_layout(rect=rect)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def curve_series(m: ModelResult) -> dict[str, list[float]]:
    """The training-curve series worth drawing: those with at least two epochs (one point is no curve)."""
    return {k: v for k, v in m.history.items() if len(v) >= 2}


def curves(m: ModelResult, path: Path) -> Path | None:
    """Train and validation accuracy and loss per epoch; None when no series has two epochs (the report says so
    in a line instead of drawing dots)."""
    series = curve_series(m)
    if not series:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, metric in ((axes[0], "accuracy"), (axes[1], "loss")):
        for key, style, name in ((metric, "-", "train"), (f"val_{metric}", "--", "validation")):
            ys = series.get(key, [])
            if ys:
                ax.plot(range(1, len(ys) + 1), ys, style, label=name, marker="o", markersize=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{metric}: train vs validation")
        if ax.lines:
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
    """Each head-search trial's objective against its trial number, counted as the tables count them (Keras
    Tuner's ids, from 0), and the best so far."""
    rows = [r for r in m.head_trials if np.isfinite(r["objective"]) and isinstance(trial_number(r["trial"]), int)]
    rows.sort(key=lambda r: trial_number(r["trial"]))
    fig, ax = plt.subplots(figsize=(6, 3.2))
    if rows:
        n = np.array([trial_number(r["trial"]) for r in rows])
        value = np.array([r["objective"] for r in rows])
        best = np.minimum.accumulate(value) if minimised(objective) else np.maximum.accumulate(value)
        ax.scatter(n, value, label="trial", color="tab:blue", zorder=3)
        ax.step(n, best, where="post", color="tab:orange", label="best so far")
        ax.legend()
        ax.set_xlim(n.min() - 0.5, n.max() + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial (as numbered in the tables, from 0)")
    ax.set_ylabel(objective)
    ax.set_title(f"{m.key} — head search ({len(m.head_trials)} trials)")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def forest(rows: list[dict], title: str, path: Path) -> Path:
    """One row per model (in the order given, the first on top): test accuracy with its exact 95% CI, the floor on
    the same test images (grey square) and the nested estimate with its exact CI (diamond, below the row) where
    there is one; the champion's row in colour and bold. A row: label, acc, low, high, floor, nested, champion."""
    n = len(rows)
    row = 0.5 if n <= 6 else 0.42  # ten models of a task still fit the first screen under the answer
    fig, ax = plt.subplots(figsize=(9, 1.15 + row * max(n, 1)))
    y = np.arange(n)[::-1].astype(float)
    lows = [r["low"] for r in rows] + [r["floor"] for r in rows if r.get("floor") is not None]
    lows += [r["nested"][1] for r in rows if r.get("nested")]
    left = max(0.0, min([v for v in lows if np.isfinite(v)] + [0.5]) - 0.05)
    for yi, r in zip(y, rows):
        colour = "tab:red" if r.get("champion") else "tab:blue"
        ax.errorbar(
            r["acc"],
            yi,
            xerr=[[r["acc"] - r["low"]], [r["high"] - r["acc"]]],
            fmt="o",
            color=colour,
            capsize=4,
            markersize=7 if r.get("champion") else 5,
            lw=2.2 if r.get("champion") else 1.4,
            zorder=3,
        )
        ax.annotate(
            f"{r['acc']:.3f} [{r['low']:.3f}, {r['high']:.3f}]",
            (1.0, yi),
            xycoords=("axes fraction", "data"),
            xytext=(8, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
            fontweight="bold" if r.get("champion") else "normal",
            annotation_clip=False,
        )
        if r.get("floor") is not None:
            ax.plot(r["floor"], yi, "s", color="grey", mfc="white", markersize=7, zorder=2)
        if r.get("nested"):
            acc, lo, hi = r["nested"]
            ax.errorbar(
                acc,
                yi - 0.28,
                xerr=[[acc - lo], [hi - acc]],
                fmt="D",
                color="tab:green",
                capsize=3,
                markersize=5,
                lw=1,
                zorder=3,
            )
    ax.set_yticks(y, [r["label"] for r in rows])
    for tick, r in zip(ax.get_yticklabels(), rows):
        if r.get("champion"):
            tick.set_color("tab:red")
            tick.set_fontweight("bold")
    ax.set_xlim(left, 1.0 + 0.015 * (1.0 - left))  # a point at 1.0 drawn whole
    ax.set_ylim(-0.7, n - 0.4)
    ax.set_xlabel("test accuracy, exact 95% CI")
    ax.grid(axis="x", alpha=0.3)
    handles = [
        Line2D([], [], color="tab:red", marker="o", label="champion"),
        Line2D([], [], color="tab:blue", marker="o", label="other models"),
        Line2D([], [], color="grey", marker="s", mfc="white", ls="", label="floor (same test images)"),
    ]
    if any(r.get("nested") for r in rows):
        handles.append(Line2D([], [], color="tab:green", marker="D", label="nested CV estimate"))
    ax.set_title(title, fontsize=10)
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    return _save(fig, path, rect=(0, 0.3 / fig.get_figheight(), 1, 1))
