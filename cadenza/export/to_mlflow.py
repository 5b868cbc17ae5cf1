"""`cadenza export_mlflow`: an MLflow pyfunc model whose predict is Cadenza's. Saved as a model from code: MLflow
runs mlflow_model.py when it loads the model, and that file calls `Model.load` on the Cadenza model folder copied
in as an artifact; nothing is pickled. No tracking server is needed; `mlflow models serve -m OUT` serves it."""

from __future__ import annotations

from pathlib import Path

from .. import __version__

ARTIFACT = "cadenza_model"  # the artifact holding the Cadenza model folder (mlflow_model.py loads it)
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")


def write_mlflow(model, folder: Path) -> dict:
    """Save the model in `model.model_dir` as an MLflow pyfunc model in the (empty) folder `folder`."""
    import mlflow.pyfunc

    mlflow.pyfunc.save_model(
        path=str(folder), python_model=str(MODEL_CODE), artifacts={ARTIFACT: str(model.model_dir)},
        # the environment MLflow recreates to serve it: this Cadenza, which brings torch, transformers and peft
        pip_requirements=[f"cadenza=={__version__}"],
        metadata={"cadenza_version": __version__, "model_type": model.config.model_type})
    return {"flavor": "python_function", "mlflow_version": mlflow.__version__}
