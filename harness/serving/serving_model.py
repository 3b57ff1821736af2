"""MLflow "models from code" file: MLflow copies it into every model the harness logs and runs it when the model is
loaded as a pyfunc (`mlflow.pyfunc.load_model`, `mlflow models serve`), so it imports nothing from `harness`.

It loads the model file logged beside it — the plain Keras file (artifact `keras_model`; built-in layers only, Keras'
safe mode on) or its ONNX export (artifact `onnx_model`, run by ONNX Runtime: no TensorFlow imported, so an ONNX
server needs only mlflow, numpy, pandas and onnxruntime) — and answers one row of class probabilities per image, one
column per class, in the order of `model_config["classes"]`. When the model config holds a `temperature` (fitted on
out-of-fold predictions) the probabilities are the calibrated ones, softmax(log p / T); with an `operating_point`
({class, threshold}) a `decision` column follows: 1 where P(class) >= threshold. (`mlflow.keras.load_model` on a Keras
model's URI gives its raw probabilities.)
"""

import mlflow
import numpy as np
import pandas as pd

BATCH = 32  # images per call: memory bounded for a large request


class ClassProbabilities(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.classes = list(context.model_config["classes"])
        self.config = dict(context.model_config)
        if "onnx_model" in context.artifacts:
            self.outputs = onnx_runner(context.artifacts["onnx_model"])
        else:
            import keras

            self.model = keras.saving.load_model(context.artifacts["keras_model"], compile=False, safe_mode=True)
            self.outputs = lambda x: self.model.predict(x, batch_size=BATCH, verbose=0)

    def predict(self, context, model_input: np.ndarray, params=None):  # the type hint keeps MLflow from warning
        x = np.asarray(model_input, dtype="float32")  # the signature has checked the shape: (-1, S, S, 3)
        p = np.asarray(self.outputs(x), dtype="float64")
        if p.shape[1] == 1 and len(self.classes) == 2:  # a sigmoid head gives P(second class)
            p = np.concatenate([1.0 - p, p], axis=1)
        return answer(p, self.classes, self.config)


def onnx_runner(path: str):
    """The ONNX graph's outputs for a batch of images, BATCH images per ONNX Runtime call."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    # Idle threads sleep instead of spinning: on a shared CPU spinning made ONNX Runtime slower than Keras.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def outputs(x: np.ndarray) -> np.ndarray:
        chunks = [x[i : i + BATCH] for i in range(0, max(len(x), 1), BATCH)]
        return np.concatenate([session.run(None, {name: chunk})[0] for chunk in chunks])

    return outputs


def answer(p: np.ndarray, classes: list, config: dict) -> pd.DataFrame:
    """Probabilities (calibrated when the config has a temperature) and, with an operating point, the decision."""
    t = float(config.get("temperature", 1.0))
    if t != 1.0:
        z = np.log(np.clip(p, 1e-12, 1.0)) / t
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
    table = pd.DataFrame(p, columns=classes)
    op = config.get("operating_point")
    if op:
        table["decision"] = (table[op["class"]] >= float(op["threshold"])).astype("int64")
    return table


mlflow.models.set_model(ClassProbabilities())
