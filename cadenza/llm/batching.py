"""Micro-batches of tokenized rows: padding-free packing, or length-grouped padded batches.

Packed: the rows of a micro-batch are concatenated into ONE sequence of shape (1, total_tokens) with no padding
at all; `position_ids` restart at 0 for every row and no attention mask is passed. transformers (>= 4.5x,
`masking_utils.find_packed_sequence_indices`) reads the restarts as row boundaries and builds a block-diagonal
causal mask for sdpa/eager, so no token attends across rows (the tests check packed loss == unpacked loss).
This requires use_cache=False in the forward call: with a cache the packed detection is skipped.

Shared prefix: rows whose token ids begin the same way (every chat-templated row starts with the same system
prompt, ~25 of SmolLM2's ~65 tokens per chatterbot row) get that prefix ONCE per packed micro-batch. Each row's
remaining tokens continue at the prefix's positions and attend to the prefix plus their own tokens (an explicit
4D block mask). Under causal attention the prefix's hidden states do not depend on what follows, so this is
exactly the same computation and loss as repeating the prefix in every row, with the duplicate work removed;
gradients through the shared prefix add up as they would over the copies. (Checked by the tests.)

With `share_prefix` (a model whose attention allows it, `loss.can_share_prefix`) a packed batch also carries
`segments` (`attention.Segments`): where each row sits, so attention can run row by row over (prefix + own tokens)
instead of over the whole packed sequence with a mask (`cadenza/llm/attention.py`; `attention.rows_pay` says when
it does); the 4D mask stays in the batch for the other packs and for models that cannot switch (eager attention).

Each batch also carries `target_index` (flat positions whose hidden state predicts a target token) and
`target_ids`, so the loss applies the LM head only to those rows of hidden states.

A row's last token is not fed to the model: its hidden state would predict the token after the row, which does not
exist, and no other token attends to it (causal, rows apart), so leaving it out changes no logit and no gradient
while saving one position per row (~3% of the work on chatterbot-sized rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Iterator, Optional

import numpy as np
import torch

from .attention import Segments
from .tokenize import TokenizedRows


def target_span(n: int, prompt_len: int, train_on_inputs: bool) -> tuple[int, int]:
    """Token positions [start, n) that are targets (each predicted from the position before it)."""
    return (1 if train_on_inputs else max(1, int(prompt_len))), n


def target_positions(rows: TokenizedRows, i: int, train_on_inputs: bool) -> np.ndarray:
    """Row i's target positions: one span from prompt_len, or (chat rows) every position its mask marks."""
    n = len(rows.ids[i])
    if rows.masks is not None and not train_on_inputs:
        return np.flatnonzero(rows.masks[i][1:]) + 1  # position 0 has nothing before it to predict it
    a, b = target_span(n, rows.prompt_lens[i], train_on_inputs)
    return np.arange(a, b)


MIN_SHARED_PREFIX = 8  # shorter common prefixes save too little to be worth a dense mask


def common_prefix(seqs: list[np.ndarray]) -> int:
    """Length of the common leading token ids, leaving every row at least one token of its own."""
    if len(seqs) < 2:
        return 0
    limit = min(len(s) for s in seqs) - 1
    first = seqs[0][:limit]
    same = np.ones(limit, dtype=bool)
    for s in seqs[1:]:
        same &= s[:limit] == first
    return int(limit if same.all() else np.argmin(same))


def model_inputs(seq: np.ndarray) -> np.ndarray:
    """The tokens of a row the model runs: all but the last (see the module's docstring)."""
    return seq[:-1] if len(seq) > 1 else seq


