"""The report's serving-cost section of one task: test accuracy against batch-1 latency (the Pareto front of the
two), what each final model costs to serve in Keras and ONNX Runtime, how faithful its ONNX export and INT8 version
are, and which models the champion's latency budget excluded.

Read from the final runs' `cost.*` metrics, the `test`/`test_int8` prediction rows and the experiment's
`harness.budget_excluded.<task>` tag; a store without them gives no block and no error. Read-only.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from harness.evaluation.metrics import accuracy_ci, mcnemar  # noqa: E402
from harness.report.collect import ModelResult, Study  # noqa: E402
from harness.report.evaluation import (  # noqa: E402
    NA,
    TEST,
    by_file,
    champion_key,
    champion_rows,
    default_client,
    fmt,
    fmt_ci,
    safe_name,
    save,
    task_models,
)
from harness.report.render import h, img, p, table  # noqa: E402
from harness.tracking import schema  # noqa: E402

TEST_INT8 = f"test{schema.INT8}"
RUNTIMES = (("onnx", "ONNX Runtime"), ("keras", "Keras"))  # the batch-1 latency the plot uses: the first present


def has_cost(m: ModelResult) -> bool:
    return any(k.startswith(schema.COST) for k in m.metrics)


def test_accuracy(m: ModelResult) -> dict:
    """Test accuracy with its exact Clopper-Pearson 95% CI: from the `test` rows (as the summary computes it), else
    the logged `test.accuracy`, `test.accuracy_cp_low/high`; {} without either."""
    rows = m.split(TEST)
    if rows:
        return accuracy_ci(np.array([str(r["true"]) == str(r["pred"]) for r in rows]), seed=0)
    mt = m.metrics
    if f"{schema.TEST}accuracy" not in mt:
        return {}
    return {
        "accuracy": mt[f"{schema.TEST}accuracy"],
        "accuracy_cp_low": mt.get(f"{schema.TEST}accuracy_cp_low", float("nan")),
        "accuracy_cp_high": mt.get(f"{schema.TEST}accuracy_cp_high", float("nan")),
        "n": mt.get(f"{schema.TEST}n"),
    }


def cost_point(m: ModelResult) -> dict | None:
    """What the plot shows of a model: batch-1 median latency (ONNX Runtime when measured, else Keras), the file
    size of that runtime's model, test accuracy and its exact CI; None without a latency or an accuracy."""
    mt = m.metrics
    runtime = next((r for r, _ in RUNTIMES if f"{schema.COST}{r}.b1.median_ms" in mt), None)
    acc = test_accuracy(m)
    if runtime is None or not acc or not np.isfinite(acc.get("accuracy", float("nan"))):
        return None
    return {
        "runtime": runtime,
        "latency_ms": float(mt[f"{schema.COST}{runtime}.b1.median_ms"]),
        "file_mb": mt.get(f"{schema.COST}{runtime}_file_mb", mt.get(f"{schema.COST}keras_file_mb")),
        **acc,
    }


def pareto_front(points: dict[str, tuple[float, float]]) -> set[str]:
    """The names whose (latency, accuracy) no other point dominates: none has latency <= and accuracy >= with one of
    the two strictly better. Points with a nan are never on it."""
    ok = {k: v for k, v in points.items() if np.all(np.isfinite(v))}
    return {
        k
        for k, (lat, acc) in ok.items()
        if not any(o != k and ol <= lat and oa >= acc and (ol < lat or oa > acc) for o, (ol, oa) in ok.items())
    }


def budget_excluded(study: Study, task: str, client=None) -> str | None:
    """The experiment's `harness.budget_excluded.<task>` text (the models the champion's latency budget excluded,
    and why): from `study.budget_excluded` where collect gives it, else read from the experiment's tags with the
    client (read-only); None where absent or unreadable."""
    given = getattr(study, "budget_excluded", None)
    if isinstance(given, dict):
        return given.get(task)
    try:
        exp = default_client(client).get_experiment(study.experiment_id)
        return (exp.tags or {}).get(f"{schema.BUDGET_EXCLUDED_PREFIX}{task}")
    except Exception:  # a store that cannot be read here: no line, no error
        return None


def _short(key: str, task: str) -> str:
    return key.removeprefix(f"{task}-")


