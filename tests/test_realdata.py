"""Integration on the real challenge images (../shared/data/covid-xray; skipped when absent): both tasks check and
load with the challenge recipe, patient groups never straddle splits, and colour modes are recorded per image."""

from pathlib import Path

import numpy as np
import pytest

from harness.data import check_folder, prepare_task
from harness.data.splits import groups_from_names
from harness.recipe import load_recipe

from conftest import REAL_DATA

pytestmark = pytest.mark.realdata
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "challenge.yaml"


@pytest.mark.parametrize(
    "task,n,classes",
    [("task1", 129, ["covid", "normal"]), ("task2", 269, ["covid", "normal", "pneumonia_bac", "pneumonia_vir"])],
)
def test_challenge_tasks_load(task, n, classes):
    recipe = load_recipe(RECIPE, {"data.root": str(REAL_DATA), "data.image_size": 64})
    data = prepare_task(recipe, task)
    assert data.classes == classes and len(data.y) == n and not data.skipped
    assert data.x.shape == (n, 64, 64, 3)
    assert "carved" in data.test_source  # the challenge's test folders are held back here
    groups = groups_from_names(data.files, recipe.data.group_pattern)
    owner = {}
    for s, idx in data.splits.items():
        for i in idx:
            assert owner.setdefault(groups[i], s) == s
    covid = data.y == classes.index("covid")
    assert {"RGB", "RGBA"} & set(np.array(data.modes)[covid]) and set(np.array(data.modes)[~covid]) >= {"L"}
    assert not [d for d in data.duplicates if d["kind"] == "exact"]


def test_data_check_on_real_folder():
    report = check_folder(REAL_DATA / "all" / "train")
    assert report["problems"] == []
    assert {c: s["n"] for c, s in report["classes"].items()} == {
        "covid": 59,
        "normal": 70,
        "pneumonia_bac": 70,
        "pneumonia_vir": 70,
    }
