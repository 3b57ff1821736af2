"""The report's evaluation and serving-cost sections on hand-made studies (no TensorFlow, no MLflow store): nothing
shown and no error where nothing is logged, and numbers that agree with the evaluation functions on the rows."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from harness.evaluation import calibration, clinical
from harness.evaluation.metrics import accuracy_ci, mcnemar
from harness.report.collect import ModelResult, Study
from harness.report.cost import cost_sections, pareto_front
from harness.report.evaluation import evaluation_sections, failure_analysis, fmt, fmt_ci
from harness.report.render import to_html, to_markdown
from harness.tracking import schema

TASK = "task2"
CLASSES = ["covid", "normal", "pneumonia"]
KEYS = ["task2-a", "task2-b", "task2-c"]
CHAMPION = "task2-b"
N = 40
SEED = 3


def _rows(split: str, files: list[str], y: np.ndarray, proba: np.ndarray) -> list[dict]:
    proba = np.round(proba, 6)
    return [
        {
            "file": f,
            "split": split,
            "true": CLASSES[y[i]],
            "pred": CLASSES[int(proba[i].argmax())],
            "mode": "L",
            **{f"p.{c}": float(proba[i, k]) for k, c in enumerate(CLASSES)},
        }
        for i, f in enumerate(files)
    ]


def _proba(rng, y: np.ndarray, strength: float, wrong: np.ndarray) -> np.ndarray:
    """Softmax probabilities leaning to the true class, and to the next class on the `wrong` images."""
    logits = rng.normal(0, 1, (len(y), len(CLASSES)))
    target = np.where(wrong, (y + 1) % len(CLASSES), y)
    logits[np.arange(len(y)), target] += strength
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _run(run_id: str, metrics: dict | None = None, tags: dict | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        data=SimpleNamespace(metrics=metrics or {}, tags=tags or {}, params={"data.seed": str(SEED)}),
        info=SimpleNamespace(run_id=run_id),
    )


def _model(key: str, predictions: list[dict], metrics: dict | None = None, tags: dict | None = None) -> ModelResult:
    return ModelResult(
        key=key,
        task=TASK,
        backbone=key.split("-")[-1],
        run=_run(f"run-{key}", metrics, {schema.TASK: TASK, schema.MODEL_KEY: key, **(tags or {})}),
        predictions=predictions,
        embeddings={},
        data={"classes": CLASSES},
        history={},
    )


def _study(models: list[ModelResult], champion: str | None = CHAMPION) -> Study:
    champions = {TASK: {"model_key": champion, "uri": f"models:/s-{TASK}@champion"}} if champion else {}
    return Study("s", "1", models, [], [], champions)


class FakeClient:
    """The read-only client calls the sections make: artifact lists and experiment tags."""

    def __init__(self, artifacts: dict | None = None, tags: dict | None = None, fail: bool = False):
        self.artifacts, self.tags, self.fail = artifacts or {}, tags or {}, fail

    def list_artifacts(self, run_id):
        if self.fail:
            raise RuntimeError("store unreachable")
        return [SimpleNamespace(path=a) for a in self.artifacts.get(run_id, [])]

    def get_experiment(self, experiment_id):
        if self.fail:
            raise RuntimeError("store unreachable")
        return SimpleNamespace(tags=self.tags)


def _full_study(rows_only: bool = False, root: str = "/nowhere") -> tuple[Study, dict]:
    """3 models x N test images (files that do not exist here): the first 14 images wrong for every model, 3 more
    wrong for the champion only; with temperature-scaled, INT8 and out-of-fold rows and the final stage's metrics."""
    rng = np.random.default_rng(0)
    files = [f"{root}/{CLASSES[i % 3]}/img{i:03d}.png" for i in range(N)]
    y = np.arange(N) % 3
    all_wrong = np.arange(N) < 14
    models, truth = [], {}
    for j, key in enumerate(KEYS):
        wrong = all_wrong | ((np.arange(N) >= 14) & (np.arange(N) < 17) & (key == CHAMPION))
        p_test = _proba(rng, y, 3.0 + j, wrong)
        t = 1.3 + 0.2 * j
        p_cal = calibration.apply_temperature(p_test, t)
        p_int8 = p_test.copy()
        p_int8[20 + j] = np.roll(p_int8[20 + j], 1)  # the INT8 model changes one image's prediction
        y_val = rng.integers(0, 3, 60)
        p_val = _proba(rng, y_val, 3.0, np.zeros(60, bool))
        rows = _rows("test", files, y, p_test)
        metrics, tags = {}, {}
        if not rows_only:
            rows += _rows("test_calibrated", files, y, p_cal) + _rows("test_int8", files, y, p_int8)
            rows += _rows("val", [f"/nowhere/val{i}.png" for i in range(60)], y_val, p_val)
            score_val, pos_val = p_val[:, 0], y_val == 0
            thr = clinical.threshold_for_sensitivity(score_val, pos_val, 0.9)
            op_test = clinical.operating_metrics(np.round(p_test, 6)[:, 0], y == 0, thr)
            metrics = {
                schema.TEMPERATURE: t,
                f"{schema.OP}threshold": thr,
                f"{schema.OP}target_sensitivity": 0.9,
                f"{schema.OP}val.sensitivity": clinical.operating_metrics(score_val, pos_val, thr)["sensitivity"],
                **{f"{schema.OP}test.{k}": v for k, v in op_test.items() if k != "threshold"},
                f"{schema.COST}params": 4.0e6 * (j + 1),
                f"{schema.COST}keras_file_mb": 16.0 * (j + 1),
                f"{schema.COST}onnx_file_mb": 15.0 * (j + 1),
                **{
                    f"{schema.COST}{rt}.b{b}.{s}_ms": (j + 1)
                    * b
                    * (1.0 if rt == "onnx" else 2.0)
                    * (1.5 if s == "p95" else 1)
                    for rt in ("keras", "onnx")
                    for b in (1, 32)
                    for s in ("median", "p95")
                },
                schema.ONNX_PARITY: 1e-5 * (j + 1),
            }
            tags = {schema.OP_CLASS: "covid"}
            truth[key] = {"op_test": op_test, "t": t}
        models.append(_model(key, rows, metrics, tags))
    return _study(models), {"files": files, "y": y, **truth}


