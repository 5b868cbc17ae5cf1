"""The pyfunc model MLflow builds when it loads a Cadenza export (models from code: this file is run, nothing is
unpickled). Its predict takes a DataFrame of input columns and returns Cadenza's prediction DataFrame. It has no
type hints on purpose: MLflow would then check the input's types and refuse, say, integer codes in a category
column that Cadenza reads as text."""

import mlflow
from mlflow.pyfunc import PythonModel

from cadenza.export.to_mlflow import ARTIFACT


class CadenzaModel(PythonModel):
    def load_context(self, context):
        from cadenza.api import Model

        self.model = Model.load(context.artifacts[ARTIFACT], log=lambda _: None)

    def predict(self, context, model_input, params=None):
        return self.model.predict(model_input)


mlflow.models.set_model(CadenzaModel())
