"""The per-image feature store: nothing extracted twice across tasks, exactly the changed image extracted again, a
broken entry recomputed, identical features and trials when a study runs twice; a per-class cap on the images."""

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from harness.cli import app
from harness.entries import read_entry, write_entry

from conftest import write_recipe


def _parents(client, study="tiny"):
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs(
        [exp.experiment_id], filter_string="tags.`harness.kind` = 'search'", order_by=["attributes.start_time ASC"]
    )
    return runs


def _folder(tmp_path):
    """Phantoms in a folder of their own (files this test may change)."""
    import shutil

    from harness.data.synthetic import ensure_demo_data

    src = ensure_demo_data(tmp_path / "gen", per_class=8, size=48, seed=11)
    root = tmp_path / "data"
    shutil.copytree(src, root, ignore=shutil.ignore_patterns(".complete"))
    return root


@pytest.mark.slow
def test_task1_after_task2_extracts_nothing_and_a_changed_image_only_itself(tmp_path, mlflow_client):
    root = _folder(tmp_path)
    models = [{"task": "task2", "backbone": "efficientnet_lite0"}, {"task": "task1", "backbone": "efficientnet_lite0"}]
    path = write_recipe(
        tmp_path / "r.yaml",
        **{
            "data.synthetic": None,
            "data.root": str(root),
            "models": models,
            "search.max_trials": 1,
            "training.epochs": 1,
            "tasks": {"task1": {"train_dir": ".", "classes": ["covid", "normal"]}, "task2": {"train_dir": "."}},
        },
    )
    assert CliRunner().invoke(app, ["tune", str(path)]).exit_code == 0
    task2, task1 = _parents(mlflow_client)
    assert task2.data.metrics["extracted_images"] == task2.data.metrics["images"] == 32
    assert task1.data.metrics["extracted_images"] == 0 and task1.data.tags["feature_cache"] == "hit"
    # One image changes: only its own entry is extracted again.
    changed = sorted((root / "covid").glob("*.png"))[0]
    a = np.asarray(Image.open(changed)).copy()
    a[:8, :8] = 255
    Image.fromarray(a).save(changed)
    assert (
        CliRunner().invoke(app, ["tune", str(path), "--restart", "--only", "task2-efficientnet_lite0"]).exit_code == 0
    )
    again = _parents(mlflow_client)[-1]
    assert again.data.metrics["extracted_images"] == 1 and again.data.tags["feature_cache"] == "partial"


def test_an_entry_reads_back_its_parts_and_reads_as_none_when_truncated_or_flipped(tmp_path):
    path = tmp_path / "a" / "b.entry"
    write_entry(path, b"first", bytes(range(256)) * 4)
    assert read_entry(path) == [b"first", bytes(range(256)) * 4] and read_entry(path, 1) == [bytes(range(256)) * 4]
    whole = path.read_bytes()
    for cut in (0, 3, 20, len(whole) - 1):
        path.write_bytes(whole[:cut])
        assert read_entry(path) is None, cut
    flipped = bytearray(whole)
    flipped[-10] ^= 0x01  # inside the second part
    path.write_bytes(bytes(flipped))
    assert read_entry(path, 1) is None and read_entry(path, 0) == [b"first"]  # each part is checked on its own
    assert read_entry(tmp_path / "missing.entry") is None


def test_threads_writing_one_entry_at_once_all_succeed_and_leave_one_whole_entry(tmp_path):
    import threading

    path, versions, errors = tmp_path / "e" / "same.entry", [bytes([k]) * 50_000 for k in range(4)], []

    def write(k):
        try:
            for _ in range(200):
                write_entry(path, versions[k])
        except OSError as e:  # a shared temporary file: one thread renames it away under another
            errors.append(e)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and read_entry(path)[0] in versions
    assert [p.name for p in path.parent.iterdir()] == ["same.entry"]  # no temporary file left behind


def test_a_broken_store_entry_is_extracted_again_never_used(tmp_path, session_cache):
    from harness.data import prepare_task
    from harness.features.store import entry_path, features_for
    from harness.models import build_backbone
    from harness.recipe import load_recipe

    recipe = load_recipe(
        write_recipe(tmp_path / "r.yaml", **{"data.synthetic": {"per_class": 4, "size": 48, "seed": 12}})
    )
    task = prepare_task(recipe, "task2", 32)
    backbone, w = build_backbone("efficientnet_lite0", "imagenet", 32)
    first, _ = features_for(task, "efficientnet_lite0", backbone, w, 32, "grey")
    truncated, corrupt = entry_path(first.shelf, task.sha1s[0]), entry_path(first.shelf, task.sha1s[1])
    truncated.write_bytes(truncated.read_bytes()[:200])
    raw = bytearray(corrupt.read_bytes())
    raw[-2 * int(np.prod(first.map_shape)) - 100] ^= 0xFF  # inside the pooled vector, the part before the float16 maps
    corrupt.write_bytes(bytes(raw))
    second, info = features_for(task, "efficientnet_lite0", backbone, w, 32, "grey")
    assert info["extracted"] == 2 and info["feature_cache"] == "partial"
    np.testing.assert_allclose(second.pooled, first.pooled, rtol=1e-6)  # recomputed, the same numbers
    np.testing.assert_array_equal(second.maps, first.maps)


@pytest.mark.slow
def test_a_study_run_twice_gives_identical_features_and_trials(tmp_path, monkeypatch, mlflow_client):
    path = write_recipe(
        tmp_path / "r.yaml",
        **{"search.max_trials": 2, "training.epochs": 3, "data.synthetic": {"per_class": 8, "size": 48, "seed": 13}},
    )
    results = []
    for k in range(2):  # two stores and two caches: nothing shared but the recipe
        monkeypatch.setenv("HARNESS_HOME", str(tmp_path / f"home{k}"))
        monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / f"cache{k}"))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / f'home{k}' / 'mlflow.db'}")
        assert CliRunner().invoke(app, ["tune", str(path)]).exit_code == 0
        from harness.tracking import runs as tracking

        c = tracking.client()
        exp = c.get_experiment_by_name("tiny")
        trials = c.search_runs([exp.experiment_id], filter_string="tags.`harness.kind` = 'trial'")
        entries = sorted((tmp_path / f"cache{k}" / "features").rglob("*.entry"))
        pooled = [read_entry(e, 0)[0] for e in entries]
        results.append(
            (
                {t.data.tags["trial_id"]: t.data.metrics["best_val_loss"] for t in trials},
                [e.name for e in entries],
                pooled,
            )
        )
    assert results[0][0] == results[1][0] and results[0][1] == results[1][1]
    for a, b in zip(results[0][2], results[1][2]):
        np.testing.assert_array_equal(a, b)


def test_max_per_class_caps_each_class_with_a_seeded_draw(tmp_path):
    from harness.data import prepare_task
    from harness.recipe import load_recipe

    path = write_recipe(tmp_path / "r.yaml", **{"data.max_per_class": 5})
    a, b = (prepare_task(load_recipe(path), "task2") for _ in range(2))
    assert np.bincount(a.y).tolist() == [5, 5, 5, 5] and a.files == b.files
    other = prepare_task(
        load_recipe(write_recipe(tmp_path / "s.yaml", **{"data.max_per_class": 5, "data.seed": 7})), "task2"
    )
    assert other.files != a.files  # another seed draws other images
