"""The report reads answer first: per task one sentence and a forest plot on the first screen at 1280 px, rows in the
order of the selection objective with the champion marked, exact CIs, legible figures (integer trial axes counted as
the tables count, no one-point curves), Grad-CAM against an even spread, one line for a single-source audit and for a
skipped model, and no table wider than the page (measured in headless Chromium, every <details> opened)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.report import answer, figures, per_model, provenance, sections
from harness.report.collect import ModelResult, Study
from harness.report.common import ordered
from harness.report.common import test_metrics as recomputed
from harness.report.render import to_markdown
from harness.tracking import schema

from conftest import own_store, use_module_store, write_recipe

CLASSES = ["covid", "normal"]


def _rows(n: int, right: int, offset: int = 0) -> list[dict]:
    """n test predictions, the first `right` of them correct (files shared across models, so they pair)."""
    rows = []
    for i in range(n):
        true = CLASSES[i % 2]
        pred = true if i < right else CLASSES[(i + 1) % 2]
        p_true = 0.9 if pred == true else 0.2
        proba = {c: (p_true if c == true else 1 - p_true) for c in CLASSES}
        rows.append({"file": f"/x/{i + offset}.png", "split": "test", "true": true, "pred": pred, "mode": "L"})
        rows[-1].update({f"p.{c}": v for c, v in proba.items()})
    return rows


def _model(key: str, right: int, val_loss: float | None, n: int = 12, **fields) -> ModelResult:
    metrics = {} if val_loss is None else {f"{schema.SEARCH_PREFIX}val_loss": val_loss}
    run = SimpleNamespace(
        data=SimpleNamespace(metrics=metrics, tags={schema.TASK: "task1", schema.MODEL_KEY: key}, params={}),
        info=SimpleNamespace(run_id=f"run-{key}"),
    )
    return ModelResult(
        key=key,
        task="task1",
        backbone=key.split("-", 1)[1],
        run=run,
        predictions=_rows(n, right),
        embeddings={},
        data={"classes": CLASSES, "modes": {c: {"L": n} for c in CLASSES}},
        history=fields.pop("history", {}),
        **fields,
    )


def _study(models: list[ModelResult], champion: str | None) -> Study:
    champions = {"task1": {"model_key": champion, "value": 0.01, "objective": "val_loss"}} if champion else {}
    return Study("s", "1", models, [], [], champions)


def _summary_rows(blocks: list, task: str = "task1") -> tuple[list, list, tuple]:
    (tab,) = [b for b in blocks if b[0] == "table" and b[3] == f"summary-{task}"]
    return tab[1], tab[2], tab[4]


def test_rows_follow_the_selection_objective_and_the_champion_is_marked(tmp_path):
    # Test accuracy in the opposite order of the validation objective: the table must not follow it.
    models = [_model("task1-a", 12, 0.30), _model("task1-b", 11, 0.20), _model("task1-c", 10, 0.01)]
    study = _study(models, "task1-c")
    computed = {m.key: recomputed(m) for m in models}
    blocks = answer.summary(study, computed, tmp_path)
    headers, rows, marked = _summary_rows(blocks)
    assert [r[0] for r in rows] == ["task1-c", "task1-b", "task1-a"]
    assert [r[1] for r in rows] == ["0.0100", "0.2000", "0.3000"]
    assert marked == (0,) and rows[0][-1] == answer.CHAMPION_MARK and not any(r[-1] for r in rows[1:])
    assert "COVID-19 sensitivity" in headers
    sentence = next(b[1] for b in blocks if b[0] == "p" and b[2] == "answer")
    assert sentence.startswith("task1-c is the champion (the best val_loss of 3 models, 0.0100)")
    assert "0.833 [0.516, 0.979]" in sentence and "the runner-up task1-b (0.917, exact McNemar p=" in sentence
    assert "no nested estimate" in sentence
    assert (tmp_path / "forest-task1.png").stat().st_size > 0
    # Without a champion alias the first by the objective leads, and nothing claims to be the champion.
    unmarked = answer.summary(_study(models, None), computed, tmp_path)
    assert _summary_rows(unmarked)[2] == () and "leads by val_loss" in to_markdown(unmarked, tmp_path)


def test_accuracy_cis_are_exact_never_a_degenerate_bootstrap(tmp_path):
    perfect = _model("task1-a", 12, 0.01)
    floor_rows = _rows(12, 9)
    perfect.baseline = SimpleNamespace(
        data=SimpleNamespace(
            metrics={
                "test.accuracy": 0.75,
                "test.accuracy_cp_low": 0.428,
                "test.accuracy_cp_high": 0.945,
                "cv_accuracy": 0.8,
                "cv_accuracy_std": 0.1,
            }
        )
    )
    perfect.baseline_predictions = floor_rows
    study = _study([perfect, _model("task1-b", 11, 0.02)], "task1-a")
    computed = {m.key: recomputed(m) for m in study.models}
    md = to_markdown(answer.summary(study, computed, tmp_path) + sections.floor(study.models, computed), tmp_path)
    assert "1.000 [0.735, 1.000]" in md  # 12 of 12: Clopper-Pearson
    # accuracy CIs are exact (no degenerate bootstrap); the one bootstrap CI left is the calibration error's
    assert "[1.000, 1.000]" not in md
    assert all("ECE" in line for line in md.splitlines() if "bootstrap" in line)
    assert "0.750 [0.428, 0.945]" in md  # the floor's exact CI as logged


def test_tuning_axis_counts_trials_as_the_tables_count(tmp_path, monkeypatch):
    trials = [
        {"trial": f"{i:02d}", "status": "FINISHED", "objective": 1.0 / (i + 1), "seconds": 1.0, "stage": "head"}
        for i in range(12)
    ]
    m = _model("task1-a", 12, 0.01, trials=trials)
    m.search = SimpleNamespace(data=SimpleNamespace(params={schema.SEARCH_OBJECTIVE: "val_loss"}, metrics={}, tags={}))
    captured = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: captured.append(fig) or path)
    blocks = per_model.tuning(m, tmp_path)
    (ax,) = captured[0].axes
    xs = ax.collections[0].get_offsets()[:, 0]
    assert list(xs) == list(range(12))  # Keras Tuner's ids, from 0, as the table numbers them
    ticks = [t for t in ax.get_xticks() if xs.min() - 0.5 <= t <= xs.max() + 0.5]
    assert ticks and all(float(t).is_integer() for t in ticks)
    (tab,) = [b for b in blocks if b[0] == "table"]
    assert [r[0] for r in tab[2]] == [11, 10, 9, 8, 7]  # the best five, numbered as in the figure
    assert "pruned" not in tab[1]


def test_no_one_point_curve(tmp_path):
    one = _model("task1-a", 12, 0.01, history={"loss": [0.5], "val_loss": [0.4], "accuracy": [0.8]})
    assert figures.curves(one, tmp_path / "c.png") is None
    (block,) = per_model.curves(one, tmp_path)
    assert block[0] == "p" and "one point is no curve" in block[1]
    two = _model("task1-b", 12, 0.01, history={"loss": [0.5, 0.4], "val_loss": [0.4]})
    (block,) = per_model.curves(two, tmp_path)
    assert block[0] == "img" and Path(block[1]).stat().st_size > 0


def test_gradcam_reads_against_an_even_spread():
    from harness.evaluation.gradcam import LUNG_BOX, outside_share

    even = sections.even_spread_share(96)
    assert even == pytest.approx(float(outside_share(np.ones((1, 96, 96)))[0]))
    left, top, right, bottom = LUNG_BOX
    assert sections.even_spread_share(None) == pytest.approx(1 - (right - left) * (bottom - top))
    assert sections.gradcam_reading(0.52, even).startswith("more outside than an even spread")
    assert sections.gradcam_reading(0.40, even).startswith("less outside than an even spread")
    assert sections.gradcam_reading(even + 0.01, even).startswith("about as an even spread")
    m = _model("task1-a", 12, 0.01, gradcam={"outside_lung_share": {"covid": 0.47, "normal": 0.6}})
    m.run.data.params["model.image_size"] = "96"
    (block,) = sections.gradcam([m])
    md = to_markdown([block], Path("."))
    assert "mostly outside" not in md and "50%" not in md
    assert f"| task1-a | {even:.2f} | 0.47 (≈ even) | 0.60 (more outside) |" in md
    assert "More outside than an even spread: task1-a (normal 0.60): look at the overlays" in md


def test_a_single_source_audit_says_why_in_one_line():
    audit = {
        "meta": {"accuracy": 0.5, "accuracy_cp_low": 0.3, "accuracy_cp_high": 0.7, "n": 36},
        "meta_per_class": {c: {"recall": 0.5, "precision": 0.5} for c in CLASSES},
        "signature": ["mode=L", "bits"],
    }
    models = [_model("task1-a", 12, 0.01, audit=audit), _model("task1-b", 11, 0.02, audit=audit)]
    computed = {m.key: recomputed(m) for m in models}
    md = to_markdown(provenance.audit(models, computed), Path("."))
    assert md.count("one source only") == 1 and "same original colour mode (L)" in md
    assert "| task1-a |" not in md  # no table of cells that all say the same


def test_a_skipped_model_is_one_short_line():
    reason = (
        "ImageNet weights for vgg19 are not in /root/.keras/models and could not be fetched from "
        "http://127.0.0.1:9/keras-applications/vgg19/vgg19_notop.h5 ([Errno 111] Connection refused"
        "): place vgg19_notop.h5 there (download it on a connected machine), set "
        "HARNESS_WEIGHTS_MIRROR or the recipe's weights_mirror to a copy, or use weights: none or a file path"
    )
    study = Study("s", "1", [_model("task1-a", 12, 0.01)], [f"task1-vgg19 (skipped: {reason})", "task2-x"], [])
    (line,) = answer.absent_lines(study, "task1")
    assert line[1].startswith("Not in this report: task1-vgg19 (skipped: ImageNet weights for vgg19 are not in")
    assert "127.0.0.1:9)" in line[1] and "keras-applications" not in line[1] and len(line[1]) < 200
    (other,) = answer.absent_lines(study, None)
    assert other[1] == "Not in this report: task2-x (no final run yet)."


def test_ordered_puts_unchosen_models_last():
    models = [_model("task1-t", 12, None), _model("task1-b", 11, 0.2), _model("task1-a", 10, 0.2)]
    assert [m.key for m in ordered(models)] == ["task1-a", "task1-b", "task1-t"]


# --- the page in headless Chromium ------------------------------------------------------------------------------

PROBE = """<script>
window.addEventListener('load', () => {
  const rect = el => el ? el.getBoundingClientRect().toJSON() : null;
  const r = {page: document.documentElement.clientWidth, answer: null, forest: null};
  const answer = document.querySelector('p.answer');
  r.answer = rect(answer); r.answer_text = answer ? answer.textContent : '';
  r.forest = rect(document.getElementById('forest-task1'));
  r.images = [...document.images].every(i => i.complete && i.naturalWidth > 0);
  document.querySelectorAll('details').forEach(d => { d.open = true; });
  r.details = document.querySelectorAll('details').length;
  r.tables = [...document.querySelectorAll('table')].map(t => ({id: t.id, width: t.getBoundingClientRect().width,
    right: t.getBoundingClientRect().right}));
  r.summary = [...document.querySelectorAll('#summary-task1 tr')].map(tr => ({mark: tr.className,
    cells: [...tr.cells].map(c => c.textContent)}));
  const out = document.createElement('pre'); out.id = 'probe'; out.textContent = JSON.stringify(r);
  document.body.appendChild(out);
});
</script>"""


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("Debian chromium not installed (.ci/run installs it; apt-get install chromium)")
    return found


def _headless(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--window-size=1280,900",
            "--virtual-time-budget=10000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.fixture(scope="module")
def page(tmp_path_factory, session_cache):
    """Task 1 with two models, task 2 with one and a skipped one (no weights offline), searched and compared once."""
    tmp = tmp_path_factory.mktemp("page")
    with own_store(tmp / "home", tmp / "keras", session_cache) as home:
        recipe = write_recipe(
            tmp / "r.yaml",
            **{
                "models": [
                    {"task": "task1", "backbone": "efficientnet_lite0"},
                    {"task": "task1", "backbone": "efficientnet_lite1"},
                    {"task": "task2", "backbone": "efficientnet_lite0"},
                    {"task": "task2", "backbone": "vgg19", "weights": "imagenet", "required": False},
                ],
                "search.max_trials": 2,
            },
        )
        res = CliRunner().invoke(app, ["tune", str(recipe)])
        assert res.exit_code == 0, res.output
        out = tmp / "report"
        res = CliRunner().invoke(app, ["compare", str(recipe), "--out", str(out)])
        assert res.exit_code == 0, res.output
        from harness.tracking import runs as tracking

        yield {"home": home, "out": out, "client": tracking.client()}


@pytest.fixture(autouse=True)
def use_page_store(request, monkeypatch):
    use_module_store(request, monkeypatch, "page")


@pytest.mark.slow
def test_the_first_screen_answers_and_no_table_is_wider_than_the_page(page, tmp_path):
    chromium = _chromium()
    html = page["out"] / "report.html"
    shot = tmp_path / "first-screen.png"
    _headless(chromium, tmp_path / "p1", f"--screenshot={shot}", html.as_uri())
    assert shot.is_file() and shot.stat().st_size > 10_000  # the artifact a reader can look at
    probe = tmp_path / "probe.html"
    probe.write_text(html.read_text().replace("</body>", PROBE + "</body>"))
    dom = _headless(chromium, tmp_path / "p2", "--dump-dom", probe.as_uri()).stdout
    r = json.loads(__import__("html").unescape(re.search(r"<pre id=\"probe\">(.*?)</pre>", dom, re.S).group(1)))
    assert r["images"]
    # The first screen (900 px): task 1's sentence, then its forest plot, whole.
    assert r["answer_text"].startswith("task1-") and r["answer"]["bottom"] < 900
    assert r["answer"]["bottom"] <= r["forest"]["top"] < 900 and r["forest"]["bottom"] <= 900
    # Every table within the page, every folded section opened.
    assert r["details"] >= 5 and len(r["tables"]) >= 10
    wide = [t for t in r["tables"] if t["width"] > r["page"] or t["right"] > r["page"]]
    assert not wide, (r["page"], wide)
    # The summary: in the order of the selection objective, the registry's champion marked.
    header, *rows = r["summary"]
    at = next(i for i, c in enumerate(header["cells"]) if c.startswith("val_loss"))
    values = [float(row["cells"][at]) for row in rows]
    assert values == sorted(values) and len(rows) == 2
    champion = page["client"].get_model_version_by_alias("tiny-task1", "champion").tags["model_key"]
    (marked,) = [row for row in rows if row["mark"] == "mark"]
    assert marked["cells"][0] == champion and marked["cells"][-1] == answer.CHAMPION_MARK


@pytest.mark.slow
def test_the_report_says_each_thing_once_and_the_same_way(page):
    md = (page["out"] / "report.md").read_text()
    assert md.count("Not in this report: task2-vgg19 (skipped: ImageNet weights for vgg19") == 1
    # accuracy CIs are exact (no degenerate bootstrap); the one bootstrap CI left is the calibration error's
    assert "[1.000, 1.000]" not in md
    assert all("ECE" in line for line in md.splitlines() if "bootstrap" in line)
    # A selection objective reads the same wherever it appears: the summary, the model's details, the champions.
    summary = md.split("\n## Summary\n", 1)[1].split("\n## ", 1)[0]
    for line in [ln for ln in summary.splitlines() if ln.startswith("| task")]:
        key, value = [c.strip() for c in line.strip("|").split("|")][:2]
        assert f"val_loss {value}" in md.split(f"### {key}", 1)[1], key
    html = (page["out"] / "report.html").read_text()
    assert all(s.startswith("data:image/png;base64,") for s in re.findall(r"src='([^']*)'", html))
