"""Benchmarks (scripts, never timed tests): what the feature cache saves per trial, what a trial costs against the
plainest loop that could train the same head, and what a whole study costs by phase. Each prints a table and one
JSON line and logs a `bench` run with device tags to the `bench` experiment."""

from __future__ import annotations

import dataclasses
import json
import resource
import shutil
import time
from pathlib import Path

import keras
import mlflow
import numpy as np

from harness.paths import get_paths
from harness.recipe import Recipe, load_recipe, minimised
from harness.tracking import runs as tracking
from harness.tracking import schema


def current_rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mib() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _log_bench(name: str, metrics: dict, params: dict) -> None:
    tracking.setup("bench")
    with tracking.run(name, tags={schema.KIND: schema.BENCH, **tracking.device_tags()}):
        mlflow.log_params(params)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})


def print_rows(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def cache_benchmark(recipe: Recipe, model_key: str | None, epochs: int) -> dict:
    """The same frozen-backbone trial (data, head, epochs) (a) through the backbone every epoch, as the seed did,
    and (b) on cached features. Extraction is timed separately: it is paid once per study, not per trial."""
    from harness.features.prepared import prepare
    from harness.features.store import extract
    from harness.models.backbones import SPECS
    from harness.training.fit import Fold, fit_on, optimizer_factory

    mcfg = recipe.model(model_key)
    prep = prepare(recipe, mcfg)
    head_cfg, tcfg = recipe.head_for(mcfg), recipe.training_for(mcfg)
    t0 = time.perf_counter()
    extract(prep.backbone, SPECS[mcfg.backbone].preprocess, prep.colour, prep.task, label="Timing extraction")
    extract_s = time.perf_counter() - t0
    splits = prep.task.splits
    runs = {}
    for name, p in (("cached", prep), ("raw", dataclasses.replace(prep, features=None))):
        keras.utils.set_random_seed(0)
        model, _ = p.build(head_cfg)
        (runs[name],) = fit_on(
            p,
            [model],
            head_cfg.pooling,
            [Fold(splits["train"], splits["val"])],
            epochs,
            tcfg.batch_size,
            optimizer_factory(tcfg.optimizer, tcfg.learning_rate),
            seed=0,
        )
    raw, cached = runs["raw"], runs["cached"]
    n, full = len(splits["train"]), tcfg.epochs
    # Steady state = median of epochs after the first (the first also traces the graph). A recipe-length trial is
    # projected from the measured first and steady-state epochs; the measured short trial is reported beside it.
    raw_steady = float(np.median(raw.epoch_seconds[1:] or raw.epoch_seconds))
    cached_steady = float(np.median(cached.epoch_seconds[1:] or cached.epoch_seconds))
    raw_full = raw.seconds + (full - epochs) * raw_steady
    cached_full = cached.seconds + (full - epochs) * cached_steady
    result = {
        "model": mcfg.key,
        "image_size": prep.image_size,
        "epochs": epochs,
        "train_images": n,
        "through_backbone_s_per_trial": raw.seconds,
        "cached_s_per_trial": cached.seconds,
        "extract_once_s": extract_s,
        "speedup": raw.seconds / cached.seconds,
        "speedup_incl_extraction_1_trial": raw.seconds / (cached.seconds + extract_s),
        "through_backbone_s_per_epoch": raw_steady,
        "cached_s_per_epoch": cached_steady,
        "speedup_per_epoch": raw_steady / cached_steady,
        "recipe_epochs": full,
        "projected_through_backbone_s_per_recipe_trial": raw_full,
        "projected_cached_s_per_recipe_trial": cached_full,
        "projected_speedup_recipe_trial": raw_full / cached_full,
        "through_backbone_img_per_s": raw.images_per_s,
        "cached_img_per_s": cached.images_per_s,
    }
    _log_bench(
        f"cache {mcfg.key}",
        result,
        {"model": mcfg.key, "image_size": prep.image_size, "epochs": epochs, "recipe": str(recipe.source)},
    )
    return result


def plain_loop_seconds(
    feature_shape: tuple,
    n_classes: int,
    units: list[int],
    dropout: float,
    x: np.ndarray,
    y: np.ndarray,
    xv: np.ndarray,
    yv: np.ndarray,
    epochs: int,
    batch_size: int,
    lr: float,
    jit: bool,
) -> float:
    """The lower bound of a trial: the same head (same layers, Adam, same epochs and batches, a validation pass per
    epoch) trained by the plainest compiled loop on tensors already in memory, with nothing recorded. Written here
    on purpose, not borrowed from `harness.training.fit`, so the harness is measured against code it does not share."""
    import tensorflow as tf

    from harness.models import build_head

    t0 = time.perf_counter()
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    head = build_head(feature_shape, n_classes, units, dropout, "flatten")
    opt = keras.optimizers.Adam(lr)
    opt.build(head.trainable_variables)
    if n_classes == 2:
        loss_fn, y, yv = (
            keras.losses.BinaryCrossentropy(),
            y.reshape(-1, 1).astype("float32"),
            yv.reshape(-1, 1).astype("float32"),
        )
    else:
        loss_fn = keras.losses.SparseCategoricalCrossentropy()
    x_t, y_t, xv_t, yv_t = (tf.constant(a) for a in (x, y, xv, yv))
    n, steps = len(x), -(-len(x) // batch_size)

    @tf.function(jit_compile=jit)
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, head(xb, training=True))
        opt.apply_gradients(zip(tape.gradient(loss, head.trainable_variables), head.trainable_variables))

    @tf.function
    def epoch(perm):
        for s in tf.range(steps):
            idx = perm[s * batch_size : (s + 1) * batch_size]
            step(tf.gather(x_t, idx), tf.gather(y_t, idx))
        return loss_fn(yv_t, head(xv_t, training=False))

    rng = np.random.default_rng(0)
    for _ in range(epochs):
        float(epoch(tf.constant(rng.permutation(n))))
    return time.perf_counter() - t0


def keras_fit_seconds(
    feature_shape: tuple,
    n_classes: int,
    units: list[int],
    dropout: float,
    x,
    y,
    xv,
    yv,
    epochs: int,
    batch_size: int,
    lr: float,
) -> float:
    """The same head through `model.compile` + `model.fit` with validation data: what a trial cost before."""
    from harness.models import build_head

    t0 = time.perf_counter()
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    head = build_head(feature_shape, n_classes, units, dropout, "flatten")
    head.compile(
        optimizer=keras.optimizers.Adam(lr),
        metrics=["accuracy"],
        loss="binary_crossentropy" if n_classes == 2 else "sparse_categorical_crossentropy",
    )
    head.fit(
        x,
        y.astype("float32") if n_classes == 2 else y,
        validation_data=(xv, yv),
        epochs=epochs,
        batch_size=batch_size,
        verbose=0,
    )
    return time.perf_counter() - t0


def trial_benchmark(recipe: Recipe, model_key: str | None, repeats: int = 3) -> dict:
    """Seconds of one recipe trial through the harness (a one-trial Keras Tuner search inside a parent run: oracle,
    build, fit, MLflow trial run, tuner state) against the plain compiled loop on preloaded tensors, for an avg and
    a flatten head with the recipe's depth, epochs and batch size. Medians of `repeats`."""
    from harness.features.prepared import prepare
    from harness.recipe import FloatRange, IntRange
    from harness.training.search import HeadHyperModel, make_tuner, search_folds

    mcfg = recipe.model(model_key)
    prep = prepare(recipe, mcfg)
    head_cfg, tcfg = recipe.head_for(mcfg), recipe.training_for(mcfg)
    depth, width = len(head_cfg.units), max(head_cfg.units)
    units = [width] * depth
    tracking.setup("bench")
    result = {
        "model": mcfg.key,
        "image_size": prep.image_size,
        "epochs": tcfg.epochs,
        "batch_size": tcfg.batch_size,
        "units": units,
        "train_images": len(prep.task.splits["train"]),
        "repeats": repeats,
    }
    with tracking.run(f"trial bench {mcfg.key}", tags={schema.KIND: schema.BENCH, **tracking.device_tags()}):
        for pooling in ("avg", "flatten"):
            space = recipe.search.model_copy(
                update={
                    "tuner": "random",
                    "max_trials": 1,
                    "depth": IntRange(min=depth, max=depth),
                    "units": [width],
                    "dropout": FloatRange(min=head_cfg.dropout, max=head_cfg.dropout),
                    "learning_rate": [tcfg.learning_rate],
                    "pooling": [pooling],
                }
            )
            harness_s, rss = [], []
            for r in range(repeats):
                # A fresh search each repeat: its own tuner folder and its own parent run. A search finds its
                # trials' runs under its parent, and a trial already FINISHED there is not trained again (resume),
                # so repeats sharing one parent would time a lookup instead of a trial.
                project = get_paths().tuner_dir / "bench" / f"trial-{pooling}-{r}"
                shutil.rmtree(project, ignore_errors=True)
                with tracking.run(f"trial bench {pooling} {r}", nested=True, tags={schema.KIND: schema.BENCH}) as rep:
                    tuner = make_tuner(
                        HeadHyperModel(prep, space),
                        space,
                        project,
                        parent_run_id=rep.info.run_id,
                        resume=False,
                        epochs=tcfg.epochs,
                        max_trials=1,
                        folds=search_folds(prep, 1, space.seed),
                    )
                    t0 = time.perf_counter()
                    tuner.search(verbose=0)
                    harness_s.append(time.perf_counter() - t0)
                rss.append(current_rss_mib())
                (trial,) = tuner.oracle.trials.values()
                if trial.status != "COMPLETED":
                    raise RuntimeError(f"the benchmark's {pooling} trial failed: {trial.message}")
            shape = prep.head_input_shape(pooling)
            data = (*prep.inputs("train", pooling), *prep.inputs("val", pooling))
            args = (
                shape,
                prep.n_classes,
                units,
                head_cfg.dropout,
                *data,
                tcfg.epochs,
                tcfg.batch_size,
                tcfg.learning_rate,
            )
            plain = {
                jit: float(np.median([plain_loop_seconds(*args, jit=jit) for _ in range(repeats)]))
                for jit in (False, True)
            }
            lower = min(plain.values())
            h = float(np.median(harness_s))
            result.update(
                {
                    f"{pooling}.harness_s": h,
                    f"{pooling}.plain_loop_s": plain[False],
                    f"{pooling}.plain_loop_xla_s": plain[True],
                    f"{pooling}.lower_bound_s": lower,
                    f"{pooling}.ratio_to_lower_bound": h / lower,
                    # Memory a trial keeps after it ends: ~0 when fits give their variables back.
                    f"{pooling}.rss_growth_mib_per_trial": (rss[-1] - rss[0]) / max(1, len(rss) - 1),
                    f"{pooling}.keras_fit_s": keras_fit_seconds(*args),
                    f"{pooling}.head_params": int(
                        sum(
                            np.prod(w.shape)
                            for w in prep.build(head_cfg.model_copy(update={"units": units, "pooling": pooling}))[
                                1
                            ].weights
                        )
                    ),
                }
            )
            result[f"{pooling}.keras_fit_over_harness"] = result[f"{pooling}.keras_fit_s"] / h
        mlflow.log_metrics({k: float(v) for k, v in result.items() if isinstance(v, (int, float))})
    return result


def metric_set(metrics: dict, name: str) -> dict:
    """The metrics `name.*` of a run, without their prefix."""
    return {k.removeprefix(f"{name}."): v for k, v in metrics.items() if k.startswith(f"{name}.")}


def study_benchmark(recipe: Recipe, only: list[str] | None, max_trials: int | None) -> dict:
    """Wall time and peak RSS of a whole study (tune + compare), broken down by phase from the runs it logged; per
    model its test accuracy with both CIs and the floor on the same images, and per task every pair of models
    compared with the exact McNemar test (the numbers of the report, recomputed from the logged predictions)."""
    import itertools

    from harness.report import NESTED_SETS, compare, paired, test_metrics
    from harness.report.collect import collect
    from harness.study.run import tune

    t0 = time.perf_counter()
    results = [r for r in tune(recipe, only=only, max_trials=max_trials) if "skipped" not in r]
    tune_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    compare(recipe.study, expected=[m.key for m in recipe.models])
    report_s = time.perf_counter() - t1
    c = tracking.client()
    phases = {"validation_decoding": 0.0, "extraction": 0.0, "trials": 0.0, "refit_and_log": 0.0, "floor_baseline": 0.0}
    for r in results:
        parent = c.get_run(r["parent_run_id"]).data.metrics
        phases["validation_decoding"] += parent.get("data_seconds", 0.0)
        phases["extraction"] += parent.get("extract_seconds", 0.0)
        phases["trials"] += parent.get("search_seconds", 0.0)  # the search alone; it stops before the refit
        phases["refit_and_log"] += parent.get("refit_total_seconds", 0.0)  # retrain, evaluate, embed, log, register
        phases["floor_baseline"] += parent.get("baseline_seconds", 0.0)
    # What is left: process start-up, backbone builds and weights loading, MLflow run bookkeeping.
    phases["other"] = max(0.0, tune_s - sum(phases.values()))
    phases["report"] = report_s
    total = time.perf_counter() - t0
    ran = {r["model"] for r in results}
    study = collect(recipe.study)
    models = [m for m in study.models if m.key in ran]
    per_model, pairs = {}, []
    for m in models:
        t = test_metrics(m)
        floor = paired(m.split("test"), m.baseline_predictions) if m.baseline else None
        nested = m.nested.data.metrics if m.nested else {}
        per_model[m.key] = {
            "n": t["n"],
            "accuracy": t["accuracy"],
            "bootstrap_ci": [t["accuracy_ci_low"], t["accuracy_ci_high"]],
            "exact_ci": [t["accuracy_cp_low"], t["accuracy_cp_high"]],
            "macro_f1": t["macro_f1"],
            "floor_accuracy": m.baseline.data.metrics.get(f"{schema.TEST}accuracy") if m.baseline else None,
            "p_vs_floor": floor["p_value"] if floor else None,
            "floor": {
                k: m.baseline.data.metrics.get(f"{schema.TEST}{k}")
                for k in ("accuracy", "accuracy_cp_low", "accuracy_cp_high")
            }
            if m.baseline
            else None,
            "selection": m.search.data.metrics.get(f"{schema.BEST}{recipe.search.objective}") if m.search else None,
            "stage": m.tags.get(schema.FINAL_STAGE, "head"),
            "tta_accuracy": m.metrics.get("test_tta.accuracy"),
            "view_tta_accuracy": m.metrics.get("test_view_tta.accuracy"),
            "nested": metric_set(nested, "nested") if m.nested else None,
            # the same outer models before their fine-tuning stage (search.nested_finetune)
            "nested_head": metric_set(nested, "nested_head") if "nested_head.accuracy" in nested else None,
            # the same outer models averaged over copies of each image (evaluation.tta / view_tta)
            "nested_averaged": {
                label: metric_set(nested, name) for name, label in NESTED_SETS if f"{name}.accuracy" in nested
            }
            if m.nested
            else None,
        }
    for a, b in itertools.combinations(models, 2):
        res = paired(a.split("test"), b.split("test")) if a.task == b.task else None
        if res:
            pairs.append(
                {"a": a.key, "b": b.key, "only_a": res["a_only"], "only_b": res["b_only"], "p": res["p_value"]}
            )
    result = {
        "study": recipe.study,
        "models": sorted(ran),
        "trials_per_model": max_trials or recipe.search.max_trials,
        "image_size": ", ".join(sorted({f"{recipe.image_size_for(recipe.model(k))}" for k in ran})),
        "total_s": total,
        "peak_rss_mib": peak_rss_mib(),
        **{f"phase.{k}_s": v for k, v in phases.items()},
        **{f"test_accuracy.{k}": v["accuracy"] for k, v in per_model.items()},
    }
    _log_bench(
        f"study {recipe.study}",
        result,
        {"study": recipe.study, "image_size": result["image_size"], "models": ",".join(result["models"])},
    )
    return {**result, "per_model": per_model, "pairs": pairs}


def variant(recipe: Recipe, suffix: str, **search) -> Recipe:
    """The recipe as a study of its own (`<study>-<suffix>`) with some search settings changed."""
    return recipe.model_copy(
        update={"study": f"{recipe.study}-{suffix}", "search": recipe.search.model_copy(update=search)}
    )


def winners(study: dict, recipe: Recipe) -> dict[str, str]:
    """Per task, the model whose search objective was best: chosen by validation, never by test."""
    objective = recipe.search.objective
    best: dict[str, tuple[float, str]] = {}
    for key, m in study["per_model"].items():
        value = m["selection"] if minimised(objective) else -m["selection"]
        task = recipe.model(key).task
        if task not in best or value < best[task][0]:
            best[task] = (value, key)
    return {task: key for task, (_, key) in best.items()}


def selection_benchmark(recipe: Recipe, only: list[str] | None, max_trials: int | None) -> dict:
    """The study's selection protocol on its data, per task: the single-split winner (cv_folds 1), the CV-selected
    winner (the recipe's folds), and that winner searched again with the recipe's fine-tuning stage and nested
    estimate; each with test accuracy, exact CI and McNemar against the floor on the same test images."""
    t0 = time.perf_counter()
    plain = {"nested_cv": 0, "finetune": None}
    no_ft = [m.model_copy(update={"finetune": None}) for m in recipe.models]
    single = variant(recipe.model_copy(update={"models": no_ft}), "single", cv_folds=1, **plain)
    cv = variant(recipe.model_copy(update={"models": no_ft}), "cv", **plain)
    out = {"single": study_benchmark(single, only, max_trials), "cv": study_benchmark(cv, only, max_trials)}
    chosen = {"single": winners(out["single"], recipe), "cv": winners(out["cv"], recipe)}
    full = variant(recipe.model_copy(update={"models": [recipe.model(k) for k in chosen["cv"].values()]}), "full")
    out["full"] = study_benchmark(full, None, max_trials)
    tasks = {}
    for task in sorted(chosen["cv"]):
        ws, wc = chosen["single"][task], chosen["cv"][task]
        f = out["full"]["per_model"][wc]
        tasks[task] = {
            "floor": out["cv"]["per_model"][wc]["floor"],
            "single_split_winner": {"model": ws, **out["single"]["per_model"][ws]},
            "cv_winner": {"model": wc, **out["cv"]["per_model"][wc]},
            "finetuned_winner": {"model": wc, **f},
            "nested": f.get("nested"),
            "nested_head": f.get("nested_head"),
            "nested_averaged": f.get("nested_averaged"),
        }
    return {
        "study": recipe.study,
        "tasks": tasks,
        "total_s": time.perf_counter() - t0,
        "peak_rss_mib": peak_rss_mib(),
        "variants": out,
    }


def main_cache(recipe_path: Path, model: str | None, epochs: int, overrides: dict) -> None:
    r = cache_benchmark(load_recipe(recipe_path, overrides), model, epochs)
    print_rows(
        f"Feature cache benchmark: {r['model']}, {r['image_size']} px, {r['epochs']} epochs, "
        f"{r['train_images']} training images",
        [
            ("through the backbone, s/trial", f"{r['through_backbone_s_per_trial']:.1f}"),
            ("on cached features, s/trial", f"{r['cached_s_per_trial']:.2f}"),
            ("one-off extraction, s", f"{r['extract_once_s']:.1f}"),
            ("speed-up per trial (measured)", f"{r['speedup']:.0f}x"),
            ("speed-up for 1 trial incl. extraction", f"{r['speedup_incl_extraction_1_trial']:.1f}x"),
            (
                "steady-state s/epoch: backbone vs cached",
                f"{r['through_backbone_s_per_epoch']:.2f} vs {r['cached_s_per_epoch']:.3f}",
            ),
            ("speed-up per epoch (steady state)", f"{r['speedup_per_epoch']:.0f}x"),
            (
                f"projected {r['recipe_epochs']}-epoch trial: backbone vs cached, s",
                f"{r['projected_through_backbone_s_per_recipe_trial']:.0f} vs "
                f"{r['projected_cached_s_per_recipe_trial']:.1f}",
            ),
            (f"projected speed-up per {r['recipe_epochs']}-epoch trial", f"{r['projected_speedup_recipe_trial']:.0f}x"),
        ],
    )
    print(json.dumps(r))


def main_trial(recipe_path: Path, model: str | None, repeats: int, overrides: dict) -> None:
    r = trial_benchmark(load_recipe(recipe_path, overrides), model, repeats)
    rows = []
    for pooling in ("avg", "flatten"):
        rows += [
            (f"{pooling}: harness trial, s", f"{r[f'{pooling}.harness_s']:.2f}"),
            (
                f"{pooling}: plain compiled loop, s (XLA step)",
                f"{r[f'{pooling}.plain_loop_s']:.2f} ({r[f'{pooling}.plain_loop_xla_s']:.2f})",
            ),
            (f"{pooling}: harness / lower bound", f"{r[f'{pooling}.ratio_to_lower_bound']:.2f}x"),
            (f"{pooling}: RSS kept per trial, MiB", f"{r[f'{pooling}.rss_growth_mib_per_trial']:.0f}"),
            (f"{pooling}: Keras model.fit, s (as before)", f"{r[f'{pooling}.keras_fit_s']:.2f}"),
            (f"{pooling}: head parameters", f"{r[f'{pooling}.head_params']:,}"),
        ]
    print_rows(
        f"Trial benchmark: {r['model']}, {r['image_size']} px, {r['epochs']} epochs, batch {r['batch_size']}, "
        f"units {r['units']}, {r['train_images']} training images, median of {r['repeats']}",
        rows,
    )
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}))


