"""ImageNet weights fetched on first use: from a mirror served on 127.0.0.1, verified before use, cached for offline
use, refused and removed when tampered with, one clear line when unreachable; optional models skipped with a reason."""

import dataclasses
import functools
import http.server
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.hashing import sha256_file
from harness.models import backbones, build_backbone

FILE = "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"


class Mirror:
    """A folder laid out like Keras' weights URL, served on a free loopback port; counts the downloads."""

    def __init__(self, root: Path):
        self.root, self.downloads = root, 0
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                mirror.downloads += 1
                super().do_GET()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=root))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def generated_vgg19(tmp_path_factory):
    """A VGG19 no-top file in Keras' legacy HDF5 layout (random weights), and the model it came from."""
    ref, _ = build_backbone("vgg19", "none", 32)
    path = tmp_path_factory.mktemp("gen") / FILE
    ref.save(path)
    return path, [w.copy() for w in ref.get_weights()]


@pytest.fixture
def mirror(tmp_path, generated_vgg19, monkeypatch):
    path, _ = generated_vgg19
    (tmp_path / "mirror" / "vgg19").mkdir(parents=True)
    (tmp_path / "mirror" / "vgg19" / FILE).write_bytes(path.read_bytes())
    server = Mirror(tmp_path / "mirror")
    monkeypatch.setenv("HARNESS_WEIGHTS_MIRROR", server.url)
    expect_digest(monkeypatch, f"sha256:{sha256_file(path)}")
    yield server
    server.stop()


def expect_digest(monkeypatch, digest: str) -> None:
    """The generated file plays the part of Keras' published file: its digest is the one expected."""
    spec = backbones.SPECS["vgg19"]
    monkeypatch.setitem(
        backbones.SPECS,
        "vgg19",
        dataclasses.replace(spec, keras_file=dataclasses.replace(spec.keras_file, digest=digest)),
    )


def test_fetched_once_from_the_mirror_then_used_offline(mirror, generated_vgg19, harness_home, tmp_path):
    res = CliRunner().invoke(app, ["weights", "fetch", "vgg19"])
    assert res.exit_code == 0, res.output
    local = tmp_path / "keras" / "models" / FILE
    assert local.is_file() and mirror.downloads == 1 and f"fetched from {mirror.url}vgg19/{FILE}" in res.output
    assert not list(local.parent.glob("*.part"))
    mirror.stop()  # from now on the cache is all there is
    model, info = build_backbone("vgg19", "imagenet", 32)
    assert mirror.downloads == 1 and info.origin == f"fetched from {mirror.url}vgg19/{FILE}"
    assert info.sha256 == sha256_file(generated_vgg19[0])
    for a, b in zip(generated_vgg19[1], model.get_weights()):
        np.testing.assert_array_equal(a, b)
    listed = CliRunner().invoke(app, ["weights", "list"])
    assert "present" in listed.output


def test_tampered_download_is_refused_and_removed(mirror, monkeypatch, tmp_path):
    expect_digest(monkeypatch, "sha256:" + "0" * 64)  # the mirror's file is not the one expected
    res = CliRunner().invoke(app, ["weights", "fetch", "vgg19"])
    assert res.exit_code == 2 and "refused and removed" in res.output
    assert "0" * 64 in res.output and sha256_file(mirror.root / "vgg19" / FILE) in res.output
    models = tmp_path / "keras" / "models"
    assert not (models / FILE).exists() and not list(models.glob("*.part")) and not list(models.glob(".*.part"))


def test_unreachable_mirror_is_one_line_within_seconds(monkeypatch):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HARNESS_WEIGHTS_MIRROR", f"http://127.0.0.1:{port}/")
    t0 = time.perf_counter()
    res = CliRunner().invoke(app, ["weights", "fetch", "vgg19"])
    assert time.perf_counter() - t0 < 10
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "Traceback" not in res.output
    assert f"could not be fetched from http://127.0.0.1:{port}/vgg19/{FILE}" in lines[0] and FILE in lines[0]


def test_recipe_mirror_is_used_before_the_environment(mirror, monkeypatch, tmp_path):
    from harness.recipe import load_recipe

    from conftest import write_recipe

    monkeypatch.setenv("HARNESS_WEIGHTS_MIRROR", "http://127.0.0.1:9/")
    recipe = load_recipe(
        write_recipe(tmp_path / "r.yaml", weights_mirror=mirror.url, models=[{"task": "task2", "backbone": "vgg19"}])
    )
    from harness.models.backbones import resolve_weights

    info = resolve_weights("vgg19", "imagenet", recipe.weights_mirror)
    assert info.origin.startswith(f"fetched from {mirror.url}") and mirror.downloads == 1


@pytest.mark.slow
def test_optional_model_without_weights_is_skipped_and_the_report_says_why(tmp_path, mlflow_client):
    from conftest import write_recipe

    path = write_recipe(
        tmp_path / "r.yaml",
        **{
            "search.max_trials": 1,
            "training.epochs": 1,
            "models": [
                {"task": "task2", "backbone": "efficientnet_lite0"},
                {"task": "task2", "backbone": "vgg19", "required": False},
            ],
        },
    )
    res = CliRunner().invoke(app, ["tune", str(path)])
    assert res.exit_code == 0, res.output
    assert "task2-vgg19: skipped (ImageNet weights for vgg19" in res.output
    exp = mlflow_client.get_experiment_by_name("tiny")
    assert "could not be fetched" in exp.tags["harness.skipped.task2-vgg19"]
    finals = mlflow_client.search_runs([exp.experiment_id], filter_string="tags.`harness.kind` = 'final'")
    assert [r.data.tags["model_key"] for r in finals] == ["task2-efficientnet_lite0"]
    res = CliRunner().invoke(app, ["compare", str(path), "--out", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "report" / "report.md").read_text()
    assert "task2-vgg19 (skipped: ImageNet weights for vgg19" in md
    required = write_recipe(tmp_path / "r2.yaml", models=[{"task": "task2", "backbone": "vgg19"}])
    res = CliRunner().invoke(app, ["tune", str(required)])
    assert res.exit_code == 2 and "task2-vgg19: ImageNet weights for vgg19" in res.output
