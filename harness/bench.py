"""Benchmarks (scripts, never timed tests): what the feature cache saves per trial, and what a whole study costs by
phase. Each prints a table and JSON lines and logs a `bench` run with device tags to the `bench` experiment."""
from __future__ import annotations

import dataclasses
import json
import resource
import time
from pathlib import Path
from typing import Optional

import keras
import mlflow
import numpy as np

from harness import tracking
from harness.recipe import Recipe, load_recipe


def peak_rss_mib() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _log_bench(name: str, metrics: dict, params: dict) -> None:
    tracking.setup("bench")
    with tracking.run(name, tags={"harness.kind": "bench", **tracking.device_tags()}):
        mlflow.log_params(params)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})


def print_rows(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def cache_benchmark(recipe: Recipe, model_key: Optional[str], epochs: int) -> dict:
    """The same frozen-backbone trial (data, head, epochs) (a) through the backbone every epoch, as the seed did,
    and (b) on cached features. Extraction is timed separately: it is paid once per study, not per trial."""
    from harness.features import extract
    from harness.models.backbones import SPECS
    from harness.train import build, fit, full_model, prepare

    mcfg = recipe.model(model_key)
    prep = prepare(recipe, mcfg)
    head_cfg, tcfg = recipe.head_for(mcfg), recipe.training_for(mcfg)
    t0 = time.perf_counter()
    extract(prep.backbone, SPECS[mcfg.backbone].preprocess, prep.task.x, label="Timing extraction")
    extract_s = time.perf_counter() - t0

    keras.utils.set_random_seed(0)
    head_model, _ = build(prep, head_cfg, tcfg.learning_rate)
    cached_log = tracking.EpochLogger(len(prep.task.splits["train"]), log=False)  # the bench logs a summary
    t0 = time.perf_counter()
    fit(head_model, prep, epochs, tcfg.batch_size, [cached_log])
    cached_s = time.perf_counter() - t0

    keras.utils.set_random_seed(0)
    _, head = build(prep, head_cfg, tcfg.learning_rate)
    raw = full_model(prep, head)
    from harness.models import compile_model

    compile_model(raw, prep.n_classes, tcfg.learning_rate)
    images = dataclasses.replace(prep, feats=None)
    raw_log = tracking.EpochLogger(len(prep.task.splits["train"]), log=False)
    t0 = time.perf_counter()
    fit(raw, images, epochs, tcfg.batch_size, [raw_log])
    raw_s = time.perf_counter() - t0

    n, full = len(prep.task.splits["train"]), tcfg.epochs
    # Steady state = median of epochs after the first (the first also traces the graph). A recipe-length trial is
    # projected from the measured first and steady-state epochs; the measured short trial is reported beside it.
    raw_steady = float(np.median(raw_log.epoch_seconds[1:] or raw_log.epoch_seconds))
    cached_steady = float(np.median(cached_log.epoch_seconds[1:] or cached_log.epoch_seconds))
    raw_full = raw_s + (full - epochs) * raw_steady
    cached_full = cached_s + (full - epochs) * cached_steady
    result = {"model": mcfg.key, "image_size": recipe.data.image_size, "epochs": epochs, "train_images": n,
              "through_backbone_s_per_trial": raw_s, "cached_s_per_trial": cached_s, "extract_once_s": extract_s,
              "speedup": raw_s / cached_s, "speedup_incl_extraction_1_trial": raw_s / (cached_s + extract_s),
              "through_backbone_s_per_epoch": raw_steady, "cached_s_per_epoch": cached_steady,
              "speedup_per_epoch": raw_steady / cached_steady, "recipe_epochs": full,
              "projected_through_backbone_s_per_recipe_trial": raw_full,
              "projected_cached_s_per_recipe_trial": cached_full, "projected_speedup_recipe_trial": raw_full / cached_full,
              "through_backbone_img_per_s": n * epochs / raw_s, "cached_img_per_s": n * epochs / cached_s}
    _log_bench(f"cache {mcfg.key}", result, {"model": mcfg.key, "image_size": recipe.data.image_size,
                                             "epochs": epochs, "recipe": str(recipe.source)})
    return result


def study_benchmark(recipe: Recipe, only: Optional[list[str]], max_trials: Optional[int]) -> dict:
    """Wall time and peak RSS of a whole study (tune + compare), broken down by phase from the runs it logged."""
    from harness.features import STATS
    from harness.report import compare
    from harness.search import tune

    t0 = time.perf_counter()
    results = tune(recipe, only=only, max_trials=max_trials)
    tune_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    compare(recipe.study, expected=[m.key for m in recipe.models])
    report_s = time.perf_counter() - t1
    c = tracking.client()
    phases = {"validation_decoding": 0.0, "extraction": STATS["extract_seconds"], "trials": 0.0, "refit_and_log": 0.0,
              "floor_baseline": 0.0}
    for r in results:
        parent = c.get_run(r["parent_run_id"]).data.metrics
        phases["validation_decoding"] += parent.get("data_seconds", 0.0)
        phases["trials"] += parent.get("search_seconds", 0.0)  # the search alone; it stops before the refit
        phases["refit_and_log"] += parent.get("refit_total_seconds", 0.0)  # retrain, evaluate, embed, log, register
        phases["floor_baseline"] += parent.get("baseline_seconds", 0.0)
    # What is left: process start-up, backbone builds and weights loading, MLflow run bookkeeping.
    phases["other"] = max(0.0, tune_s - sum(phases.values()))
    phases["report"] = report_s
    total = time.perf_counter() - t0
    result = {"study": recipe.study, "models": [r["model"] for r in results], "trials_per_model": max_trials or
              recipe.search.max_trials, "image_size": recipe.data.image_size, "total_s": total,
              "peak_rss_mib": peak_rss_mib(), **{f"phase.{k}_s": v for k, v in phases.items()},
              **{f"test_accuracy.{r['model']}": r["test"].get("accuracy", float("nan")) for r in results}}
    _log_bench(f"study {recipe.study}", result, {"study": recipe.study, "image_size": recipe.data.image_size,
                                                  "models": ",".join(result["models"])})
    return result


def main_cache(recipe_path: Path, model: Optional[str], epochs: int, overrides: dict) -> None:
    r = cache_benchmark(load_recipe(recipe_path, overrides), model, epochs)
    print_rows(f"Feature cache benchmark: {r['model']}, {r['image_size']} px, {r['epochs']} epochs, "
               f"{r['train_images']} training images", [
                   ("through the backbone, s/trial", f"{r['through_backbone_s_per_trial']:.1f}"),
                   ("on cached features, s/trial", f"{r['cached_s_per_trial']:.2f}"),
                   ("one-off extraction, s", f"{r['extract_once_s']:.1f}"),
                   ("speed-up per trial (measured)", f"{r['speedup']:.0f}x"),
                   ("speed-up for 1 trial incl. extraction", f"{r['speedup_incl_extraction_1_trial']:.1f}x"),
                   ("steady-state s/epoch: backbone vs cached",
                    f"{r['through_backbone_s_per_epoch']:.2f} vs {r['cached_s_per_epoch']:.3f}"),
                   ("speed-up per epoch (steady state)", f"{r['speedup_per_epoch']:.0f}x"),
                   (f"projected {r['recipe_epochs']}-epoch trial: backbone vs cached, s",
                    f"{r['projected_through_backbone_s_per_recipe_trial']:.0f} vs "
                    f"{r['projected_cached_s_per_recipe_trial']:.1f}"),
                   (f"projected speed-up per {r['recipe_epochs']}-epoch trial",
                    f"{r['projected_speedup_recipe_trial']:.0f}x")])
    print(json.dumps(r))


def main_study(recipe_path: Path, only: Optional[list[str]], max_trials: Optional[int], overrides: dict) -> None:
    r = study_benchmark(load_recipe(recipe_path, overrides), only, max_trials)
    rows = [(k.removeprefix("phase.").removesuffix("_s"), f"{v:.1f} s") for k, v in r.items()
            if k.startswith("phase.")]
    rows += [("total", f"{r['total_s']:.1f} s"), ("peak RSS", f"{r['peak_rss_mib']:.0f} MiB")]
    rows += [(k, f"{v:.3f}") for k, v in r.items() if k.startswith("test_accuracy.")]
    print_rows(f"Study benchmark: {r['study']} ({', '.join(r['models'])}), {r['image_size']} px, "
               f"{r['trials_per_model']} trials per model", rows)
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}))
