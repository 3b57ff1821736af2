"""The README's examples run as written: its serving snippets (shell and Python) against a demo-like store built
here, the model URIs it names are the ones the registry writes, and every command of its table parses."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.recipe import load_recipe

from conftest import own_store, wait_for_ping, write_recipe

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DEMO = load_recipe(ROOT / "recipes" / "demo.yaml")


def _block(lang: str, marker: str) -> str:
    """The one fenced `lang` block of the README that contains `marker`."""
    blocks = [b for b in re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), re.S | re.M) if marker in b]
    assert len(blocks) == 1, f"{len(blocks)} {lang} blocks of README.md contain {marker!r}"
    return blocks[0]


@pytest.fixture(scope="module")
def demo_clone(tmp_path_factory, session_cache):
    """A folder laid out like this project after `make demo`: `.venv` (this one), `.harness` holding a study named
    `demo` on the demo recipe's data and image size, with a champion for task2 — shrunk to one model, one trial."""
    clone = tmp_path_factory.mktemp("clone")
    if not (Path(sys.prefix) / "bin" / "activate").is_file():
        pytest.skip(f"not run from a virtual environment with bin/activate ({sys.prefix})")
    (clone / ".venv").symlink_to(sys.prefix)
    home = clone / ".harness"
    with own_store(home, clone / "keras", session_cache):
        recipe = write_recipe(
            clone / "demo.yaml",
            study=DEMO.study,
            models=[{"task": "task2", "backbone": "efficientnet_lite0"}],
            **{
                "data.synthetic": DEMO.data.synthetic.model_dump(),
                "data.image_size": DEMO.data.image_size,
                "search.max_trials": 1,
            },
        )
        res = CliRunner().invoke(app, ["study", str(recipe)])
        assert res.exit_code == 0, res.output
        yield clone


def _env_as_after_make_demo(clone: Path) -> dict:
    """This process's environment without the store the tests point at: the README's commands find theirs."""
    env = {k: v for k, v in os.environ.items() if k not in ("HARNESS_HOME", "HARNESS_CACHE", "MLFLOW_TRACKING_URI")}
    return {**env, "PWD": str(clone)}


CLASSES = ["covid", "normal", "pneumonia_bac", "pneumonia_vir"]


def test_readme_champion_uris_name_the_registered_model_that_holds_the_alias():
    # crown_champions puts `champion` on `<study>-<task>`, never on a per-backbone `<study>-<task>-<backbone>`.
    holders = {f"{DEMO.study}-{task}" for task in DEMO.tasks}
    named = re.findall(r"models:/([^@\s\"'`]+)@champion", README.read_text())
    assert named and set(named) <= holders, sorted(set(named) - holders)


@pytest.mark.slow
def test_readme_python_serving_snippet_predicts_every_class_for_a_demo_image(demo_clone):
    snippet = _block("python", "mlflow.pyfunc.load_model")
    export = re.search(r"^export MLFLOW_TRACKING_URI=(\S+)", _block("bash", "mlflow models serve"), re.M).group(1)
    env = {**_env_as_after_make_demo(demo_clone), "MLFLOW_TRACKING_URI": export.replace("$PWD", str(demo_clone))}
    # Run as written; one line appended to read its result back.
    code = snippet + "\nprint('PROBS' + probs.to_json(orient='split'))\n"
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=demo_clone, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    probs = json.loads(res.stdout.split("PROBS", 1)[1])
    # the class probabilities (calibrated), then the demo recipe's operating point's call on covid
    assert probs["columns"] == [*CLASSES, "decision"] and len(probs["data"]) == 1
    assert sum(probs["data"][0][:4]) == pytest.approx(1.0, abs=1e-5) and probs["data"][0][4] in (0, 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_readme_predict_serve_and_curl_blocks_answer_for_a_demo_image(demo_clone):
    # The blocks as written, but on a free port: 5001 may be taken on a shared machine.
    port = str(_free_port())
    serve, client = (_block("bash", m).replace("5001", port) for m in ("mlflow models serve", "curl -s"))
    env = _env_as_after_make_demo(demo_clone)
    server = subprocess.Popen(
        ["bash", "-e", "-c", serve],
        cwd=demo_clone,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for_ping(int(port), server, 240, lambda: server.stdout.read())
        res = subprocess.run(
            ["bash", "-e", "-c", client], cwd=demo_clone, env=env, capture_output=True, text=True, timeout=120
        )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert res.returncode == 0, res.stderr[-3000:]
    (row,) = json.loads(res.stdout)["predictions"]
    assert sorted(row) == sorted([*CLASSES, "decision"])
    assert sum(row[c] for c in CLASSES) == pytest.approx(1.0, abs=1e-5) and row["decision"] in (0, 1)
    predicted = (demo_clone / "predictions.csv").read_text().splitlines()
    assert len(predicted) == 1 + DEMO.data.synthetic.per_class  # the header and every image of the covid folder


def _table_commands() -> dict[str, set[str]]:
    """Each command of the README's table (`harness data check` -> ("data", "check")) with the options it names."""
    table = README.read_text().split("| command | what it does |", 1)[1].split("\n\n", 1)[0]
    commands: dict[tuple, set[str]] = {}
    for row in table.splitlines()[2:]:
        current = None
        for span in re.findall(r"`([^`]+)`", row.split(" | ")[0]):
            if span.startswith("harness "):
                current = tuple(re.match(r"harness((?: [a-z]+)+)", span).group(1).split())
                commands.setdefault(current, set())
            commands[current] |= set(re.findall(r"--[a-z][a-z-]*", span))
    return {" ".join(k): v for k, v in commands.items()}


def test_every_command_of_the_readme_table_parses_with_the_options_it_names():
    commands = _table_commands()
    assert {"train", "tune", "ui", "data check", "weights list", "weights fetch"} <= set(commands)
    for command, options in commands.items():
        res = CliRunner().invoke(app, [*command.split(), "--help"])
        assert res.exit_code == 0, (command, res.output)
        assert {o for o in options if not re.search(rf"{o}(?![a-z-])", res.output)} == set(), command
