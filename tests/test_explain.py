"""Where the models look: Grad-CAM through the nested backbone with the head replayed (a case with a known answer),
the lung-field share, and the source audit saying so when the source leaks the label (and only then)."""

import keras
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from harness.cli import app
from harness.evaluation.gradcam import LUNG_BOX, gradcam, outside_share
from harness.models.heads import assemble, average, build_head

from conftest import write_recipe


def _patch_model(n_heads: int = 1) -> keras.Model:
    """A backbone whose 8x8 map is the image's brightness and heads whose class-1 score grows with it: the evidence
    for class 1 is exactly where the image is bright."""
    inputs = keras.Input((32, 32, 3))
    conv = keras.layers.Conv2D(1, 1, use_bias=False, kernel_initializer="ones")(inputs)
    backbone = keras.Model(inputs, keras.layers.ReLU()(keras.layers.AveragePooling2D(4)(conv)), name="tiny")
    heads = []
    for k in range(n_heads):
        head = build_head((1,), 2, [], 0.0, "avg", name=f"h{k}")
        head.get_layer("output").set_weights([np.array([[1.0 + k]]), np.array([0.0])])
        heads.append(head)
    return assemble(backbone, average(heads, "heads"), "lite", "grey", 32, trainable_backbone=False)


def _images() -> tuple[np.ndarray, list[tuple[slice, slice]]]:
    patches = [(slice(20, 28), slice(4, 12)), (slice(0, 8), slice(24, 32))]
    x = np.zeros((2, 32, 32, 3), np.float32)
    for i, (r, c) in enumerate(patches):
        x[i, r, c] = 255.0
    return x, patches


@pytest.mark.parametrize("n_heads", [1, 3])
def test_gradcam_peaks_on_the_patch_that_decides_the_class(n_heads):
    model = _patch_model(n_heads)
    x, patches = _images()
    maps = gradcam(model, x, np.array([1, 1]), 2)
    assert maps.shape == (2, 32, 32) and maps.max() == pytest.approx(1.0)
    for cam, (r, c) in zip(maps, patches):
        peak = np.unravel_index(cam.argmax(), cam.shape)
        assert r.start <= peak[0] < r.stop and c.start <= peak[1] < c.stop
        assert cam[r, c].sum() / cam.sum() > 0.5  # most of the map on the patch
    # the evidence against class 1 is nowhere: its map is empty
    np.testing.assert_array_equal(gradcam(model, x, np.array([0, 0]), 2), 0.0)


def test_outside_share_counts_the_mass_outside_the_lung_box():
    maps = np.zeros((2, 100, 100))
    left, top, right, bottom = LUNG_BOX
    maps[0, int(top * 100) + 5, int(left * 100) + 5] = 1.0  # inside the box
    maps[1, 2, 2] = 1.0  # a corner, where text and markers sit
    np.testing.assert_allclose(outside_share(maps), [0.0, 1.0])


def _leaky_folder(tmp_path):
    """Phantom covid/normal images; the covid ones saved as RGB JPEG of another size, as publication figures are."""
    from harness.data.synthetic import ensure_demo_data

    src = ensure_demo_data(tmp_path / "gen", per_class=12, size=64, seed=3)
    root = tmp_path / "leaky"
    for c in ("covid", "normal"):
        (root / c).mkdir(parents=True)
        for f in sorted((src / c).glob("*.png")):
            img = Image.open(f)
            if c == "covid":
                img.convert("RGB").resize((80, 70)).save(root / c / f"{f.stem}.jpg", quality=95)
            else:
                img.save(root / c / f.name)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("leak", [True, False])
def test_source_audit_says_so_when_the_source_gives_the_label_away(tmp_path, leak):
    changes = {
        "search.max_trials": 1,
        "training.epochs": 3,
        "models": [{"task": "task1", "backbone": "efficientnet_lite0"}],
    }
    if leak:
        changes.update(
            {"data.synthetic": None, "data.root": str(_leaky_folder(tmp_path)), "tasks": {"task1": {"train_dir": "."}}}
        )
    else:
        changes.update({"data.synthetic": {"per_class": 12, "size": 64, "seed": 3}})
    path = write_recipe(tmp_path / "r.yaml", **changes)
    assert CliRunner().invoke(app, ["tune", str(path)]).exit_code == 0
    res = CliRunner().invoke(app, ["compare", str(path), "--out", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Source audit" in md and "## Where the models look (Grad-CAM)" in md
    assert ("this data cannot tell disease from source" in md) == leak
    assert (tmp_path / "report" / "gradcam-task1-efficientnet_lite0.png").is_file()


@pytest.mark.slow
def test_two_models_of_one_backbone_register_apart_and_the_report_compares_their_colour_policies(
    tmp_path, mlflow_client
):
    path = write_recipe(
        tmp_path / "r.yaml",
        **{
            "search.max_trials": 1,
            "training.epochs": 3,
            "data.synthetic": None,
            "data.root": str(_leaky_folder(tmp_path)),
            "tasks": {"task1": {"train_dir": "."}},
            "models": [
                {"task": "task1", "backbone": "efficientnet_lite0"},
                {"task": "task1", "backbone": "efficientnet_lite0", "colour": "rgb", "name": "task1-lite0-rgb"},
            ],
        },
    )
    assert CliRunner().invoke(app, ["tune", str(path)]).exit_code == 0
    # Same task and backbone, two keys: each model is registered under its own key, one version each.
    for name in ("tiny-task1-efficientnet_lite0", "tiny-task1-lite0-rgb"):
        assert len(mlflow_client.search_model_versions(f"name = '{name}'")) == 1
    assert CliRunner().invoke(app, ["compare", str(path), "--out", str(tmp_path / "report")]).exit_code == 0
    md = (tmp_path / "report" / "report.md").read_text()
    section = md.split("## Colour policy: greyscale against RGB")[1].split("\n## ")[0]
    (row,) = [ln for ln in section.splitlines() if ln.startswith("| task1 |")]
    assert "task1-efficientnet_lite0: " in row and "task1-lite0-rgb: " in row
