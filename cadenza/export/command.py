"""`cadenza export_model` and `cadenza export_mlflow`, with Ludwig's flags. No exporter is imported here (formats.py
imports them when a command runs), so `cadenza --help` stays fast."""

from __future__ import annotations

import argparse

from .formats import DEFAULT_GGUF_DTYPE, FORMATS, GGUF_DTYPES


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "export_model", help="export a trained model: gguf (llm), onnx (ecd) or safetensors (both)",
        description="Export a trained model for another runtime. gguf: llama.cpp/Ollama/LM Studio (llm, adapter "
                    "merged, with an Ollama Modelfile); onnx: onnxruntime (ecd, with its tokenizers); safetensors: "
                    "plain transformers/PEFT files. GGUF and ONNX files are checked in their runtime before they "
                    "are written. See docs/export.md.")
    p.add_argument("-m", "--model_path", required=True, help="run folder or its model/ folder")
    p.add_argument("-o", "--output_path", required=True,
                   help="folder to write (created; replaced only when it holds an earlier export)")
    p.add_argument("-f", "--format", required=True, help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--dtype", help=f"gguf: tensor type, one of {', '.join(GGUF_DTYPES)} "
                                   f"(default: {DEFAULT_GGUF_DTYPE})")
    p.add_argument("--skip_verify", action="store_true",
                   help="do not load the GGUF/ONNX file back in its runtime to compare it with the model")
    p.set_defaults(func=cmd_export_model)

    p = subparsers.add_parser("export_mlflow", help="export a trained model as an MLflow pyfunc model",
                              description="Save a trained model as an MLflow pyfunc model (no tracking server "
                                          "needed): mlflow.pyfunc.load_model(OUTPUT).predict(df) returns Cadenza's "
                                          "predictions. See docs/export.md.")
    p.add_argument("-m", "--model_path", required=True, help="run folder or its model/ folder")
    p.add_argument("-o", "--output_path", required=True,
                   help="folder to write (created; replaced only when it holds an earlier export)")
    p.set_defaults(func=cmd_export_mlflow)


def cmd_export_model(args: argparse.Namespace) -> None:
    from .formats import export_model

    export_model(args.model_path, args.output_path, args.format, dtype=args.dtype, verify=not args.skip_verify)


def cmd_export_mlflow(args: argparse.Namespace) -> None:
    from .formats import export_mlflow

    export_mlflow(args.model_path, args.output_path)
