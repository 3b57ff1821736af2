"""Data checks (each bad case built in a temp dir), preprocessing of every colour mode, splits and duplicates."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from harness.cli import app
from harness.data import check_folder, prepare_task
from harness.data.dupes import dhash, find_duplicates
from harness.data.images import decode, preprocess
from harness.data.splits import groups_from_names, make_splits
from harness.data.synthetic import CLASSES, ensure_demo_data
from harness.errors import HarnessError
from harness.recipe import load_recipe

from conftest import write_recipe


def _img(path: Path, size=(64, 64), mode="L", seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 255, (size[1], size[0], 3 if mode == "RGB" else 1), dtype=np.uint8).squeeze()
    Image.fromarray(a).save(path)
    return path


def _folder_recipe(tmp_path, root: Path, **changes):
    changes = {
        "data.synthetic": None,
        "data.root": str(root),
        "tasks": {"t": {"train_dir": "train"}},
        "models": [{"task": "t", "backbone": "efficientnet_lite0"}],
        **changes,
    }
    return load_recipe(write_recipe(tmp_path / "r.yaml", **changes))


@pytest.fixture
def good_root(tmp_path) -> Path:
    root = tmp_path / "data"
    for k, c in enumerate(("covid", "normal")):
        for i in range(6):
            _img(root / "train" / c / f"{c}{i}.png", seed=100 * k + i)  # distinct, and the same in every run
    return root


def test_all_problems_reported_at_once(tmp_path, good_root):
    (good_root / "train" / "covid" / "zero.png").write_bytes(b"")
    (good_root / "train" / "covid" / "notes.txt").write_text("hello")
    (good_root / "train" / "normal" / "fake.jpg").write_bytes(b"not a jpeg at all")
    full = _img(tmp_path / "full.jpg", size=(200, 200), mode="RGB")
    (good_root / "train" / "normal" / "cut.jpg").write_bytes(full.read_bytes()[:400])
    _img(good_root / "train" / "normal" / "tiny.png", size=(8, 8))
    with pytest.raises(HarnessError) as e:
        prepare_task(_folder_recipe(tmp_path, good_root), "t")
    msg = str(e.value)
    for name, why in [
        ("zero.png", "0 bytes"),
        ("notes.txt", "not an image file"),
        ("fake.jpg", "not a readable"),
        ("cut.jpg", "truncated"),
        ("tiny.png", "too small"),
    ]:
        assert name in msg and why in msg, (name, msg)
    assert msg.splitlines()[0].startswith("5 data problem(s)")


def test_skip_policy_keeps_going_and_logs_the_list(tmp_path, good_root):
    (good_root / "train" / "covid" / "zero.png").write_bytes(b"")
    task = prepare_task(_folder_recipe(tmp_path, good_root, **{"data.on_bad_file": "skip"}), "t")
    assert len(task.y) == 12 and any("zero.png" in s for s in task.skipped)


def test_decompression_bomb_guard(tmp_path, good_root):
    _img(good_root / "train" / "covid" / "huge.png", size=(300, 300))
    with pytest.raises(HarnessError, match="huge.png.*pixel limit"):
        prepare_task(_folder_recipe(tmp_path, good_root, **{"data.max_pixels": 50_000}), "t")


def test_folder_level_problems(tmp_path, good_root):
    (good_root / "train" / "empty").mkdir()
    with pytest.raises(HarnessError, match="empty class folder"):
        prepare_task(_folder_recipe(tmp_path, good_root), "t")
    single = tmp_path / "single"
    _img(single / "train" / "covid" / "a.png")
    with pytest.raises(HarnessError, match="at least two class folders"):
        prepare_task(_folder_recipe(tmp_path, single), "t")


def test_class_mismatch_between_train_and_test(tmp_path, good_root):
    _img(good_root / "test" / "covid" / "t.png")
    _img(good_root / "test" / "alien" / "x.png")
    recipe = _folder_recipe(tmp_path, good_root, tasks={"t": {"train_dir": "train", "test_dir": "test"}})
    with pytest.raises(HarnessError) as e:
        prepare_task(recipe, "t")
    assert "'alien' is in test but not in train" in str(e.value) and "'normal' from train" in str(e.value)


def test_explicit_test_folder_is_used_and_recorded(tmp_path, good_root):
    for k, c in enumerate(("covid", "normal")):
        for i in range(3):
            _img(good_root / "test" / c / f"t{i}.png", seed=1000 + 100 * k + i)
    task = prepare_task(
        _folder_recipe(tmp_path, good_root, tasks={"t": {"train_dir": "train", "test_dir": "test"}}), "t"
    )
    assert len(task.splits["test"]) == 6 and task.test_source.startswith("folder")
    assert all(task.files[i].parent.parent.name == "test" for i in task.splits["test"])
    missing = _folder_recipe(tmp_path, good_root, tasks={"t": {"train_dir": "train", "test_dir": "nope"}})
    assert "not found" in prepare_task(missing, "t").test_source


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16", "LA"])
def test_every_mode_becomes_three_equal_grey_channels(mode):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (40, 50), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).convert(mode)
    a = preprocess(img, 32, "grey")
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    assert a.std() > 0  # content survived (16-bit scaled by its range, not clipped to white)


def test_rgb_policy_keeps_colour():
    img = Image.new("RGB", (40, 40), (200, 10, 10))
    a = preprocess(img, 16, "rgb")
    assert a[..., 0].mean() > 150 and a[..., 1].mean() < 50


def test_decode_cache_reuses_and_invalidates_on_content(tmp_path):
    f = _img(tmp_path / "a.png", seed=1)
    first = decode(f, 32, "grey", tmp_path / "c", 8, 10**8)
    again = decode(f, 32, "grey", tmp_path / "c", 8, 10**8)
    assert (first.array == again.array).all() and len(list((tmp_path / "c").rglob("*.entry"))) == 1
    _img(f, seed=2)
    changed = decode(f, 32, "grey", tmp_path / "c", 8, 10**8)
    assert changed.sha1 != first.sha1 and not (changed.array == first.array).all()


def test_splits_are_stratified_deterministic_and_grouped():
    labels = np.repeat([0, 1, 2], 30)
    names = [Path(f"c{y}/person{i // 3}_{y}_{i}.jpeg") for i, y in enumerate(labels)]
    groups = groups_from_names(names, r"^(person\d+)")
    a = make_splits(labels, groups, 0.2, 0.2, seed=3)
    b = make_splits(labels, groups, 0.2, 0.2, seed=3)
    assert all((a[k] == b[k]).all() for k in a)
    assert sum(len(v) for v in a.values()) == 90 and len(set(np.concatenate(list(a.values())))) == 90
    for s in ("train", "val", "test"):
        assert set(labels[a[s]]) == {0, 1, 2}
    owner = {}
    for s, idx in a.items():
        for i in idx:
            assert owner.setdefault(groups[i], s) == s, f"group {groups[i]} straddles splits"


def test_duplicates_exact_and_near():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    near = np.clip(base.astype(int) + 3, 0, 255).astype(np.uint8)
    other = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    pairs = find_duplicates(
        ["s1", "s1", "s2", "s3"],
        np.stack([dhash(a) for a in (base, base, near, other)]),
        ["a", "b", "c", "d"],
        ["train", "test", "train", "train"],
    )
    kinds = {(p["a"], p["b"]): p for p in pairs}
    assert kinds[("a", "b")]["kind"] == "exact" and kinds[("a", "b")]["cross_split"]
    assert kinds[("a", "c")]["kind"] == "near"
    assert not any("d" in (p["a"], p["b"]) for p in pairs)


def test_near_duplicate_search_finds_what_comparing_every_pair_finds():
    """The banded search (linear for real collections) misses no pair within the threshold."""
    from harness.data.dupes import NEAR_THRESHOLD

    rng = np.random.default_rng(1)
    hashes = rng.integers(0, 2, (300, 256)).astype(bool)
    for i in range(0, 300, 10):  # plant neighbours at every distance up to the threshold and a little beyond
        j = i + 1 + (i // 10) % 9
        hashes[j] = hashes[i]
        hashes[j, rng.choice(256, (i // 10) % (NEAR_THRESHOLD + 3), replace=False)] ^= True
    names = [str(i) for i in range(300)]
    found = {(p["a"], p["b"]) for p in find_duplicates(names, hashes, names, ["train"] * 300)}
    brute = {
        (str(i), str(j))
        for i in range(300)
        for j in range(i + 1, 300)
        if (hashes[i] != hashes[j]).sum() <= NEAR_THRESHOLD
    }
    assert found == brute and len(brute) >= 20


def test_synthetic_data_is_deterministic_and_shaped_like_real(tmp_path):
    a = ensure_demo_data(tmp_path / "a", per_class=4, size=48, seed=5)
    b = ensure_demo_data(tmp_path / "b", per_class=4, size=48, seed=5)
    assert sorted(p.name for p in a.iterdir() if p.is_dir()) == sorted(CLASSES)
    for c in CLASSES:
        for fa, fb in zip(sorted((a / c).iterdir()), sorted((b / c).iterdir())):
            assert fa.read_bytes() == fb.read_bytes()


def test_data_check_cli_exits_one_naming_the_bad_files_whole_path_on_one_line(tmp_path, good_root):
    res = CliRunner().invoke(app, ["data", "check", str(good_root / "train")])
    assert res.exit_code == 0 and "covid" in res.output and "0 problem(s)" in res.output
    zero = good_root / "train" / "normal" / "zero.jpg"
    zero.write_bytes(b"")
    res = CliRunner().invoke(app, ["data", "check", str(good_root / "train")])  # CliRunner's console: 80 columns
    assert res.exit_code == 1
    assert any(ln.startswith("problem: ") and str(zero) in ln for ln in res.output.splitlines()), res.output
    report = check_folder(good_root / "train")
    assert report["classes"]["covid"]["n"] == 6 and report["classes"]["covid"]["modes"]["L"] == 6