def main_selection(recipe_path: Path, only: list[str] | None, max_trials: int | None, overrides: dict) -> None:
    r = selection_benchmark(load_recipe(recipe_path, overrides), only, max_trials)
    for name in ("single", "cv", "full"):
        print_study(r["variants"][name])

    def acc(m) -> str:
        return f"{m['accuracy']:.3f} [{m['exact_ci'][0]:.3f}, {m['exact_ci'][1]:.3f}] (n={m['n']})"

    for task, t in r["tasks"].items():
        fl = t["floor"]
        rows = [
            (
                "floor (LR on the CV winner's pooled features)",
                f"{fl['accuracy']:.3f} [{fl['accuracy_cp_low']:.3f}, {fl['accuracy_cp_high']:.3f}]" if fl else "—",
            )
        ]
        for label, key in (
            ("single-split winner", "single_split_winner"),
            ("CV-selected winner", "cv_winner"),
            ("fine-tuned winner", "finetuned_winner"),
        ):
            m = t[key]
            note = (
                ""
                if key != "finetuned_winner"
                else (" (fine-tuning chosen)" if m["stage"] == "finetune" else " (fine-tuning not chosen: head only)")
            )
            tta = f"; with TTA {m['tta_accuracy']:.3f}" if m.get("tta_accuracy") is not None else ""
            if m.get("view_tta_accuracy") is not None:
                tta += f"; averaged over its training views {m['view_tta_accuracy']:.3f}"
            rows.append((f"{label}: {m['model']}{note}", f"{acc(m)}; McNemar p vs floor {m['p_vs_floor']:.3f}{tta}"))
        n = t["nested"]
        if n:
            rows.append(
                (
                    "nested CV of the procedure",
                    f"{n['accuracy']:.3f} [{n['accuracy_cp_low']:.3f}, "
                    f"{n['accuracy_cp_high']:.3f}] (n={int(n['n'])}); floor {n['floor.accuracy']:.3f}, "
                    f"McNemar p {n['vs_floor.p_value']:.3f}",
                )
            )
        if h := t.get("nested_head"):
            rows.append(
                (
                    f"nested CV before the fine-tuning stage (chosen in {int(n['finetune.outer_chosen'])} outer folds)",
                    f"{h['accuracy']:.3f} [{h['accuracy_cp_low']:.3f}, {h['accuracy_cp_high']:.3f}]; McNemar p "
                    f"{n['vs_head.p_value']:.3f} vs with it ({int(n['vs_head.only_finetuned'])} images only with it "
                    f"right, {int(n['vs_head.only_head'])} only before it)",
                )
            )
        for label, a in (t.get("nested_averaged") or {}).items():
            rows.append(
                (
                    f"nested CV, averaged over {label}",
                    f"{a['accuracy']:.3f} [{a['accuracy_cp_low']:.3f}, {a['accuracy_cp_high']:.3f}]; McNemar p "
                    f"{a['vs_image_alone.p_value']:.3f} vs the image alone, {a['vs_floor.p_value']:.3f} vs the floor",
                )
            )
        print_rows(f"Selection benchmark, {task}", rows)
    print_rows("Whole benchmark", [("total", f"{r['total_s']:.0f} s"), ("peak RSS", f"{r['peak_rss_mib']:.0f} MiB")])
    print(json.dumps({k: v for k, v in r.items() if k != "variants"}, default=str))


