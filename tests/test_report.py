"""`harness compare` on a small real study: every section, figures per model, exact CIs, McNemar per pair, numbers
that match MLflow, and an HTML file that renders in headless Chromium with its images loaded."""

import re
import shutil
import subprocess

import numpy as np
import pytest
from typer.testing import CliRunner

from harness.cli import app

from conftest import write_recipe

SECTIONS = [  # the report's level-2 sections, the comparisons and the provenance folded
    "Summary",
    "Champions",
    "Against the floor",
    "Pairwise comparison on the same test images",
    "Where the models look (Grad-CAM)",
    "Source audit",
    "Models of task task2, in selection order",
    "Device and timing",
    "Data",
]
MODEL_PARTS = ["Training curves", "t-SNE of penultimate-layer features", "Head search", "Where it looks (Grad-CAM)"]


@pytest.fixture(scope="module")
def study(tmp_path_factory, session_cache):
    """Two backbones on one task, 2 trials each, compared; built once for the module's tests."""
    import os

    tmp = tmp_path_factory.mktemp("study")
    keys = ("HARNESS_HOME", "HARNESS_CACHE", "KERAS_HOME", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(HARNESS_HOME=str(tmp / "home"), HARNESS_CACHE=str(session_cache), KERAS_HOME=str(tmp / "k"))
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    recipe = write_recipe(
        tmp / "r.yaml",
        **{
            "models": [
                {"task": "task2", "backbone": "efficientnet_lite0", "weights": "imagenet"},
                {"task": "task2", "backbone": "vgg19", "weights": "none"},
                {"task": "task1", "backbone": "densenet121", "weights": "none"},
            ]
        },
    )
    assert (
        CliRunner()
        .invoke(app, ["tune", str(recipe), "--only", "task2-efficientnet_lite0", "--only", "task2-vgg19"])
        .exit_code
        == 0
    )
    res = CliRunner().invoke(app, ["compare", str(recipe), "--out", str(tmp / "report")])
    assert res.exit_code == 0, res.output
    from harness.tracking import runs as tracking

    yield {"out": tmp / "report", "output": res.output, "client": tracking.client(), "home": tmp / "home"}
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def use_study_store(request, monkeypatch):
    if "study" in request.fixturenames:
        study = request.getfixturevalue("study")
        monkeypatch.setenv("HARNESS_HOME", str(study["home"]))


@pytest.mark.slow
def test_report_has_every_section_and_figure(study):
    md = (study["out"] / "report.md").read_text()
    for s in SECTIONS:
        assert f"\n## {s}\n" in md, s
    for key in ("task2-efficientnet_lite0", "task2-vgg19"):
        assert (study["out"] / f"confusion-{key}.png").is_file() and (study["out"] / f"tsne-{key}.png").is_file()
        assert md.count(f"confusion-{key}.png") == 1 and md.count(f"tsne-{key}.png") == 1
        details = md.split(f"\n### {key}", 1)[1].split("\n### ", 1)[0]  # the model's folded details
        assert all(f"\n#### {part}\n" in details for part in MODEL_PARTS), key
        assert f"confusion-{key}.png" in details and "forest-task2.png" not in details
    assert md.index("## Summary") < md.index("forest-task2.png") < md.index("## Champions")
    assert "Not in this report: task1-densenet121 (no final run yet)." in md
    assert "report.html" in study["output"]


@pytest.mark.slow
def test_report_numbers_match_mlflow_and_cis_hold(study):
    client = study["client"]
    exp = client.get_experiment_by_name("tiny")
    finals = client.search_runs([exp.experiment_id], filter_string="tags.`harness.kind` = 'final'")
    md = (study["out"] / "report.md").read_text()
    assert len(finals) == 2
    for run in finals:
        m = run.data.metrics
        key = run.data.tags["model_key"]
        row = next(ln for ln in md.splitlines() if ln.startswith(f"| {key} |"))  # its summary row
        acc, lo, hi = map(float, re.search(r"\| ([\d.]+) \[([\d.]+), ([\d.]+)\] \|", row).groups())
        assert acc == pytest.approx(m["test.accuracy"], abs=5e-4)
        assert lo == pytest.approx(m["test.accuracy_cp_low"], abs=5e-4)  # exact, as logged
        assert hi == pytest.approx(m["test.accuracy_cp_high"], abs=5e-4)
        assert lo <= acc <= hi
        assert row.split("|")[2].strip() == f"{m['search.val_loss']:.4f}"  # what chose it
    # The pairwise row: counts and p recomputed from the two models' logged per-image predictions.
    import tempfile

    from harness.evaluation.metrics import mcnemar, read_predictions

    correct = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in finals:
            rows = read_predictions(client, run.info.run_id, tmp)
            test = sorted((r["file"], r["true"] == r["pred"]) for r in rows if r["split"] == "test")
            correct[run.data.tags["model_key"]] = np.array([ok for _, ok in test])
    # Model A is the first of the pair in selection order (by the validation objective that chose them).
    chose = {r.data.tags["model_key"]: r.data.metrics["search.val_loss"] for r in finals}
    a, b = sorted(correct, key=chose.get)
    expected = mcnemar(correct[a], correct[b])
    (row,) = [ln for ln in md.splitlines() if ln.startswith(f"| task2 | {a} | {b} |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert [int(c) for c in cells[3:7]] == [expected[k] for k in ("both_right", "a_only", "b_only", "both_wrong")]
    assert float(cells[7]) == pytest.approx(expected["p_value"], abs=5e-5)
    assert cells[8] == (
        "significant at 0.05" if expected["p_value"] < 0.05 else "not significant: no evidence either is better"
    )
    (compare_run,) = client.search_runs([exp.experiment_id], filter_string="tags.`harness.kind` = 'compare'")
    artifacts = {a.path for a in client.list_artifacts(compare_run.info.run_id, "report")}
    assert {"report/report.html", "report/report.md"} <= artifacts


@pytest.mark.slow
def test_html_is_self_contained(study):
    html = (study["out"] / "report.html").read_text()
    sources = re.findall(r"(?:src|href)=['\"]([^'\"]*)", html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)  # nothing to fetch or lose
    assert "<table id='summary-task2'>" in html


@pytest.mark.slow
def test_html_renders_in_headless_chromium(study, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("Debian chromium not installed (.ci/run installs it; apt-get install chromium)")
    res = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            (study["out"] / "report.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    dom = res.stdout
    assert "summary-task2" in dom and dom.count("<img") >= 6
    probe = study["out"] / "probe.html"
    probe.write_text(
        (study["out"] / "report.html")
        .read_text()
        .replace(
            "</body>",
            "<script>document.title = [...document.images].every(i => i.complete && i.naturalWidth > 0)"
            " + ':' + document.images.length</script></body>",
        )
    )
    res = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile2'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    title = re.search(r"<title>(.*?)</title>", res.stdout).group(1)
    assert title.startswith("true:"), title  # every embedded image decoded


def test_compare_unknown_study_is_one_line():
    res = CliRunner().invoke(app, ["compare", "no-such-study"])
    assert res.exit_code == 2 and "no MLflow experiment 'no-such-study'" in res.output


@pytest.mark.slow
def test_ui_serves_the_store_and_prints_the_experiment_url(study, tmp_path):
    import os
    import socket
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HARNESS_HOME": str(study["home"]), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the store comes from HARNESS_HOME, as for a user
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "ui", "--port", str(port), "--study", "tiny"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        first = proc.stdout.readline()
        exp = study["client"].get_experiment_by_name("tiny")
        assert f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}/runs" in first
        deadline, ok = time.time() + 90, False
        while time.time() < deadline and not ok:
            try:  # loopback only: the UI of this test's own store
                ok = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
            except OSError:
                time.sleep(0.5)
        assert ok, "MLflow UI did not answer /health"
        body = urllib.request.urlopen(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=tiny", timeout=5
        ).read()
        assert exp.experiment_id.encode() in body
    finally:
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_compare_ends_the_compare_runs_of_killed_processes_and_leaves_live_ones_running(study, tmp_path):
    """A compare killed with -9 (no chance to end its run) left its run RUNNING; the next compare of the study marks
    it KILLED, while a compare in progress in a live process (this one) stays RUNNING."""
    import os
    import socket

    client = study["client"]
    exp = client.get_experiment_by_name("tiny")
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid whose process has ended
    tags = {"harness.kind": "compare", "study": "tiny", "harness.host": socket.gethostname()}
    orphan = client.create_run(exp.experiment_id, tags={**tags, "harness.pid": str(gone.pid)}).info.run_id
    live = client.create_run(exp.experiment_id, tags={**tags, "harness.pid": str(os.getpid())}).info.run_id
    before = {r.info.run_id for r in client.search_runs([exp.experiment_id])}
    try:
        res = CliRunner().invoke(app, ["compare", "tiny", "--out", str(tmp_path / "report")])
        assert res.exit_code == 0, res.output
        assert client.get_run(orphan).info.status == "KILLED"
        assert client.get_run(live).info.status == "RUNNING"
        (new,) = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_id not in before]
        assert new.info.status == "FINISHED" and new.data.tags["harness.pid"] == str(os.getpid())
    finally:  # the module's other tests count one compare run
        for run_id in {orphan, live} | {r.info.run_id for r in client.search_runs([exp.experiment_id])} - before:
            client.delete_run(run_id)
