"""Attention over a packed micro-batch, row by row instead of over the whole packed sequence.

A packed micro-batch is ONE sequence: an optional prefix shared by every row (the chat template's system prompt),
then each row's own tokens. sdpa over it with a block mask computes a (T x T) score matrix for T packed tokens and
throws most of it away: for 8 rows of 40 tokens that is 320^2 scores where 8 x 40^2 are needed, and the CPU kernel
does not skip masked blocks. Measured on SmolLM2-135M LoRA (2-core AVX512-BF16 CPU), attention was 22% of a
training step that way.

Here the rows' queries are gathered into padded (rows x longest row) batches whose keys are the shared prefix plus
the row's own tokens, so the work is rows x L x (prefix + L); the prefix attends causally to itself. Rows of very
different lengths go to separate batches (`length_groups`), so one long row does not pad all the others. The result is
scattered back to packed order, so everything outside attention (projections, MLPs, LoRA, the loss) still runs on
the padding-free packed sequence. Same numbers as the block mask (the tests compare losses and gradients).

The function is registered with transformers' AttentionInterface (its documented way to add an implementation) as
`cadenza_segments`; a model uses it once `use_segment_attention(model)` switched its config. Calls without
`segments` (generation, plain forward passes) go to transformers' own sdpa function with sdpa's masks, so the
switched model behaves exactly like an sdpa one everywhere else. The name is not saved with the model
(transformers drops `_attn_implementation` from config.json).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "cadenza_segments"


# Which packs go row by row. In fp32 the alternative, sdpa over the packed sequence's block mask, is torch's CPU flash
# kernel, which computes every masked-out block: rows pay at any length. Training in bf16 the alternative is the
# explicit form below (batched matmuls over T x T), which beats the rows' gathers and extra calls on short packs.
# Measured on SmolLM2-135M LoRA, 200 chatterbot rows in packs of 8 (~300 tokens), 2-core AVX512-BF16 CPU, two
# alternated runs each: fp32 28.9 / 29.5 s with rows everywhere vs 30.1 / 30.5 s with rows from 512 tokens; bf16
# 21.4 / 22.3 s vs 19.4 / 21.8 s
MIN_ROW_TOKENS_BF16 = 512


def rows_pay(tokens: int, low_precision: bool) -> bool:
    """Whether a pack of `tokens` computed tokens should take row attention (see MIN_ROW_TOKENS_BF16)."""
    return not low_precision or tokens >= MIN_ROW_TOKENS_BF16


# Rows are gathered in groups of similar length, each padded to its own longest row: one long row in a pack of short
# ones would otherwise pad every row to its length (a pack of 8 chatterbot rows with one of 139 tokens among ~30-token
# rows: 8 x 139 x 163 scores where ~35k are needed). A group costs one attention call, worth about this many
# (query x key) scores of work: fitted on SmolLM2-135M's heads, forward + backward on a 2-core AVX512-BF16 CPU,
# 0.16 ms + 70 ns a score in fp32 (~2,200), 0.44 ms + 44 ns in bf16's explicit form (~10,000)
GROUP_CALL_SCORES = 5000


@dataclass
class RowGroup:
    """Rows of similar length gathered into one padded batch: their queries attend in one call."""
    rows: torch.Tensor  # (R, L) long: flat position of each row's j-th own token (padding points at position 0)
    mask: torch.Tensor  # (R, 1, L, prefix + L) bool: what each row's query may see (prefix, then own keys causally)

    def to(self, device) -> "RowGroup":
        return RowGroup(self.rows.to(device), self.mask.to(device))


@dataclass
class Segments:
    """Where each row of a packed sequence sits. `prefix` leading tokens are shared by every row."""
    prefix: int
    groups: list[RowGroup]
    inverse: torch.Tensor  # (T - prefix,) long: each packed position after the prefix, in the groups' padded layout

    @classmethod
    def build(cls, prefix: int, lengths: list[int]) -> "Segments":
        order = sorted(range(len(lengths)), key=lambda r: lengths[r])
        groups, where, offset = [], {}, 0  # where: row -> its first position in the groups' concatenated layout
        for members in length_groups([lengths[r] for r in order], prefix):
            rows = [order[i] for i in members]
            width = max(lengths[r] for r in rows)
            j = torch.arange(width)
            starts = torch.tensor([prefix + sum(lengths[:r]) for r in rows])
            valid = j.view(1, -1) < torch.tensor([lengths[r] for r in rows]).view(-1, 1)  # (R, L)
            flat = torch.where(valid, starts.view(-1, 1) + j.view(1, -1), torch.zeros((), dtype=torch.long))
            # a padded query position sees its row's real keys up to itself, so no score row is empty (no NaN);
            # its output is never scattered back
            own = (j.view(1, -1) <= j.view(-1, 1)).view(1, width, width) & valid.view(-1, 1, width)
            mask = torch.cat([torch.ones(len(rows), width, prefix, dtype=torch.bool), own], dim=2)
            groups.append(RowGroup(flat, mask.unsqueeze(1)))
            for k, r in enumerate(rows):
                where[r] = offset + k * width
            offset += len(rows) * width
        inverse = torch.cat([where[r] + torch.arange(n) for r, n in enumerate(lengths)])
        return cls(prefix, groups, inverse)

    def to(self, device) -> "Segments":
        return Segments(self.prefix, [g.to(device) for g in self.groups], self.inverse.to(device))


def length_groups(sorted_lengths: list[int], prefix: int) -> list[range]:
    """Cut rows sorted by length into runs that minimise the attention work: each run costs GROUP_CALL_SCORES plus
    its rows x longest x (prefix + longest) scores. Dynamic programming over the cut points (rows per pack: tens)."""
    n = len(sorted_lengths)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)  # best[e]: cheapest cover of the first e rows
    for end in range(1, n + 1):
        longest = sorted_lengths[end - 1]
        for start in range(end):
            cost = best[start] + GROUP_CALL_SCORES + (end - start) * longest * (prefix + longest)
            if cost < best[end]:
                best[end], cut[end] = cost, start
    runs, end = [], n
    while end:
        runs.append(range(cut[end], end))
        end = cut[end]
    return runs[::-1]


def segment_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      segments: Segments | None = None, **kwargs):
    """transformers' attention signature: query (1, H, T, D), key/value (1, KVH, T, D) -> ((1, T, H, D), None)."""
    dropout = dropout if module.training else 0.0
    if segments is None:
        if _explicit_pays(query, attention_mask, dropout):  # a packed sequence's block mask, bf16 training
            out = masked_attention(query, key, value, attention_mask, scaling, dropout)
            return out.transpose(1, 2).contiguous(), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    p = segments.prefix
    q, k, v = query[0], key[0], value[0]  # (H, T, D), (KVH, T, D)
    pieces = []
    for group in segments.groups:
        r, width = group.rows.shape
        flat = group.rows.reshape(-1)

        def per_row(x):  # (H, T, D) -> (R, H, L, D)
            return x.index_select(1, flat).view(x.shape[0], r, width, x.shape[-1]).transpose(0, 1)

        row_k, row_v = per_row(k), per_row(v)
        if p:
            row_k = torch.cat([k[:, :p].unsqueeze(0).expand(r, -1, -1, -1), row_k], dim=2)
            row_v = torch.cat([v[:, :p].unsqueeze(0).expand(r, -1, -1, -1), row_v], dim=2)
        out = masked_attention(per_row(q), row_k, row_v, group.mask, scaling, dropout)  # (R, H, L, D)
        pieces.append(out.transpose(1, 2).reshape(r * width, out.shape[1], out.shape[-1]))
    out = (torch.cat(pieces) if len(pieces) > 1 else pieces[0]).index_select(0, segments.inverse)  # (T - p, H, D)
    if p:
        prefix_out = F.scaled_dot_product_attention(q[:, :p], k[:, :p], v[:, :p], is_causal=True, scale=scaling,
                                                    dropout_p=dropout, enable_gqa=True)
        out = torch.cat([prefix_out.transpose(0, 1), out], dim=0)
    return out.unsqueeze(0), None


