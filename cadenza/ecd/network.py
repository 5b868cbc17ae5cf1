"""The ecd network: input modules → concat combiner (MLP) → one head per output. Built by small functions."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn
from torch.nn import functional as F

# A head on cached embeddings multiplies (rows x width) by (width x outputs): microseconds of work per op, about what
# handing an op to a team of OpenMP threads costs; and on a busy machine the team waits for a core that another
# process holds (one busy process on a 2-core machine took the README head from ~37,000 to ~400 rows/s). A network
# whose largest matmul on a batch is below this many FLOPs runs on one thread.
ONE_THREAD_BELOW_FLOPS = 2**24
LARGE_NETWORK_PARAMETERS = 10_000_000  # a trained text encoder inside: its matmuls are worth every thread


def threads_for(net: nn.Module, rows: int) -> Optional[int]:
    """1 where every matmul of `net` on `rows` rows is too small to share out, else None (torch's own setting)."""
    if sum(p.numel() for p in net.parameters()) > LARGE_NETWORK_PARAMETERS:
        return None
    largest = max((m.in_features * m.out_features for m in net.modules() if isinstance(m, nn.Linear)), default=0)
    return 1 if 2 * rows * largest < ONE_THREAD_BELOW_FLOPS else None


@contextlib.contextmanager
def torch_threads(n: Optional[int]) -> Iterator[None]:
    """torch's intra-op thread count set to `n` inside the block and restored after it (None: left alone)."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


INITIALIZERS = {"xavier_uniform": nn.init.xavier_uniform_, "xavier_normal": nn.init.xavier_normal_,
                "kaiming_uniform": nn.init.kaiming_uniform_, "kaiming_normal": nn.init.kaiming_normal_,
                "normal": nn.init.normal_, "uniform": nn.init.uniform_, "zeros": nn.init.zeros_, "ones": nn.init.ones_}


def linear(in_size: int, out_size: int, use_bias: bool = True, weights_initializer: Optional[str] = None,
           bias_initializer: Optional[str] = None) -> nn.Linear:
    """nn.Linear, with Ludwig's named initializers when given (torch's defaults otherwise)."""
    layer = nn.Linear(in_size, out_size, bias=use_bias)
    if weights_initializer:
        INITIALIZERS[weights_initializer](layer.weight)
    if use_bias and bias_initializer:
        INITIALIZERS[bias_initializer](layer.bias)
    return layer


def mlp(in_size: int, layers: list[dict], default_activation: str, default_dropout: float,
        norm: Optional[str], residual: bool = False, norm_params: Optional[dict] = None,
        **linear_options) -> tuple[nn.Sequential, int]:
    """Fully connected layers. With `residual`, a layer whose input and output widths match adds its input to
    its output (Ludwig's concat combiner `residual: true`). `linear_options` go to `linear`."""
    modules: list[nn.Module] = []
    size = in_size
    for layer in layers:
        out = layer.get("output_size", 256)
        block: list[nn.Module] = [linear(size, out, **linear_options)]
        kind = layer.get("norm", norm)
        if kind == "batch":
            block.append(nn.BatchNorm1d(out, **(norm_params or {})))
        elif kind == "layer":
            block.append(nn.LayerNorm(out, **(norm_params or {})))
        block.append(ACTIVATIONS[layer.get("activation", default_activation)]())
        dropout = layer.get("dropout", default_dropout)
        if dropout:
            block.append(nn.Dropout(dropout))
        if residual and out == size:
            modules.append(Residual(nn.Sequential(*block)))
        else:
            modules.extend(block)
        size = out
    return nn.Sequential(*modules), size


def combiner_layers(combiner) -> list[dict]:
    if combiner.fc_layers is not None:
        allowed = {"output_size", "dropout", "activation", "norm"}
        for i, layer in enumerate(combiner.fc_layers):
            unknown = set(layer) - allowed
            if unknown:
                from ..errors import ConfigError

                raise ConfigError([(f"combiner.fc_layers[{i}]", f"unknown key(s) {sorted(unknown)}; "
                                    f"allowed: {sorted(allowed)}")])
        return list(combiner.fc_layers)
    return [{"output_size": combiner.output_size}] * combiner.num_fc_layers


def output_size(feature, meta: dict) -> int:
    if feature.type in ("category", "set"):
        return len(meta["vocab"])
    return 1


class CategoryEmbedding(nn.Module):
    def __init__(self, vocab_size: int, size: int, dropout: float):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, size)
        self.dropout = nn.Dropout(dropout)
        self.output_size = size

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.embed(index))


