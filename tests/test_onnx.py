"""The ONNX export: a tiny Keras model converts with Keras' outputs kept within the parity bound, a bad file is one
line naming it, INT8 quantization loads, latency figures are sane, and the ONNX pyfunc answers as the Keras one does
in a process that cannot import the harness (nor loads TensorFlow)."""

import importlib.metadata
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest

from harness.errors import HarnessError
from harness.serving import onnx as ox

SIZE = 16
ONNX_MODEL_CODE = Path(ox.__file__).with_name("serving_model.py")  # one models-from-code file, both runtimes


def tiny_model(units: int, activation: str) -> keras.Model:
    """Raw 0-255 images in, as the harness's models take them; 3 softmax classes or 1 sigmoid unit out."""
    keras.utils.set_random_seed(0)
    x = inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255)(x)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(units, activation=activation)(x))


HEADS = {"softmax": (3, "softmax", ["a", "b", "c"]), "sigmoid": (1, "sigmoid", ["neg", "pos"])}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """Per head: the Keras model and its ONNX file, exported once for the module."""
    folder = tmp_path_factory.mktemp("onnx")
    out = {}
    for name, (units, activation, classes) in HEADS.items():
        model = tiny_model(units, activation)
        out[name] = {"model": model, "path": ox.export(model, SIZE, folder / f"{name}.onnx"), "classes": classes}
    return out


@pytest.mark.parametrize("head", sorted(HEADS))
def test_export_keeps_keras_outputs_within_the_parity_bound_at_any_batch_size(exported, head):
    model, path = exported[head]["model"], exported[head]["path"]
    sess = ox.session(path, threads=1)
    for n in (1, 5):
        images = ox.random_images(SIZE, n, seed=n)
        assert ox.run(sess, images).shape == (n, HEADS[head][0])
        assert ox.run(sess, images).dtype == np.float64
        diff = ox.parity(model, sess, images)
        assert diff <= ox.PARITY_BOUND
        ox.check_parity(diff, path)  # does not raise


def test_export_leaves_only_the_onnx_file(exported):
    assert sorted(p.name for p in exported["softmax"]["path"].parent.iterdir()) == ["sigmoid.onnx", "softmax.onnx"]


@pytest.mark.parametrize("diff", [1e-3, math.nan])
def test_parity_above_the_bound_or_nan_is_an_error_naming_the_file(tmp_path, diff):
    with pytest.raises(HarnessError, match="m.onnx") as e:
        ox.check_parity(diff, tmp_path / "m.onnx")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("content", [b"not an onnx model\n\x00\x01junk\n" * 10, None])
def test_a_corrupt_or_missing_onnx_file_is_a_one_line_error_naming_it(tmp_path, content):
    path = tmp_path / "broken.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(HarnessError) as e:
        ox.session(path)
    message = str(e.value)
    assert str(path) in message
    assert "\n" not in message


def test_int8_quantized_file_loads_and_predicts_probabilities(exported, tmp_path):
    dst = ox.quantize_int8(exported["softmax"]["path"], tmp_path / "q" / "int8.onnx")
    assert dst.is_file() and sorted(p.name for p in dst.parent.iterdir()) == ["int8.onnx"]
    p = ox.run(ox.session(dst), ox.random_images(SIZE, 4))
    assert p.shape == (4, 3)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-3)


def test_latency_is_positive_with_median_within_p95(exported):
    sess = ox.session(exported["softmax"]["path"])
    res = ox.latency(lambda x: ox.run(sess, x), ox.random_images(SIZE, 3), batch=4, repeats=5, warmup=1)
    assert 0 < res["median_ms"] <= res["p95_ms"]
    assert res["per_image_ms"] == pytest.approx(res["median_ms"] / 4)


def test_serving_cost_gives_flat_metrics_for_keras_onnx_and_int8_at_both_batches(exported, tmp_path):
    model, path = exported["softmax"]["model"], exported["softmax"]["path"]
    keras_path, int8_path = tmp_path / "m.keras", ox.quantize_int8(path, tmp_path / "int8.onnx")
    model.save(keras_path)
    cost = ox.serving_cost(model, path, SIZE, keras_path=keras_path, int8_path=int8_path, repeats=3)
    for runtime in ("keras", "onnx", "int8"):
        assert cost[f"cost.{runtime}_file_mb"] > 0
        for b in (1, 32):
            assert 0 < cost[f"cost.{runtime}.b{b}.median_ms"] <= cost[f"cost.{runtime}.b{b}.p95_ms"]
    assert cost["cost.params"] == model.count_params()
    assert cost["cost.onnx.parity"] <= ox.PARITY_BOUND
    assert cost["cost.onnx.label_agreement"] == 1.0
    assert 0 <= cost["cost.int8.label_agreement"] <= 1
    assert cost["cost.onnx_vs_keras_latency_ratio"] > 0
    assert all(isinstance(v, float) for v in cost.values())


LOAD_WITHOUT_HARNESS = """
import sys
sys.modules['harness'] = None  # any `import harness` in this process fails
import json, mlflow, numpy as np
x = np.load(sys.argv[1])
out = {uri: mlflow.pyfunc.load_model(uri).predict(x).to_dict(orient="split") for uri in sys.argv[2:]}
print(json.dumps({"predictions": out, "tensorflow_loaded": "tensorflow" in sys.modules}))
"""


def log_onnx_pyfunc(path: Path, classes: list[str]) -> str:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("float32"), (-1, SIZE, SIZE, 3))]),
        outputs=Schema([ColSpec("double", c) for c in classes]),
    )
    requirements = [f"{d}=={importlib.metadata.version(d)}" for d in ("mlflow", "onnxruntime")] + ["numpy", "pandas"]
    with mlflow.start_run():
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(ONNX_MODEL_CODE),
            artifacts={"onnx_model": str(path)},
            model_config={"classes": classes},
            signature=signature,
            pip_requirements=requirements,
        ).model_uri


@pytest.mark.slow
def test_onnx_pyfunc_answers_keras_probabilities_per_class_without_harness_or_tensorflow(exported, tmp_path):
    images = ox.random_images(SIZE, 5, seed=3)
    np.save(tmp_path / "x.npy", images)
    uris = {head: log_onnx_pyfunc(e["path"], e["classes"]) for head, e in exported.items()}
    res = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_HARNESS, str(tmp_path / "x.npy"), *uris.values()],
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()},  # the store the models were logged in
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    answer = json.loads(res.stdout.strip().splitlines()[-1])
    assert not answer["tensorflow_loaded"]
    for head, uri in uris.items():
        got = answer["predictions"][uri]
        p = exported[head]["model"].predict(images, verbose=0).astype("float64")
        expected = np.concatenate([1 - p, p], axis=1) if head == "sigmoid" else p
        assert got["columns"] == exported[head]["classes"]
        np.testing.assert_allclose(np.asarray(got["data"]), expected, atol=1e-4)
        np.testing.assert_allclose(np.asarray(got["data"]).sum(axis=1), 1.0, atol=1e-4)
