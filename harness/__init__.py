"""cxr-harness: MLflow-tracked comparison of Keras transfer-learning models on chest X-rays.

Importing the package fixes TensorFlow's thread settings before TensorFlow is imported anywhere: on 2 cores
inter-op 1 / intra-op 2 measured ~1.9x faster DenseNet121 training than TensorFlow's defaults.
"""

import os

os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(max(1, min(os.cpu_count() or 2, 8))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# MLflow's own "git not found"/telemetry chatter is noise for users of a CLI.
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

__version__ = "0.1.0"


def load_model(model_uri: str):
    """Load a model the harness logged (e.g. `models:/demo-task2-efficientnet_lite0/1` or `runs:/<id>/model`).

    Importing the harness's layers first registers its preprocessing layer with Keras; the model then takes raw
    0-255 RGB images of the recipe's size and returns class probabilities (classes sorted by folder name).
    """
    import mlflow.keras

    from harness.models import layers  # noqa: F401
    from harness.paths import get_paths

    mlflow.set_tracking_uri(get_paths().tracking_uri)
    return mlflow.keras.load_model(model_uri)
