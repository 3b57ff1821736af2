"""The harness's models as standard MLflow models: a pyfunc that answers class-named probability columns, plus the
standard `keras` flavor on the same file.

A logged model loads without the harness: `mlflow.pyfunc.load_model`, `mlflow.keras.load_model`,
`mlflow.tensorflow.load_model` and `mlflow models serve` all work on its URI. Its `model_config` records the classes,
the image size and the colour policy, so a client (and `harness predict`) can prepare images as training did.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import tempfile
from pathlib import Path

import keras
import mlflow
import numpy as np

log = logging.getLogger(__name__)

SERVING_CODE = Path(__file__).with_name("serving_model.py")  # MLflow copies this file into every model


class KerasWithClassColumns:
    """A flavor module for `mlflow.models.Model.log`: the pyfunc (models from code) and the standard `keras` flavor,
    both pointing at the same `.keras` file, so one model URI loads with every MLflow and Keras loader."""

    __name__ = "keras_with_class_columns"

    @staticmethod
    def save_model(path, mlflow_model, **kwargs):
        kwargs.pop("validate_serving_input", None)  # read by Model.log itself, unknown to pyfunc.save_model
        mlflow.pyfunc.save_model(path, mlflow_model=mlflow_model, **kwargs)
        # mlflow.keras.load_model reads <path>/artifacts/model.keras; save_format and keras_module make
        # mlflow.tensorflow.load_model (which reads this same flavor) take the Keras 3 file too.
        mlflow_model.add_flavor(
            "keras",
            data="artifacts",
            keras_version=keras.__version__,
            keras_backend=keras.backend.backend(),
            save_exported_model=False,
            save_format="keras",
            keras_module="keras",
        )
        mlflow_model.save(os.path.join(path, "MLmodel"))


def requirements() -> list[str]:
    """The installed TensorFlow distribution (tensorflow-cpu here, tensorflow on a GPU machine) and the rest."""
    tf = next((d for d in ("tensorflow", "tensorflow-cpu") if _installed(d)), "tensorflow")
    return [
        f"{tf}=={importlib.metadata.version(tf)}",
        f"keras=={keras.__version__}",
        f"mlflow=={mlflow.__version__}",
        "pandas",
        "numpy",
    ]


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def input_example(size: int) -> np.ndarray:
    """One synthetic image (a grey ramp, no patient data) in exactly the form the model takes: (1, S, S, 3) float32
    of raw 0-255 RGB values."""
    ramp = np.linspace(0, 255, size).round().astype("float32")
    return np.broadcast_to(ramp[None, None, :, None], (1, size, size, 3)).copy()


def signature(classes: list[str], image_size: int, config: dict):
    """Raw (N, S, S, 3) float32 images in; a probability column per class out, and the `decision` column when the
    config holds an operating point (`serving_model.answer`)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    outputs = [ColSpec("double", c) for c in classes]
    if "operating_point" in config:
        outputs.append(ColSpec("long", "decision"))
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("float32"), (-1, image_size, image_size, 3))]), outputs=Schema(outputs)
    )


def log_classifier(
    model: keras.Model,
    classes: list[str],
    image_size: int,
    colour: str,
    registered_model_name: str | None = None,
    **config,
) -> mlflow.models.model.ModelInfo:
    """Log (and register) a model of raw images as a standard MLflow model in the active run."""
    from mlflow.models import Model

    log.info("Logging the model%s", f" and registering it as {registered_model_name}" if registered_model_name else "")
    with tempfile.TemporaryDirectory() as tmp:
        keras_file = os.path.join(tmp, "model.keras")
        model.save(keras_file)
        return Model.log(
            artifact_path=None,
            name="model",
            flavor=KerasWithClassColumns,
            python_model=str(SERVING_CODE),
            artifacts={"keras_model": keras_file},
            model_config={"classes": list(classes), "image_size": image_size, "colour": colour, **config},
            signature=signature(classes, image_size, config),
            input_example=input_example(image_size),
            registered_model_name=registered_model_name,
            pip_requirements=requirements(),
        )


def log_onnx(path, classes: list[str], image_size: int, colour: str, **config) -> mlflow.models.model.ModelInfo:
    """Log an ONNX export as the pyfunc `onnx` of the active run: the same models-from-code file on ONNX Runtime,
    answering exactly as the Keras model's pyfunc (class columns, calibration, decision); it needs no TensorFlow."""
    return mlflow.pyfunc.log_model(
        name="onnx",
        python_model=str(SERVING_CODE),
        artifacts={"onnx_model": str(path)},
        model_config={"classes": list(classes), "image_size": image_size, "colour": colour, **config},
        signature=signature(classes, image_size, config),
        input_example=input_example(image_size),
        pip_requirements=[
            f"mlflow=={mlflow.__version__}",
            f"onnxruntime=={importlib.metadata.version('onnxruntime')}",
            "pandas",
            "numpy",
        ],
    )
