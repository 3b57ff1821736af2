"""Serving: the harness's models as MLflow models, their ONNX export, prediction and explanation on image files, and
the MLflow servers."""