def _explicit_pays(query, mask, dropout: float) -> bool:
    """The explicit form below for a boolean (B, 1, T, S) mask while training in bf16 without attention dropout."""
    return (query.dtype != torch.float32 and torch.is_grad_enabled() and not dropout and mask is not None
            and mask.dtype == torch.bool and mask.dim() == 4)


def masked_attention(q, k, v, mask, scale, dropout: float):
    """softmax(q k^T * scale, masked) v; q (B, H, T, D), k/v (B, KVH, S, D) with H a multiple of KVH (grouped-query
    attention), mask (B or 1, 1, T, S) bool, True = may attend.

    Training in bf16 takes the explicit form: for these small problems (a packed micro-batch of ~300 tokens, or
    rows x ~30 x ~60) torch's CPU flash kernel's backward is slower than batched matmuls. Measured on SmolLM2-135M
    LoRA (2-core AVX512-BF16 CPU): per layer, forward + backward, 8 rows of 30 tokens after a 30-token prefix,
    flash 5.4 ms vs 2.3 ms; a whole training step over a packed micro-batch of 8 chatterbot rows 7% faster. The
    query heads that share a key/value head are folded into one matrix product (no repeated keys). In fp32 flash
    wins (2.4 ms vs 4.9 ms), and without gradients (evaluation, scoring labels) the flash kernel is fast and keeps
    the scores in fp32, so scores match a plain forward pass to 1e-4: both take sdpa."""
    if q.dtype == torch.float32 or dropout or not torch.is_grad_enabled():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout,
                                              enable_gqa=True)
    b, heads, t, d = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    folded = q.reshape(b, kv_heads, groups * t, d)  # query head j*groups+i uses key/value head j
    scores = (folded @ k.transpose(-1, -2)) * (scale if scale is not None else d ** -0.5)
    scores = scores.view(b, kv_heads, groups, t, s).masked_fill(~mask.unsqueeze(1), float("-inf"))
    # softmax straight into bf16 (computed in fp32 inside the kernel): the one bf16 tensor is what the backward keeps
    # for both the softmax and the product, a third of an fp32 softmax plus its bf16 copy, and 2x faster
    probs = torch.softmax(scores, dim=-1).view(b, kv_heads, groups * t, s)
    return (probs @ v).view(b, heads, t, d)


def register() -> None:
    """Idempotent: adds the name to transformers' registries (nothing existing changes)."""
    AttentionInterface.register(NAME, segment_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_segment_attention(lm) -> bool:
    """Switch an sdpa model (the causal LM, not a PEFT wrapper) to segment attention; False if it cannot be."""
    config = lm.config
    if config._attn_implementation == NAME:
        return True
    if config._attn_implementation != "sdpa":
        return False
    register()
    config._attn_implementation = NAME
    return True
