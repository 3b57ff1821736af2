"""MLflow "models from code" file: MLflow copies it into every model the harness logs and runs it when the model is
loaded as a pyfunc (`mlflow.pyfunc.load_model`, `mlflow models serve`), so it imports nothing from `harness`.

It loads the plain Keras file logged beside it (built-in layers only, Keras' safe mode on) and answers one row of
class probabilities per image, one column per class, in the order of `model_config["classes"]`.
"""

import keras
import mlflow
import numpy as np
import pandas as pd


class ClassProbabilities(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.model = keras.saving.load_model(context.artifacts["keras_model"], compile=False, safe_mode=True)
        self.classes = list(context.model_config["classes"])

    def predict(self, context, model_input: np.ndarray, params=None):  # the type hint keeps MLflow from warning
        x = np.asarray(model_input, dtype="float32")  # the signature has checked the shape: (-1, S, S, 3)
        p = np.asarray(self.model.predict(x, batch_size=32, verbose=0), dtype="float64")
        if p.shape[1] == 1 and len(self.classes) == 2:  # a sigmoid head gives P(second class)
            p = np.concatenate([1.0 - p, p], axis=1)
        return pd.DataFrame(p, columns=self.classes)


mlflow.models.set_model(ClassProbabilities())