def main_study(recipe_path: Path, only: list[str] | None, max_trials: int | None, overrides: dict) -> None:
    r = study_benchmark(load_recipe(recipe_path, overrides), only, max_trials)
    print_study(r)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, default=str))


def print_study(r: dict) -> None:
    rows = [(k.removeprefix("phase.").removesuffix("_s"), f"{v:.1f} s") for k, v in r.items() if k.startswith("phase.")]
    rows += [("total", f"{r['total_s']:.1f} s"), ("peak RSS", f"{r['peak_rss_mib']:.0f} MiB")]
    for k, m in r["per_model"].items():
        floor = ""
        if m["p_vs_floor"] is not None:
            floor = f"; floor {m['floor_accuracy']:.3f}, McNemar p {m['p_vs_floor']:.3f}"
        chosen_by = f"selected by {m['selection']:.4f}; " if m["selection"] is not None else ""
        rows.append(
            (
                k,
                f"{chosen_by}test {m['accuracy']:.3f} (n={m['n']}) bootstrap [{m['bootstrap_ci'][0]:.3f}, "
                f"{m['bootstrap_ci'][1]:.3f}] exact [{m['exact_ci'][0]:.3f}, {m['exact_ci'][1]:.3f}]{floor}",
            )
        )
    rows += [
        (f"{p['a']} vs {p['b']}", f"only A right {p['only_a']}, only B right {p['only_b']}, McNemar p {p['p']:.3f}")
        for p in r["pairs"]
    ]
    print_rows(
        f"Study benchmark: {r['study']} ({', '.join(r['models'])}), {r['image_size']} px, "
        f"{r['trials_per_model']} trials per model",
        rows,
    )
