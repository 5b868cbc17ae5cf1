"""`cadenza merge`: the command line of cadenza.llm.merge. Kept apart so that `cadenza --help` loads no torch."""

from __future__ import annotations

import argparse
from pathlib import Path

def register_cli(sub) -> None:
    p = sub.add_parser("merge", help="llm: combine LoRA adapters trained on one base model (linear, TIES, DARE)")
    p.add_argument("-m", "--model_path", action="append", required=True,
                   help="a trained model (run or model folder); repeat for each adapter")
    p.add_argument("-o", "--output_path", required=True, help="where to write the merged model folder")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per model (default 1/n each)")
    # checked by merge_models against cadenza.llm.merge.COMBINATIONS (argparse choices would import torch)
    p.add_argument("--combination", default="linear", help="PEFT's combination type: linear (default), ties, "
                   "dare_linear, dare_ties, magnitude_prune, cat, svd, ties_svd, dare_linear_svd, ...")
    p.add_argument("--density", type=float, help="fraction of entries kept (ties, dare_*, magnitude_prune)")
    p.add_argument("--merge_into_base", action="store_true",
                   help="save a plain transformers model (base + combined adapter) instead of an adapter")
    p.set_defaults(func=_cmd_merge)


def _cmd_merge(a: argparse.Namespace) -> None:
    from .llm.merge import merge_models

    merge_models(a.model_path, Path(a.output_path), weights=a.weights, combination=a.combination,
                 density=a.density, merge_into_base=a.merge_into_base)