def _tables(blocks: list) -> dict[str, tuple[list, list]]:
    return {b[3]: (b[1], b[2]) for b in blocks if b[0] == "table"}


def _text(blocks: list) -> str:
    return "\n".join(str(b[1] if b[0] == "p" else b[2]) for b in blocks if b[0] in ("p", "h"))


def _row(rows: list, key: str) -> list:
    return next(r for r in rows if r[0].split(" ")[0] == key)


def test_sections_are_empty_without_error_when_nothing_is_logged(tmp_path):
    bare = _study([_model(k, []) for k in KEYS], champion=None)
    for client in (FakeClient(), FakeClient(fail=True)):
        assert evaluation_sections(bare, TASK, tmp_path, client=client) == []
        assert cost_sections(bare, TASK, tmp_path, client=client) == []
    assert evaluation_sections(_study([]), TASK, tmp_path, client=FakeClient()) == []
    assert cost_sections(_study([]), TASK, tmp_path, client=FakeClient()) == []
    assert list(tmp_path.iterdir()) == []


def test_older_store_with_test_rows_only_gets_no_operating_decision_or_cost_blocks(tmp_path):
    study, _ = _full_study(rows_only=True)
    blocks = evaluation_sections(study, TASK, tmp_path, client=FakeClient())
    heads = [b[2] for b in blocks if b[0] == "h"]
    assert heads == [f"Calibration — {TASK}", f"Failure analysis — {TASK}"]
    cal_headers, cal_rows = _tables(blocks)[f"calibration-{TASK}"]
    assert cal_headers == ["model", "test n", "ECE [95% CI]", "Brier"]  # no temperature: no scaled columns
    assert "no temperature scaling logged" in _text(blocks)
    assert cost_sections(study, TASK, tmp_path, client=FakeClient()) == []


