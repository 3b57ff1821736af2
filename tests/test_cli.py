"""The CLI's own surface: no TensorFlow start-up lines in a command's output (other stderr lines kept), and
`harness ui` checks its study before any server starts."""

import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from harness.cli import app

from conftest import spawn_cli

START_UP = ("oneDNN custom operations are on", "All log messages before absl::InitializeLog() is called")


def _no_server(monkeypatch) -> list:
    """Record server command lines instead of starting them."""
    started = []
    monkeypatch.setattr("harness.serving.servers.serve", lambda cmd: started.append(cmd) or 0)
    return started


def test_ui_with_an_unknown_study_names_it_and_the_studies_there_and_starts_no_server(monkeypatch):
    from harness.tracking import runs as tracking

    tracking.setup("tiny")
    started = _no_server(monkeypatch)
    res = CliRunner().invoke(app, ["ui", "--study", "nosuch"])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith("error: --study nosuch: no such study in sqlite:///")
    assert lines[0].endswith("(studies here: tiny)")
    assert started == []


def test_ui_with_a_known_study_prints_its_runs_table_and_starts_the_server(monkeypatch):
    from harness.tracking import runs as tracking

    experiment_id = tracking.setup("tiny")
    started = _no_server(monkeypatch)
    res = CliRunner().invoke(app, ["ui", "--study", "tiny", "--port", "5077"])
    assert res.exit_code == 0, res.output
    assert f"http://127.0.0.1:5077/#/experiments/{experiment_id}/runs" in res.output
    assert len(started) == 1 and started[0][started[0].index("--port") + 1] == "5077"


def test_a_command_that_loads_tensorflow_prints_none_of_its_start_up_lines(tmp_path, monkeypatch):
    monkeypatch.delenv("HARNESS_DEBUG", raising=False)
    proc = spawn_cli(["weights", "list"], tmp_path / "home")  # builds Keras models: TensorFlow is imported
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "efficientnet_lite0" in output, output
    assert [line for line in START_UP if line in output] == []


def test_the_quiet_tensorflow_import_keeps_every_other_stderr_line(tmp_path, monkeypatch):
    """A stand-in `tensorflow` writes the start-up lines and a real one to file descriptor 2, as the C++ side does."""
    monkeypatch.delenv("HARNESS_DEBUG", raising=False)
    fake = tmp_path / "fake" / "tensorflow"
    fake.mkdir(parents=True)
    lines = [f"WARNING: {START_UP[1]} are written to STDERR", f"I0000 port.cc:153] {START_UP[0]}.", "real trouble"]
    written = "".join(f"{line}\n" for line in lines).encode()
    (fake / "__init__.py").write_text(f"import os\nos.write(2, {written!r})\n")
    env = {**os.environ, "PYTHONPATH": f"{fake.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    res = subprocess.run(
        [sys.executable, "-c", "import harness.cli, tensorflow"], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and res.stderr == "real trouble\n", res.stderr


def test_a_relative_data_root_on_the_command_line_is_taken_from_the_working_directory(tmp_path, monkeypatch):
    """A path in the recipe file is relative to the recipe's folder; one the user types, to where they are."""
    from harness.cli import _overrides
    from harness.recipe import load_recipe

    from conftest import write_recipe

    (tmp_path / "recipes").mkdir()
    recipe = write_recipe(tmp_path / "recipes" / "r.yaml")
    monkeypatch.chdir(tmp_path)
    loaded = load_recipe(recipe, _overrides(data_root=Path("../shared/data")))
    assert Path(loaded.data.root) == (tmp_path / "../shared/data").resolve()
