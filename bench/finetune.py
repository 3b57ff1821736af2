"""Does fine-tuning the backbone pay, and what does it cost here? For head-only, the top 2 blocks, the top half and
all blocks of one model: K-fold patient-grouped CV accuracy and log loss on the same folds of train+validation (the
test split is never read), exact McNemar against head-only and against the floor (logistic regression on the pooled
features), seconds per epoch with and without the activation cache (top half), configurations pruned, wall time and
peak RSS. The last line is one JSON object.

Each fine-tuning option runs the stage's own fit (`FinetuneHyperModel.fit_members`) from the fold heads, once per
learning rate in `--lrs` with the median rule pruning across them; an option's figures are its configuration with
the best fold-mean final objective (with more than one rate, that choice is made on the same folds: optimistic by
the choice, as a search's best is).

    python bench/finetune.py                                        # the embedded demo data, minutes
    python bench/finetune.py --data-root ../shared/data/covid-xray  # Task 2 Lite0 on the challenge data
    python bench/finetune.py --data-root ../shared/data/covid-xray --options head,half --lrs 1e-4 --epochs 12
"""

import argparse
import json
import logging
import os
import time
from pathlib import Path

import harness  # noqa: F401  (thread settings before TensorFlow)
from harness.cli import setup_logging

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("harness.bench.finetune")  # under harness: the CLI's logging shows it


def oof(models, x, folds, n_classes):
    """Out-of-fold probabilities: model k on fold k's validation rows of x."""
    import numpy as np

    from harness.evaluation.metrics import as_proba
    from harness.training.fit import predict

    n = max(int(f.val.max()) for f in folds) + 1
    out = np.full((n, n_classes), np.nan)
    for m, f in zip(models, folds):
        out[f.val] = as_proba(predict(m, x, idx=f.val), n_classes)
    return out


def scores(y, proba, pool):
    from sklearn.metrics import log_loss

    p = proba[pool]
    return {
        "accuracy": float((p.argmax(1) == y[pool]).mean()),
        "log_loss": float(log_loss(y[pool], p, labels=list(range(p.shape[1])))),
    }


def heads_and_floor(prep, folds, a):
    """The fold heads (on cached pooled features: the head-only option and the start of every fine-tuning) and the
    floor's out-of-fold probabilities on the same folds."""
    import numpy as np

    from harness.evaluation.metrics import as_proba
    from harness.recipe import HeadConfig
    from harness.stages.floor import floor_model
    from harness.training.fit import fit_on, optimizer_factory

    head_cfg = HeadConfig(pooling="avg", units=[a.units], dropout=0.2)
    heads = [prep.build(head_cfg, name=f"h{k}")[0] for k in range(len(folds))]
    fit_on(prep, heads, "avg", folds, a.head_epochs, 16, optimizer_factory("adam", 1e-3), a.seed)
    head_oof = oof(heads, prep.pooled, folds, prep.n_classes)
    floor = np.full_like(head_oof, np.nan)
    for f in folds:
        m = floor_model().fit(prep.pooled[f.train], prep.task.y[f.train])
        floor[f.val] = as_proba(m.predict_proba(prep.pooled[f.val]), prep.n_classes)
    return heads, head_oof, floor


def run_option(prep, heads, folds, option, a, curves, cache=True, epochs=None):
    """One configuration of a fine-tuning option: (result dict, out-of-fold probabilities or None if pruned)."""
    import keras
    import numpy as np

    from harness.recipe import FinetuneSearch
    from harness.training.finetune import FinetuneHyperModel, pruner

    cfg = FinetuneSearch(
        blocks=[option["blocks"]],
        learning_rate=[option["lr"]],
        augment=[a.augment],
        lr_decay=[a.lr_decay],
        label_smoothing=[a.label_smoothing],
        ema=[a.ema],
        warmup_epochs=1,
        schedule="cosine",
        epochs=epochs or a.epochs,
        cache=cache,
        cache_views=a.views,
        prune="median",
        prune_after=2,
        prune_min_trials=1,
    )
    keras.backend.clear_session()
    keras.utils.set_random_seed(a.seed)
    hm = FinetuneHyperModel(prep, cfg, prep.recipe.training_for(prep.mcfg), heads)
    values = hm.complete({"ft_blocks": option["blocks"], "ft_learning_rate": option["lr"], "ft_augment": a.augment})
    members = [hm.member(values, k) for k in range(len(folds))]
    t0 = time.perf_counter()
    results = hm.fit_members(
        values, members, folds, cfg.epochs, a.seed, "val_loss", False, stop=pruner(cfg, "val_loss", curves), search=True
    )
    seconds = time.perf_counter() - t0
    curve = list(np.mean([r.history["val_loss"] for r in results], axis=0))
    r0 = results[0]
    out = {
        "cached": members[0].trained is not None,
        "epochs": r0.epochs,
        "epoch_seconds": float(np.median(r0.epoch_seconds[1:] or r0.epoch_seconds)),  # the first one traces
        "seconds": seconds,
        "pruned": r0.stopped == "pruned",
        "final_val_loss": curve[-1],
    }
    if out["pruned"]:
        return out, None
    curves.append(curve)
    return out, oof([m.model for m in members], prep.task.x, folds, prep.n_classes)