class EcdNet(nn.Module):
    """`inputs`: name → module producing (batch, size); text inputs whose embeddings are cached use Identity."""

    def __init__(self, inputs: dict[str, nn.Module], input_sizes: dict[str, int], combiner, outputs: list,
                 metadata: dict):
        super().__init__()
        self.inputs = nn.ModuleDict(inputs)
        self.input_order = list(inputs)
        width = sum(input_sizes.values())
        self.combiner, width = mlp(width, combiner_layers(combiner), combiner.activation, combiner.dropout,
                                   combiner.norm, residual=combiner.residual, norm_params=combiner.norm_params,
                                   use_bias=combiner.use_bias, weights_initializer=combiner.weights_initializer,
                                   bias_initializer=combiner.bias_initializer)
        self.heads = nn.ModuleDict()
        for f in outputs:
            d = f.decoder
            hidden, size = mlp(width, [{"output_size": d.fc_output_size, "dropout": d.fc_dropout,
                                        "activation": d.fc_activation}] * d.num_fc_layers, d.fc_activation, 0.0, None)
            self.heads[f.name] = nn.Sequential(hidden, nn.Linear(size, output_size(f, metadata[f.name])))

    def forward(self, inputs: dict) -> dict[str, torch.Tensor]:
        parts = []
        for name in self.input_order:
            value = inputs[name]
            module = self.inputs[name]
            parts.append(module(*value) if isinstance(value, tuple) else module(value))
        hidden = self.combiner(torch.cat([p.float() for p in parts], dim=-1))
        return {name: head(hidden) for name, head in self.heads.items()}


def output_loss(feature, logits: torch.Tensor, target: torch.Tensor, meta: dict) -> torch.Tensor:
    """Summed over rows (the trainer divides by rows in the effective batch). A category target of shape (rows,
    classes) holds class probabilities (soft targets, cadenza.distill): cross-entropy against them; a binary target
    may hold probabilities too."""
    loss_cfg = feature.loss
    if feature.type == "category":
        weight = _class_weights(loss_cfg.class_weights, meta["vocab"], logits)
        return F.cross_entropy(logits, target, weight=weight, ignore_index=-1, reduction="sum",
                               label_smoothing=loss_cfg.label_smoothing)
    if feature.type == "binary":
        pos = torch.tensor(loss_cfg.positive_class_weight, device=logits.device) \
            if loss_cfg.positive_class_weight else None
        return F.binary_cross_entropy_with_logits(logits.squeeze(-1), target, pos_weight=pos, reduction="sum")
    if feature.type == "set":
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(-1).sum()
    prediction = logits.squeeze(-1)
    kind = loss_cfg.type or "mean_squared_error"
    if kind == "mean_absolute_error":
        return F.l1_loss(prediction, target, reduction="sum")
    if kind == "huber":
        return F.huber_loss(prediction, target, reduction="sum")
    return F.mse_loss(prediction, target, reduction="sum")


def _class_weights(weights, vocab: list[str], logits: torch.Tensor) -> Optional[torch.Tensor]:
    if weights is None:
        return None
    if isinstance(weights, dict):
        values = [float(weights.get(label, 1.0)) for label in vocab]
    else:
        if len(weights) != len(vocab):
            from ..errors import ConfigError

            raise ConfigError([("output_features.loss.class_weights",
                                f"{len(weights)} weights for {len(vocab)} classes {vocab}")])
        values = list(weights)
    return torch.tensor(values, dtype=logits.dtype, device=logits.device)
