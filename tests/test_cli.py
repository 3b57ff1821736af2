"""The CLI's own surface: `harness ui` checks its study before any server starts."""

from typer.testing import CliRunner

from harness.cli import app


def _no_server(monkeypatch) -> list:
    """Record server command lines instead of starting them."""
    started = []
    monkeypatch.setattr("harness.pipeline.serve", lambda cmd: started.append(cmd) or 0)
    return started


def test_ui_with_an_unknown_study_names_it_and_the_studies_there_and_starts_no_server(monkeypatch):
    from harness import tracking

    tracking.setup("tiny")
    started = _no_server(monkeypatch)
    res = CliRunner().invoke(app, ["ui", "--study", "nosuch"])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith("error: --study nosuch: no such study in sqlite:///")
    assert lines[0].endswith("(studies here: tiny)")
    assert started == []


def test_ui_with_a_known_study_prints_its_runs_table_and_starts_the_server(monkeypatch):
    from harness import tracking

    experiment_id = tracking.setup("tiny")
    started = _no_server(monkeypatch)
    res = CliRunner().invoke(app, ["ui", "--study", "tiny", "--port", "5077"])
    assert res.exit_code == 0, res.output
    assert f"http://127.0.0.1:5077/#/experiments/{experiment_id}/runs" in res.output
    assert len(started) == 1 and started[0][started[0].index("--port") + 1] == "5077"