def pareto_figure(points: dict[str, dict], front: set[str], champion: str | None, task: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [pt["file_mb"] for pt in points.values() if pt.get("file_mb") is not None and np.isfinite(pt["file_mb"])]
    biggest = max(sizes) if sizes else 1.0
    for key, pt in points.items():
        x, y = pt["latency_ms"], pt["accuracy"]
        lo, hi = pt.get("accuracy_cp_low", np.nan), pt.get("accuracy_cp_high", np.nan)
        if np.isfinite(lo) and np.isfinite(hi):
            ax.errorbar(x, y, yerr=[[max(y - lo, 0)], [max(hi - y, 0)]], fmt="none", ecolor="0.6", lw=1, capsize=3)
        mb = pt.get("file_mb")
        s = 40 + 400 * (mb / biggest if mb is not None and np.isfinite(mb) and biggest > 0 else 0.2)
        is_champ = key == champion
        ax.scatter(
            x,
            y,
            s=s,
            marker="*" if is_champ else "o",
            color="tab:red" if is_champ else ("tab:blue" if key in front else "tab:gray"),
            edgecolor="black",
            linewidth=0.6,
            alpha=0.8,
            zorder=3,
        )
        label = _short(key, task) + ("" if pt["runtime"] == "onnx" else " (Keras)")
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 5), fontsize=8)
    if len(front) > 1:
        fx = sorted((points[k]["latency_ms"], points[k]["accuracy"]) for k in front)
        ax.plot(*zip(*fx), ls="--", color="tab:blue", lw=1, zorder=2)
    handles = [
        plt.Line2D([], [], ls="--", marker="o", color="tab:blue", label="Pareto front"),
        plt.Line2D([], [], ls="", marker="o", color="tab:gray", label="dominated"),
    ]
    if champion in points:
        handles.append(plt.Line2D([], [], ls="", marker="*", ms=12, color="tab:red", label="champion"))
    ax.legend(handles=handles, loc="lower right", fontsize=8, frameon=False)
    lat = [pt["latency_ms"] for pt in points.values()]
    if min(lat) > 0 and max(lat) / min(lat) > 10:
        ax.set_xscale("log")
    ax.set_xlabel("batch-1 median latency (ms, ONNX Runtime unless marked)")
    ax.set_ylabel("test accuracy (exact 95% CI)")
    ax.set_title(f"{task}: accuracy against latency (marker area ∝ file size)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save(fig, path)


def _ms(mt: dict, runtime: str, batch: int) -> str:
    med, p95 = (mt.get(f"{schema.COST}{runtime}.b{batch}.{s}_ms") for s in ("median", "p95"))
    return NA if med is None and p95 is None else f"{fmt(med, 1)} / {fmt(p95, 1)}"


def _mb(mt: dict, *names: str) -> str:
    vals = [mt.get(f"{schema.COST}{n}_file_mb") for n in names]
    return NA if all(v is None for v in vals) else " / ".join(fmt(v, 1) for v in vals)


def int8_comparison(m: ModelResult) -> dict | None:
    """Float against INT8 on the same test images: accuracies with exact CIs and the exact McNemar test (a: float,
    b: INT8) from the `test` and `test_int8` rows; without the rows, the logged `test_int8.accuracy` alone."""
    f, q = by_file(m.split(TEST)), by_file(m.split(TEST_INT8))
    if f and q and set(f) == set(q):
        files = sorted(f)
        cf = np.array([str(f[x]["true"]) == str(f[x]["pred"]) for x in files])
        cq = np.array([str(q[x]["true"]) == str(q[x]["pred"]) for x in files])
        return {"float": accuracy_ci(cf), "int8": accuracy_ci(cq), "mcnemar": mcnemar(cf, cq)}
    if f"{TEST_INT8}.accuracy" in m.metrics:
        mt = m.metrics
        return {
            "float": test_accuracy(m),
            "int8": {
                k: mt.get(f"{TEST_INT8}.{k}", float("nan")) for k in ("accuracy", "accuracy_cp_low", "accuracy_cp_high")
            },
            "mcnemar": None,
        }
    return None


def parity_text(x) -> str:
    """The largest probability difference: 4 decimals, or 2 significant digits below 0.001 (float32 noise)."""
    if x is None or not np.isfinite(x):
        return NA
    return f"{x:.1e}" if 0 < abs(x) < 1e-3 else fmt(x, 4)


def _acc(a: dict | None) -> str:
    a = a or {}
    return fmt_ci(a.get("accuracy"), a.get("accuracy_cp_low"), a.get("accuracy_cp_high"))


def cost_sections(study: Study, task: str, out: Path, *, level: int = 3, client=None) -> list:
    """The serving-cost blocks of one task: the accuracy-latency Pareto plot, the cost table, the export-fidelity
    table (ONNX parity, INT8 against float) and the budget-excluded line, each where its data is logged; [] for a
    store without any. `client` reads the experiment's tags (read-only; default: the harness's MLflow client)."""
    models = [m for m in task_models(study, task) if has_cost(m)]
    excluded = budget_excluded(study, task, client)
    if not models and not excluded:
        return []
    out = Path(out)
    champion = champion_key(study, task, task_models(study, task))
    points = {m.key: pt for m in models if (pt := cost_point(m)) is not None}
    front = pareto_front({k: (pt["latency_ms"], pt["accuracy"]) for k, pt in points.items()})
    blocks = [h(f"Serving cost — {task}", level)]
    if points:
        blocks += [
            p(
                "Test accuracy (exact Clopper-Pearson 95% CI) against the median milliseconds of one batch-1 call "
                "(ONNX Runtime where exported, else Keras), as the final stage measured it on its machine; "
                "marker area by model file size. The Pareto front: the models no other beats on both (as fast or "
                "faster and as accurate or more, one strictly)."
                + (f" ★ the champion {champion}." if champion in points else "")
            ),
            img(
                pareto_figure(points, front, champion, task, out / f"pareto-{safe_name(task)}.png"),
                f"{task}: test accuracy against batch-1 latency, Pareto front connected",
            ),
        ]
    if models:
        rows = [
            [
                m.key + (" ★" if m.key == champion else ""),
                fmt(m.metrics[f"{schema.COST}params"] / 1e6, 2) if f"{schema.COST}params" in m.metrics else NA,
                _mb(m.metrics, "keras", "onnx"),
                _ms(m.metrics, "keras", 1),
                _ms(m.metrics, "onnx", 1),
                _ms(m.metrics, "keras", 32),
                _ms(m.metrics, "onnx", 32),
                ("yes" if m.key in front else "no") if m.key in points else NA,
            ]
            for m in models
        ]
        blocks += [
            p("Latency cells: median / p95 milliseconds per call, at batch 1 (b1) and 32 (b32)."),
            table(
                ["model", "params (M)", "MB Keras / ONNX", "b1 Keras", "b1 ONNX", "b32 Keras", "b32 ONNX", "Pareto"],
                rows,
                f"cost-{task}",
                marked=champion_rows([m.key for m in models], champion),
            ),
        ]
        fidelity = []
        for m in models:
            parity = m.metrics.get(schema.ONNX_PARITY, m.metrics.get(f"{schema.COST}onnx.parity"))
            q = int8_comparison(m)
            has_int8 = q is not None or any(k.startswith(f"{schema.COST}int8") for k in m.metrics)
            if parity is None and not has_int8:
                continue
            mc = (q or {}).get("mcnemar")
            fidelity.append(
                [
                    m.key + (" ★" if m.key == champion else ""),
                    parity_text(parity),
                    _acc(q["float"]) if q else NA,
                    _acc(q["int8"]) if q else NA,
                    f"{mc['a_only']} / {mc['b_only']}" if mc else NA,
                    fmt(mc["p_value"], 4) if mc else NA,
                    _ms(m.metrics, "int8", 1),
                    _mb(m.metrics, "int8"),
                ]
            )
        if fidelity:
            blocks += [
                p(
                    "The exports against the Keras model: ONNX parity is the largest absolute probability "
                    "difference from Keras on the test images; the INT8 (dynamic-quantized ONNX) model's test "
                    "accuracy paired with the float model's on the same images, exact McNemar test on the images "
                    "exactly one of them gets right."
                ),
                table(
                    ["model", "ONNX max Δp", "float acc. [95% CI]", "INT8 acc. [95% CI]"]
                    + ["only float / INT8 right", "McNemar p", "b1 INT8", "MB INT8"],
                    fidelity,
                    f"export-{task}",
                    marked=tuple(i for i, r in enumerate(fidelity) if r[0].endswith(" ★")),
                ),
            ]
    if excluded:
        blocks += [
            p(f"Excluded by the champion's latency budget: {line.strip()}")
            for line in str(excluded).splitlines()
            if line.strip()
        ]
    return blocks