def make_batch(rows: TokenizedRows, idx: list[int], *, packed: bool, train_on_inputs: bool = False,
               pad_id: int = 0, share_prefix: bool = False) -> dict:
    full = [rows.ids[i] for i in idx]
    seqs = [model_inputs(s) for s in full]
    lens = [len(s) for s in seqs]
    targets_index, targets = [], []
    shared = common_prefix(seqs) if packed and share_prefix else 0
    if shared >= MIN_SHARED_PREFIX:
        return _shared_prefix_batch(rows, idx, full, seqs, shared, train_on_inputs)
    if packed:
        input_ids = torch.from_numpy(np.concatenate(seqs)).view(1, -1)
        segments = Segments.build(0, lens) if share_prefix else None
        position_ids = torch.cat([torch.arange(n) for n in lens]).view(1, -1)
        offset = 0
        for s, i, n in zip(full, idx, lens):
            pos = target_positions(rows, i, train_on_inputs)
            targets_index.append(offset + pos - 1)
            targets.append(s[pos])
            offset += n
        attention_mask = None
    else:
        segments = None
        width = max(lens)
        input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, (s, i, n) in enumerate(zip(full, idx, lens)):
            input_ids[r, :n] = torch.from_numpy(s[:n])
            attention_mask[r, :n] = 1
            pos = target_positions(rows, i, train_on_inputs)
            targets_index.append(r * width + pos - 1)
            targets.append(s[pos])
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": attention_mask,
        "segments": segments,
        "target_index": torch.from_numpy(np.concatenate(targets_index)).long(),
        "target_ids": torch.from_numpy(np.concatenate(targets)).long(),
        "num_tokens": int(sum(len(s) for s in full)),  # tokens of the rows as given (the work they stand for)
        "computed_tokens": int(input_ids.numel()),
        "rows": list(idx),
        "longest_row": int(max(len(s) for s in full)),
    }


def computed_tokens(rows: TokenizedRows, idx: list[int], *, packed: bool, share_prefix: bool) -> int:
    """Tokens the model actually runs for this micro-batch (without building it)."""
    seqs = [model_inputs(rows.ids[i]) for i in idx]
    total = sum(len(s) for s in seqs)
    shared = common_prefix(seqs) if packed and share_prefix else 0
    return total - (len(seqs) - 1) * shared if shared >= MIN_SHARED_PREFIX else total


def _shared_prefix_batch(rows: TokenizedRows, idx: list[int], full: list[np.ndarray], seqs: list[np.ndarray],
                         shared: int, train_on_inputs: bool) -> dict:
    """`full`: the rows' tokens, `seqs`: the tokens the model runs (model_inputs)."""
    parts, positions, segments = [seqs[0][:shared]], [np.arange(shared)], [np.full(shared, -1)]
    targets_index, targets = [], []
    offset = shared
    for r, (s, i) in enumerate(zip(seqs, idx)):
        n = len(s)
        parts.append(s[shared:])
        positions.append(np.arange(shared, n))
        segments.append(np.full(n - shared, r))
        pos = target_positions(rows, i, train_on_inputs)
        predictor = pos - 1  # position whose hidden state predicts each target
        targets_index.append(np.where(predictor < shared, predictor, offset + predictor - shared))
        targets.append(full[r][pos])
        offset += n - shared
    seg = torch.from_numpy(np.concatenate(segments))
    total = len(seg)
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    # a token sees the shared prefix and earlier tokens of its own row, never another row
    visible = (seg.view(-1, 1) == seg.view(1, -1)) | (seg.view(1, -1) == -1)
    return {
        "input_ids": torch.from_numpy(np.concatenate(parts)).view(1, -1),
        "position_ids": torch.from_numpy(np.concatenate(positions)).view(1, -1),
        "attention_mask": (causal & visible).view(1, 1, total, total),
        "segments": Segments.build(shared, [len(s) - shared for s in seqs]),
        "target_index": torch.from_numpy(np.concatenate(targets_index)).long(),
        "target_ids": torch.from_numpy(np.concatenate(targets)).long(),
        "num_tokens": int(sum(len(s) for s in full)),  # tokens of the rows as given (the work they stand for)
        "computed_tokens": total,
        "rows": list(idx),
        "longest_row": int(max(len(s) for s in full)),
    }


