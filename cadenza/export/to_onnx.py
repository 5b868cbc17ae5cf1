"""ecd → model.onnx: the whole network (text encoders, tabular inputs, combiner, heads) as one graph with dynamic
batch and sequence axes, the text features' tokenizers beside it, and the inputs/outputs described in the export
info (cadenza_export.json).

Graph inputs, in input-feature order: a text feature `f` takes `f_input_ids` and `f_attention_mask` (int64,
batch × sequence) from the tokenizer in `tokenizers/f/`; a category takes `f` (int64, batch): the index of the
value in its vocabulary (0 for a value not in it); a number takes `f` (float32, batch) as it is (the graph
normalises it); a binary takes `f` (float32, batch): 1.0 for true (the export info lists the true values).
Graph outputs: `f_probabilities` (category, set: batch × labels), `f_probability` (binary: P(true), batch),
`f_predictions` (number, batch, original scale). Missing values are filled before, as the export info's
`fill_value` says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..data.cache import cache_root, configured_cache_dir
from ..ecd import features as FT
from ..ecd.text_encoder import TextEncoder, load_tokenizer

ONNX_FILE = "model.onnx"
TOKENIZERS_DIR = "tokenizers"
SINGLE_FILE_LIMIT = 1_800_000_000  # bytes of weights; protobuf caps one file at 2 GB, beyond it they go beside it
EXAMPLE_TEXTS = ["a short text", "a somewhat longer text, to pad the first one", "The quick brown fox jumps over "
                 "the lazy dog; 12 of 345 foxes agree."]


class ExportedNetwork(nn.Module):
    """EcdNet with what Cadenza does around it as graph operations: the frozen encoders whose embeddings Cadenza
    caches, number normalisation, and softmax/sigmoid/denormalisation of the heads' outputs."""

    def __init__(self, net: nn.Module, cached_encoders: dict[str, nn.Module], config, metadata: dict):
        super().__init__()
        self.net = net
        self.cached_encoders = nn.ModuleDict(cached_encoders)
        self.inputs = [(f.name, f.type) for f in config.input_features]
        self.outputs = [(f.name, f.type) for f in config.output_features]
        self.metadata = metadata

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values = iter(tensors)
        inputs: dict = {}
        for name, kind in self.inputs:
            if kind == "text":
                ids, mask = next(values), next(values)
                inputs[name] = self.cached_encoders[name](ids, mask) if name in self.cached_encoders else (ids, mask)
            elif kind == "category":
                inputs[name] = next(values)
            elif kind == "number":
                inputs[name] = _normalize(next(values), self.metadata[name]).unsqueeze(-1)
            else:  # binary
                inputs[name] = next(values).unsqueeze(-1)
        logits = self.net(inputs)
        return tuple(_finish(logits[name], kind, self.metadata[name]) for name, kind in self.outputs)


def _normalize(x: torch.Tensor, meta: dict) -> torch.Tensor:
    # cadenza.ecd.features normalises with numpy; its affine kinds work on tensors as they are
    return torch.log1p(x) if meta.get("normalization") == "log1p" else FT._normalize(x, meta)


def _finish(logits: torch.Tensor, kind: str, meta: dict) -> torch.Tensor:
    if kind == "category":
        return torch.softmax(logits, dim=-1)
    if kind == "set":
        return torch.sigmoid(logits)
    if kind == "binary":
        return torch.sigmoid(logits[:, 0])
    values = logits[:, 0]
    return torch.expm1(values) if meta.get("normalization") == "log1p" else FT.denormalize(values, meta)


def input_names(config) -> list[str]:
    names = []
    for f in config.input_features:
        names += [f"{f.name}_input_ids", f"{f.name}_attention_mask"] if f.type == "text" else [f.name]
    return names


def output_names(config) -> list[str]:
    suffix = {"category": "probabilities", "set": "probabilities", "binary": "probability", "number": "predictions"}
    return [f"{f.name}_{suffix[f.type]}" for f in config.output_features]


def write_onnx(model, folder: Path) -> dict:
    """Write model.onnx and tokenizers/<feature>/ into `folder`; returns the inputs/outputs description."""
    ecd, config = model.model, model.config
    tokenizers = {f.name: load_tokenizer(f.encoder, _cache(model)) for f in config.input_features if f.type == "text"}
    network = ExportedNetwork(ecd.net, _cached_encoders(model), config, ecd.metadata).eval()
    example = encode_rows(model, example_rows(model), tokenizers)
    names = input_names(config)
    size = sum(p.numel() * p.element_size() for p in network.parameters())
    torch.onnx.export(network, tuple(torch.from_numpy(example[n]) for n in names), str(folder / ONNX_FILE),
                      input_names=names, output_names=output_names(config), dynamo=True,
                      dynamic_shapes=_dynamic_shapes(config), external_data=size > SINGLE_FILE_LIMIT, verbose=False)
    for name, tokenizer in tokenizers.items():
        tokenizer.save_pretrained(folder / TOKENIZERS_DIR / name)
    return describe(config, ecd.metadata)


