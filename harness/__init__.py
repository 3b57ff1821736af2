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
    """Load a model the harness logged as a Keras model (e.g. `models:/demo-task2@champion` or `runs:/<id>/model`),
    from the harness's store. It takes raw 0-255 RGB images of the recipe's size and returns class probabilities
    (classes sorted by folder name). Models need no harness code to load (`mlflow.keras.load_model` or
    `mlflow.pyfunc.load_model` work in any process); importing the layers here registers the preprocessing layer of
    models logged by earlier versions of the harness, so those load too.
    """
    import mlflow.keras

    from harness.models import layers  # noqa: F401
    from harness.paths import get_paths

    mlflow.set_tracking_uri(get_paths().tracking_uri)
    return mlflow.keras.load_model(model_uri)
