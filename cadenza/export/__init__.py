"""Exports of a trained model for other runtimes: `cadenza export_model -f gguf|onnx|safetensors` and
`cadenza export_mlflow`. See docs/export.md.

Importing this package is cheap (argparse only): torch, gguf, onnx and mlflow load when a command runs.

| module | one job |
|---|---|
| `command.py` | the two CLI commands (Ludwig's flags) |
| `formats.py` | `export_model`: which formats fit which model type, loading the model, the atomic output folder |
| `folder.py` | the output folder: written aside and renamed into place, replacing only an earlier export |
| `llm_weights.py` | an llm's causal LM in float32 with any adapter merged |
| `to_safetensors.py` | a plain transformers/PEFT folder (llm) or the head weights and metadata (ecd) |
| `to_gguf.py`, `gguf_vocab.py` | llm → one GGUF file (hyperparameters, tensors, tokenizer, chat template) |
| `modelfile.py` | the Ollama Modelfile beside the GGUF file |
| `to_onnx.py` | ecd → model.onnx (text encoders, tabular inputs, combiner, heads) + tokenizers + description |
| `to_mlflow.py`, `mlflow_model.py` | an MLflow pyfunc model whose predict is Cadenza's (models from code: no pickle) |
| `verify.py` | the checks every export passes before it is moved into place (logits, probabilities) |
"""

from .command import register_cli

__all__ = ["register_cli"]