def test_calibration_table_ece_and_brier_equal_ece_ci_and_brier_recomputed_from_rows(tmp_path):
    study, truth = _full_study()
    blocks = evaluation_sections(study, TASK, tmp_path, client=FakeClient(), gradcam=False)
    headers, rows = _tables(blocks)[f"calibration-{TASK}"]
    assert len(headers) <= 8
    for m in study.models:
        test = m.split("test")
        y = np.array([CLASSES.index(r["true"]) for r in test])
        for split, ece_col, brier_col in (("test", 3, 4), ("test_calibrated", 5, 6)):
            proba = np.array([[r[f"p.{c}"] for c in CLASSES] for r in m.split(split)])
            proba = proba / proba.sum(axis=1, keepdims=True)
            e = calibration.ece_ci(proba, y, seed=SEED)
            row = _row(rows, m.key)
            assert row[ece_col] == fmt_ci(e["ece"], e["ece_ci_low"], e["ece_ci_high"])
            assert row[brier_col] == fmt(calibration.brier(proba, y))
        assert _row(rows, m.key)[2] == fmt(truth[m.key]["t"], 2)
    assert CHAMPION + " ★" in [r[0] for r in rows]
    figure = [b for b in blocks if b[0] == "img" and "Reliability" in b[2]]
    assert len(figure) == 1 and figure[0][1].is_file() and figure[0][1].parent == tmp_path


def test_calibration_falls_back_to_logged_metrics_without_rows(tmp_path):
    logged = {
        schema.TEMPERATURE: 1.7,
        "test.ece": 0.12,
        "test.ece_ci_low": 0.08,
        "test.ece_ci_high": 0.2,
        "test.brier": 0.3,
        "test_calibrated.ece": 0.05,
        "test_calibrated.ece_ci_low": 0.03,
        "test_calibrated.ece_ci_high": 0.1,
        "test_calibrated.brier": 0.25,
    }
    study = _study([_model("task2-a", [], logged)], champion="task2-a")
    blocks = evaluation_sections(study, TASK, tmp_path, client=FakeClient())
    (row,) = _tables(blocks)[f"calibration-{TASK}"][1]
    assert row[2:] == ["1.70", "0.120 [0.080, 0.200]", "0.300", "0.050 [0.030, 0.100]", "0.250"]
    assert "(logged)" in row[0]


def test_operating_point_table_shows_the_logged_test_metrics_and_says_threshold_is_out_of_fold(tmp_path):
    study, truth = _full_study()
    blocks = evaluation_sections(study, TASK, tmp_path, client=FakeClient(), gradcam=False)
    headers, rows = _tables(blocks)[f"operating-{TASK}"]
    assert len(headers) <= 8
    for m in study.models:
        op = truth[m.key]["op_test"]
        row = _row(rows, m.key)
        assert row[1] == fmt(m.metrics[f"{schema.OP}threshold"])
        assert row[2].startswith("0.90 / ")
        for col, k in zip(range(3, 7), ("sensitivity", "specificity", "ppv", "npv")):
            assert row[col] == fmt_ci(op[k], op[f"{k}_ci_low"], op[f"{k}_ci_high"])
        assert row[7] == f"{op['tp']}/{op['fp']}/{op['tn']}/{op['fn']}"
    text = _text(blocks)
    assert "out-of-fold" in text and "never on the test split" in text


def test_decision_curve_drawn_for_the_operating_class_from_scaled_probabilities(tmp_path):
    study, _ = _full_study()
    blocks = evaluation_sections(study, TASK, tmp_path, client=FakeClient(), gradcam=False)
    figure = [b for b in blocks if b[0] == "img" and "Decision curves" in b[2]]
    assert len(figure) == 1 and figure[0][1].is_file() and "covid" in figure[0][2]
    assert "T-scaled" in _text(blocks)


def test_failure_sets_match_clinical_failures_on_the_rows(tmp_path):
    study, truth = _full_study()
    found = failure_analysis(study.models, CHAMPION)
    files = sorted(truth["files"])
    correct = {
        m.key: np.array([next(r for r in m.split("test") if r["file"] == f) for f in files]) for m in study.models
    }
    correct = {k: np.array([r["true"] == r["pred"] for r in rs]) for k, rs in correct.items()}
    expected = clinical.failures(correct, CHAMPION)
    assert found["all_wrong"] == [files[i] for i in expected["all_wrong"]]
    assert found["only_champion_wrong"] == [files[i] for i in expected["only_champion_wrong"]]
    assert len(found["all_wrong"]) >= 14 and len(found["only_champion_wrong"]) >= 1

    blocks = evaluation_sections(study, TASK, tmp_path, client=FakeClient())
    tables = _tables(blocks)
    headers, rows = tables[f"failures-all-{TASK}"]
    assert headers[:3] == ["file", "true", f"{CHAMPION} ★"] and len(headers) <= 8
    assert len(rows) == 12 and {r[0] for r in rows} <= {Path(f).name for f in found["all_wrong"]}
    assert f"… and {len(found['all_wrong']) - 12} more." in _text(blocks)
    _, only = tables[f"failures-champion-{TASK}"]
    assert {r[0] for r in only} == {Path(f).name for f in found["only_champion_wrong"]}
    # The images are not on this machine: Grad-CAM says so in one line instead of loading the model.
    assert "Grad-CAM of the failure images skipped: their image files are not readable here" in _text(blocks)