def _cache(model) -> str:
    return str(cache_root(configured_cache_dir(model.config)))


def _cached_encoders(model) -> dict[str, nn.Module]:
    """The pretrained encoders of text features Cadenza feeds cached embeddings (the network holds no encoder
    for them), loaded as Cadenza loads them to embed."""
    ecd = model.model
    return {f.name: TextEncoder(f.encoder, cache=_cache(model)).eval() for f in model.config.input_features
            if f.type == "text" and ecd.metadata[f.name]["cached"]}


def _dynamic_shapes(config) -> tuple:
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes: list = []
    for f in config.input_features:
        shapes += [{0: batch, 1: sequence}] * 2 if f.type == "text" else [{0: batch}]
    return (tuple(shapes),)  # forward(*tensors): one variadic argument holding them all


def example_rows(model, n: int = 2) -> pd.DataFrame:
    """Rows (up to 3) every input feature can take: the tracing example (2) and the export's own check (3)."""
    rows: dict[str, list] = {}
    for f in model.config.input_features:
        meta = model.model.metadata[f.name]
        if f.type == "text":
            values = EXAMPLE_TEXTS
        elif f.type == "category":
            values = [meta["vocab"][-1], "a value never seen in training", meta["vocab"][0]]
        elif f.type == "number":
            values = [meta["mean"], meta["mean"] + meta["std"], meta["min"]]
        else:
            labels = meta.get("labels") or [False, True]
            values = [labels[0], labels[-1], labels[-1]]
        rows[meta["column"]] = values[:n]
    return pd.DataFrame(rows)


def encode_rows(model, df: pd.DataFrame, tokenizers: dict) -> dict[str, np.ndarray]:
    """The graph's inputs for the rows of `df`, prepared as Cadenza prepares them (what a client of model.onnx
    does: docs/export.md)."""
    config, metadata = model.config, model.model.metadata
    for f in config.input_features:
        df = FT.fill_missing(df, f, metadata[f.name])
    feeds: dict[str, np.ndarray] = {}
    for f in config.input_features:
        meta = metadata[f.name]
        if f.type == "text":
            texts = df[meta["column"]].astype(str)
            texts = texts.str.lower() if f.preprocessing.lowercase else texts
            batch = tokenizers[f.name](texts.tolist(), truncation=True, max_length=meta["max_length"], padding=True,
                                       return_tensors="np")
            feeds[f"{f.name}_input_ids"] = batch["input_ids"].astype(np.int64)
            feeds[f"{f.name}_attention_mask"] = batch["attention_mask"].astype(np.int64)
        elif f.type == "number":
            feeds[f.name] = pd.to_numeric(df[meta["column"]]).to_numpy(np.float32)
        else:  # category: vocabulary index; binary: 0/1
            feeds[f.name] = np.asarray(FT.encode_input(df, f, meta)).reshape(len(df))
    return feeds


def _true_values(meta: dict) -> dict:
    """Which values of a binary input are 1.0 (booleans are themselves), as cadenza.ecd.features reads them."""
    labels, fallback = meta.get("labels") or [], meta.get("fallback_true_label")
    if labels:  # two arbitrary labels: the second is true
        return {"true_values": labels[1:], "case_insensitive": False}
    if fallback:
        return {"true_values": [fallback], "case_insensitive": False}
    return {"true_values": sorted(FT.TRUE_STRINGS), "case_insensitive": True}


def describe(config, metadata: dict) -> dict:
    inputs = []
    for f in config.input_features:
        meta = metadata[f.name]
        item = {"feature": f.name, "type": f.type, "column": meta["column"], "fill_value": meta.get("fill_value")}
        if f.type == "text":
            item.update(onnx_inputs=[f"{f.name}_input_ids", f"{f.name}_attention_mask"], dtype="int64",
                        shape=["batch", "sequence"], tokenizer=f"{TOKENIZERS_DIR}/{f.name}",
                        max_length=meta["max_length"], lowercase=f.preprocessing.lowercase)
        elif f.type == "category":
            item.update(onnx_inputs=[f.name], dtype="int64", shape=["batch"], vocab=meta["vocab"])
        else:
            item.update(onnx_inputs=[f.name], dtype="float32", shape=["batch"])
            if f.type == "binary":
                item.update(_true_values(meta))
        inputs.append(item)
    outputs = []
    for f, name in zip(config.output_features, output_names(config)):
        meta = metadata[f.name]
        item = {"feature": f.name, "type": f.type, "onnx_output": name}
        if f.type in ("category", "set"):
            item.update(shape=["batch", len(meta["vocab"])], labels=meta["vocab"])
        else:
            item["shape"] = ["batch"]
        if f.type == "binary":
            item["labels"] = meta.get("labels") or [False, True]
        if f.type in ("binary", "set"):
            item["threshold"] = f.threshold
        outputs.append(item)
    return {"inputs": inputs, "outputs": outputs}