def describe(r: dict) -> str:
    """One option's line: its scores, its paired tests, its cost."""

    def pair(name, t):
        return f"vs {name} {t['a_only']}/{t['b_only']} p {t['p_value']:.3f}  "

    line = f"acc {r['accuracy']:.3f}  log loss {r['log_loss']:.3f}  "
    line += (pair("head", r["vs_head"]) if r["vs_head"] else "") + pair("floor", r["vs_floor"])
    if "epochs" in r:
        line += f"{r['epoch_seconds']:.1f} s/epoch{' cached' if r['cached'] else ''}, {r['epochs']} epochs"
    if r["configurations"] > 1:
        line += f", {r['pruned']} of {r['configurations']} pruned"
    return line


def main(a) -> dict:
    import numpy as np

    from harness.evaluation.metrics import mcnemar
    from harness.features.prepared import prepare
    from harness.recipe import load_recipe
    from harness.training.search import search_folds

    from lab import peak_rss_mib, print_rows  # bench/lab.py: bench/ is on sys.path when run as a script

    t_start = time.perf_counter()
    recipe_path = a.recipe or ROOT / "recipes" / ("challenge.yaml" if a.data_root else "demo.yaml")
    recipe = load_recipe(recipe_path, {"data.root": a.data_root})
    mcfg = recipe.model(a.model)
    prep = prepare(recipe, mcfg)
    y, folds = prep.task.y, search_folds(prep, a.folds, recipe.search.seed)
    pool = np.concatenate([f.val for f in folds])
    heads, head_oof, floor = heads_and_floor(prep, folds, a)
    correct = {"head": head_oof[pool].argmax(1) == y[pool]}
    floor_correct = floor[pool].argmax(1) == y[pool]
    table = {"head": {**scores(y, head_oof, pool), "configurations": 1, "pruned": 0}}
    for name in a.options.split(","):
        if name == "head":
            continue
        blocks = int(name) if name.isdigit() else name
        curves, runs = [], []
        for lr in [float(v) for v in a.lrs.split(",")]:
            res, proba = run_option(prep, heads, folds, {"blocks": blocks, "lr": lr}, a, curves)
            log.info("%s at %g: %s", name, lr, res)
            runs.append((res, proba))
        kept = [(r, p) for r, p in runs if p is not None]
        best, proba = min(kept, key=lambda rp: rp[0]["final_val_loss"])
        correct[name] = proba[pool].argmax(1) == y[pool]
        table[name] = {
            **scores(y, proba, pool),
            **{k: best[k] for k in ("cached", "epochs", "epoch_seconds", "seconds")},
            "configurations": len(runs),
            "pruned": sum(r["pruned"] for r, _ in runs),
        }
    ratio = None
    if "half" in table and table["half"]["cached"]:
        # The same option and first rate without the cache: whole-backbone forward passes on resampled images.
        res, _ = run_option(
            prep, heads, folds, {"blocks": "half", "lr": float(a.lrs.split(",")[0])}, a, [], cache=False, epochs=2
        )
        table["half"]["uncached_epoch_seconds"] = res["epoch_seconds"]
        ratio = table["half"]["epoch_seconds"] / res["epoch_seconds"]
    for name, row in table.items():
        row["vs_head"] = mcnemar(correct[name], correct["head"]) if name != "head" else None
        row["vs_floor"] = mcnemar(correct[name], floor_correct)
    floor_scores = scores(y, floor, pool)
    title = f"{mcfg.key}: {len(folds)}-fold patient-grouped CV on {len(pool)} images"
    print_rows(
        f"{title} (floor {floor_scores['accuracy']:.3f})",
        [(name, describe(r)) for name, r in table.items()]
        + ([("cache", f"top half {ratio:.2f} of the uncached seconds per epoch")] if ratio is not None else []),
    )
    return {
        "model": mcfg.key,
        "images": int(len(pool)),
        "folds": len(folds),
        "cv_accuracy": {k: r["accuracy"] for k, r in table.items()},
        "cv_log_loss": {k: r["log_loss"] for k, r in table.items()},
        "floor_cv_accuracy": floor_scores["accuracy"],
        "p_vs_head": {k: r["vs_head"]["p_value"] for k, r in table.items() if r["vs_head"]},
        "p_vs_floor": {k: r["vs_floor"]["p_value"] for k, r in table.items()},
        "epoch_seconds": {k: r["epoch_seconds"] for k, r in table.items() if "epoch_seconds" in r},
        "cached_epoch_ratio": ratio,
        "pruned": sum(r["pruned"] for r in table.values()),
        "configurations": sum(r["configurations"] for r in table.values()),
        "wall_s": time.perf_counter() - t_start,
        "peak_rss_mib": peak_rss_mib(),
        "cpus": os.cpu_count(),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=None, help="the challenge data (default: the embedded demo data)")
    ap.add_argument("--recipe", type=Path, default=None)
    ap.add_argument("--model", default="task2-efficientnet_lite0")
    ap.add_argument("--options", default="head,2,half,all", help="head, a block count, half, all; comma-separated")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default 8; demo 3)")
    ap.add_argument("--head-epochs", type=int, default=30)
    ap.add_argument("--units", type=int, default=128)
    ap.add_argument("--lrs", default="1e-4,1e-3", help="learning rates tried per option, pruned by the median rule")
    ap.add_argument("--lr-decay", type=float, default=0.8)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--ema", type=float, default=0.9)
    ap.add_argument("--augment", type=float, default=0.5)
    ap.add_argument("--views", type=int, default=8, help="cached augmented views per image")
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args()
    a.epochs = a.epochs or (8 if a.data_root else 3)
    setup_logging(logging.INFO)
    print(json.dumps(main(a)))