def _readable_study(tmp_path) -> Study:
    study, truth = _full_study(root=str(tmp_path / "images"))
    for f in truth["files"]:
        Path(f).parent.mkdir(parents=True, exist_ok=True)
        Path(f).write_bytes(b"an image")
    return study


def test_failure_gradcam_draws_the_champions_maps_on_its_most_confident_errors(tmp_path, monkeypatch):
    import harness.evaluation.gradcam as gradcam_module
    import harness.serving.predict as predict

    study = _readable_study(tmp_path)
    calls = {}

    class Model:
        def unwrap_python_model(self):
            return SimpleNamespace(model="the keras model")

    def load(uri):
        calls["uri"] = uri
        return Model(), {"classes": CLASSES, "image_size": 8, "colour": "grey"}

    def decode(cfg, files):
        calls["files"] = files
        return files, np.full((len(files), 8, 8, 3), 128, np.uint8), []

    def cams(model, images, class_index, n_classes):
        calls["class_index"] = class_index
        return np.tile(np.linspace(0, 1, 8), (len(images), 8, 1))

    monkeypatch.setattr(predict, "load_for_images", load)
    monkeypatch.setattr(predict, "decode_for", decode)
    monkeypatch.setattr(gradcam_module, "gradcam", cams)
    blocks = evaluation_sections(study, TASK, tmp_path / "out", client=FakeClient())
    assert calls["uri"] == f"runs:/run-{CHAMPION}/model"
    found = failure_analysis(study.models, CHAMPION)
    champ = {r["file"]: r for r in study.models[KEYS.index(CHAMPION)].split("test")}
    shown = [str(f) for f in calls["files"]]
    assert len(shown) == 8 and set(shown) <= set(found["all_wrong"])  # 14 wrong for all: the first 8 of them
    confidence = [champ[f][f"p.{champ[f]['pred']}"] for f in shown]
    assert confidence == sorted(confidence, reverse=True)
    assert list(calls["class_index"]) == [CLASSES.index(champ[f]["pred"]) for f in shown]
    figure = [b for b in blocks if b[0] == "img" and "Grad-CAM" in b[2]]
    assert len(figure) == 1 and figure[0][1].is_file()


def test_failure_gradcam_says_why_in_one_line_when_the_model_cannot_be_loaded(tmp_path, monkeypatch):
    import harness.serving.predict as predict
    from harness.errors import HarnessError

    def load(uri):
        raise HarnessError(f"{uri}: cannot load (no such run)")

    monkeypatch.setattr(predict, "load_for_images", load)
    blocks = evaluation_sections(_readable_study(tmp_path), TASK, tmp_path / "out", client=FakeClient())
    assert f"Grad-CAM of the failure images skipped: runs:/run-{CHAMPION}/model: cannot load" in _text(blocks)
    assert not [b for b in blocks if b[0] == "img" and "Grad-CAM" in b[2]]


def test_model_card_line_per_model_whose_run_has_the_artifact(tmp_path):
    study, _ = _full_study()
    client = FakeClient(artifacts={"run-task2-a": [schema.MODEL_CARD, "model"], "run-task2-c": ["model"]})
    text = _text(evaluation_sections(study, TASK, tmp_path, client=client, gradcam=False))
    assert f"task2-a: runs:/run-task2-a/{schema.MODEL_CARD}" in text
    assert "run-task2-c/model_card" not in text and "run-task2-b/model_card" not in text


