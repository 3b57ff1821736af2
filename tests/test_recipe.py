"""Recipe validation: the shipped recipes load; every kind of bad recipe fails before any work with one line."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from harness.cli import app
from harness.errors import HarnessError
from harness.recipe import load_recipe

from conftest import write_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["demo.yaml", "challenge.yaml"])
def test_shipped_recipes_validate(name):
    r = load_recipe(ROOT / "recipes" / name)
    assert r.models and all(m.task in r.tasks for m in r.models)
    assert r.source == (ROOT / "recipes" / name).resolve()


def test_challenge_mirrors_seed_study_and_adds_every_offline_backbone():
    r = load_recipe(ROOT / "recipes" / "challenge.yaml")
    pairs = {(m.task, m.backbone) for m in r.models}
    assert {("task1", "vgg19"), ("task2", "vgg19"), ("task2", "densenet121")} <= pairs
    for task in ("task1", "task2"):
        assert {(task, f"efficientnet_lite{i}") for i in range(3)} <= pairs
    # Each backbone at its native size; the seed's Keras backbones are skipped where their files cannot be had.
    assert {m.backbone: r.image_size_for(m) for m in r.models} == {
        "vgg19": 224,
        "densenet121": 224,
        "efficientnet_lite0": 224,
        "efficientnet_lite1": 240,
        "efficientnet_lite2": 260,
    }
    assert all(not m.required for m in r.models if m.backbone in ("vgg19", "densenet121"))
    assert str(r.tasks["task1"].train_dir) == "two/train" and str(r.tasks["task2"].train_dir) == "all/train"


def test_demo_compares_three_offline_pretrained_backbones_per_task():
    r = load_recipe(ROOT / "recipes" / "demo.yaml")
    for task in ("task1", "task2"):
        offline = {m.backbone for m in r.models if m.task == task and m.required and m.weights == "imagenet"}
        assert offline >= {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}


@pytest.mark.parametrize(
    "change,field",
    [
        ({"data.bogus": 1}, "data.bogus"),
        ({"training.epochs": "many"}, "training.epochs"),
        ({"training.epochs": 0}, "training.epochs"),
        ({"data.val_fraction": 0.9}, "data.val_fraction"),
        ({"models.0.backbone": "resnet9000"}, "models.0.backbone"),
        ({"models.0.task": "task7"}, "task7"),
        ({"search.tuner": "grid"}, "search.tuner"),
        ({"search.depth": {"min": 3, "max": 1}}, "search.depth"),
    ],
)
def test_bad_recipe_names_file_and_field(tmp_path, change, field):
    path = write_recipe(tmp_path / "bad.yaml", **change)
    with pytest.raises(HarnessError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert str(path) in msg and field in msg and "\n" not in msg


def test_missing_weights_file_fails_before_work(tmp_path):
    path = write_recipe(tmp_path / "bad.yaml", **{"models.0.weights": "nowhere.weights.h5"})
    with pytest.raises(HarnessError, match=r"models\.0\.weights: file not found"):
        load_recipe(path)


def test_overrides_are_validated_like_the_file(tiny_recipe):
    assert load_recipe(tiny_recipe, {"training.epochs": 7}).training.epochs == 7
    with pytest.raises(HarnessError, match="training.epochs"):
        load_recipe(tiny_recipe, {"training.epochs": -1})


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("study: [unclosed\n")
    with pytest.raises(HarnessError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(HarnessError, match="recipe file not found"):
        load_recipe(tmp_path / "absent.yaml")


def test_cli_bad_recipe_is_one_line_and_exit_2(tmp_path):
    path = write_recipe(tmp_path / "bad.yaml", **{"data.image_size": 5})
    res = CliRunner().invoke(app, ["train", str(path)])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "data.image_size" in lines[0] and "Traceback" not in res.output


def test_cli_missing_data_folder_names_it(tmp_path):
    raw = yaml.safe_load(write_recipe(tmp_path / "r.yaml").read_text())
    raw["data"].pop("synthetic")
    raw["data"]["root"] = str(tmp_path / "no-such-root")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["train", str(tmp_path / "r.yaml")])
    assert res.exit_code == 2 and "no-such-root" in res.output and "folder not found" in res.output


def test_epochs_override_reaches_models_with_their_own_training(monkeypatch):
    """`--epochs` must win over a model's own training block (the seed recipe has one per model)."""
    import harness.study.train as tr

    seen = {}
    monkeypatch.setattr(tr, "train", lambda recipe, key: seen.update(recipe=recipe, key=key) or "run")
    res = CliRunner().invoke(
        app,
        [
            "train",
            str(ROOT / "recipes" / "seed.yaml"),
            "--model",
            "task2-densenet121",
            "--weights",
            "none",
            "--epochs",
            "2",
        ],
    )
    assert res.exit_code == 0, res.output
    m = seen["recipe"].model(seen["key"])
    assert seen["key"] == "task2-densenet121" and seen["recipe"].training_for(m).epochs == 2 and m.weights == "none"