class Groups(Sequence):
    """Micro-batches of row indices as one array cut at `bounds`: 8 bytes a row, where a list of lists of ints
    held ~50 (a million-row epoch: 8 MB instead of ~50 MB, and one such list per epoch). `groups[k]` is a list."""

    def __init__(self, order: np.ndarray, bounds: np.ndarray):
        self.order, self.bounds = np.asarray(order, np.int64), np.asarray(bounds, np.int64)

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(k)
        return self.order[self.bounds[k]:self.bounds[k + 1]].tolist()

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)


def pack_indices(order, lengths: np.ndarray, *, rows_per_batch: int, max_tokens: Optional[int]) -> Groups:
    """Consecutive groups of `order`: by token budget when max_tokens is set (a longer row goes alone), else
    by row count."""
    order = np.asarray(order, np.int64)
    if not max_tokens:
        return Groups(order, np.append(np.arange(0, len(order), rows_per_batch), len(order)))
    bounds, used = [0], 0
    for k, n in enumerate(lengths[order].tolist()):
        if k > bounds[-1] and used + n > max_tokens:
            bounds.append(k)
            used = 0
        used += n
    if len(order):
        bounds.append(len(order))
    return Groups(order, np.asarray(bounds, np.int64))


def length_grouped(order, lengths: np.ndarray, rows_per_batch: int, rng: np.random.Generator,
                   mega: int = 50) -> Groups:
    """Padded batches of similar lengths: sort within shuffled mega-chunks, then shuffle the batches, so
    padding stays small while every epoch still sees a different order."""
    order = np.array(order, np.int64)  # a copy: sorted in place below
    step = rows_per_batch * mega
    starts = []  # each batch's first place in `order` once every mega-chunk is sorted longest first
    for start in range(0, len(order), step):
        chunk = order[start:start + step]
        order[start:start + step] = chunk[np.argsort(-lengths[chunk], kind="stable")]  # stable, as sorted() is
        starts.extend(range(start, start + len(chunk), rows_per_batch))
    starts = np.asarray(starts, np.int64)
    sizes = np.minimum(np.append(starts[1:], len(order)) - starts, rows_per_batch)
    shuffled = np.arange(len(starts))
    rng.shuffle(shuffled)
    # the batches in shuffled order, laid end to end
    picks = np.repeat(starts[shuffled] - np.cumsum(sizes[shuffled]) + sizes[shuffled], sizes[shuffled]) + \
        np.arange(int(sizes.sum()))
    return Groups(order[picks], np.concatenate([[0], np.cumsum(sizes[shuffled])]))


def epoch_groups(rows: TokenizedRows, epoch: int, seed: int, *, packed: bool, rows_per_batch: int,
                 max_tokens: Optional[int], shuffle: bool = True) -> Groups:
    """Deterministic micro-batch row indices for one epoch (same seed + epoch -> same batches, for resume)."""
    rng = np.random.default_rng(seed * 1000003 + epoch)
    order = rng.permutation(len(rows)) if shuffle else np.arange(len(rows))
    lengths = rows.lengths
    if packed:
        return pack_indices(order, lengths, rows_per_batch=rows_per_batch, max_tokens=max_tokens)
    return length_grouped(order, lengths, rows_per_batch, rng) if shuffle else \
        pack_indices(order, lengths, rows_per_batch=rows_per_batch, max_tokens=None)


def eval_groups(rows: TokenizedRows, rows_per_batch: int, max_tokens: Optional[int]) -> Groups:
    """Evaluation batches: length-sorted (less padding, similar packs), order does not matter for sums."""
    order = np.argsort(rows.lengths, kind="stable")
    return pack_indices(order, rows.lengths, rows_per_batch=rows_per_batch, max_tokens=max_tokens)


def iterate(rows: TokenizedRows, groups: Sequence[list[int]], **kw) -> Iterator[dict]:
    for g in groups:
        yield make_batch(rows, g, **kw)