@pytest.mark.parametrize(
    "points, front",
    [
        (
            {
                "a": (10.0, 0.90),
                "b": (5.0, 0.85),
                "c": (20.0, 0.88),  # slower and less accurate than a
                "d": (5.0, 0.80),  # as fast as b, less accurate
                "e": (2.0, 0.70),  # fastest
                "f": (10.0, 0.90),  # ties a: neither dominates
                "g": (float("nan"), 0.99),  # no latency: never on it
            },
            {"a", "b", "e", "f"},
        ),
        ({"only": (3.0, 0.5)}, {"only"}),
        ({}, set()),
    ],
)
def test_pareto_front_is_exactly_the_non_dominated_models(points, front):
    assert pareto_front(points) == front


def test_cost_table_marks_pareto_models_and_pairs_int8_with_float_by_exact_mcnemar(tmp_path):
    study, truth = _full_study()
    # A hand-made trade-off: a fast and accurate, b slow and more accurate, c slower than b and less accurate.
    acc = {
        m.key: np.mean([r["true"] == r["pred"] for r in m.split("test")]) for m in study.models
    }  # b is the least accurate (3 more errors), so make it the fastest to keep it on the front
    assert acc["task2-b"] < min(acc["task2-a"], acc["task2-c"])
    latency = {"task2-a": 4.0, "task2-b": 2.0, "task2-c": 8.0}
    for m in study.models:
        m.metrics[f"{schema.COST}onnx.b1.median_ms"] = latency[m.key]
    expected = pareto_front({k: (latency[k], acc[k]) for k in KEYS})
    blocks = cost_sections(study, TASK, tmp_path, client=FakeClient())
    tables = _tables(blocks)
    headers, rows = tables[f"cost-{TASK}"]
    assert len(headers) <= 8
    assert {r[0].split(" ")[0] for r in rows if r[-1] == "yes"} == expected
    assert {r[0].split(" ")[0] for r in rows if r[-1] == "no"} == set(KEYS) - expected
    headers, rows = tables[f"export-{TASK}"]
    assert len(headers) <= 8
    for m in study.models:
        files = sorted(truth["files"])
        f = {r["file"]: r["true"] == r["pred"] for r in m.split("test")}
        q = {r["file"]: r["true"] == r["pred"] for r in m.split("test_int8")}
        cf, cq = np.array([f[x] for x in files]), np.array([q[x] for x in files])
        res, a, b = mcnemar(cf, cq), accuracy_ci(cf), accuracy_ci(cq)
        row = _row(rows, m.key)
        assert row[2] == fmt_ci(a["accuracy"], a["accuracy_cp_low"], a["accuracy_cp_high"])
        assert row[3] == fmt_ci(b["accuracy"], b["accuracy_cp_low"], b["accuracy_cp_high"])
        assert row[4] == f"{res['a_only']} / {res['b_only']}" and row[5] == fmt(res["p_value"], 4)
    figure = [b for b in blocks if b[0] == "img"]
    assert len(figure) == 1 and figure[0][1].is_file()


def test_budget_excluded_line_appears_when_the_experiment_tag_is_set(tmp_path):
    study, _ = _full_study()
    words = "task2-c: batch-1 median 24.0 ms over the 20 ms budget"
    client = FakeClient(tags={f"{schema.BUDGET_EXCLUDED_PREFIX}{TASK}": words, "harness.budget_excluded.task1": "x"})
    text = _text(cost_sections(study, TASK, tmp_path, client=client))
    assert f"Excluded by the champion's latency budget: {words}" in text and ": x" not in text
    assert "latency budget" not in _text(cost_sections(study, TASK, tmp_path, client=FakeClient()))
    # Without any cost metrics, the line alone still makes the section.
    bare = _study([_model(k, []) for k in KEYS])
    assert words in _text(cost_sections(bare, TASK, tmp_path, client=client))


def test_sections_render_to_markdown_and_html_with_their_figures(tmp_path):
    study, _ = _full_study()
    blocks = evaluation_sections(study, TASK, tmp_path, client=FakeClient(), gradcam=False)
    blocks += cost_sections(study, TASK, tmp_path, client=FakeClient())
    md = to_markdown(blocks, tmp_path)
    for name in (f"reliability-{TASK}.png", f"decision-{TASK}.png", f"pareto-{TASK}.png"):
        assert f"]({name})" in md
    assert "<table id='cost-task2'>" in to_html(blocks, "t")
