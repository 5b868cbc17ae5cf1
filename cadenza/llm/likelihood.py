"""log P(candidate | prompt) for a few candidate continuations of many prompts: the label scores of an llm category
output (`*_probabilities_*`, hits@k).

Each prompt runs once, in left-padded batches of prompts, and its key/value cache is repeated for its candidates,
which then run together as one batch on top of it. That is the same computation as running every prompt +
candidate sequence in full (causal attention: the prompt's states do not depend on what follows), with each prompt
computed once instead of once per candidate, and in batches whose matrix products keep the CPU busy: one packed
prompt with its candidates at a time ran at ~700 tokens/s on SmolLM2 in bf16 on 2 cores (docs/llm.md, category
outputs, has the times before and after).
"""

from __future__ import annotations

import inspect

import numpy as np
import torch

from .generate import contiguous_head_input, left_padded
from .loss import causal_lm_of

LOGIT_BUDGET = 2**26  # fp32 log-softmax values over the vocabulary computed at once: 256 MB


@torch.no_grad()
def candidate_log_likelihoods(model, prompts: list[np.ndarray], candidates: list[list[np.ndarray]], *, pad_id: int,
                              batch_size: int) -> np.ndarray:
    """[len(prompts), k]: the summed log-probability of candidates[i][j]'s tokens after prompts[i]. Every prompt
    has the same number k of candidates, each at least one token. `batch_size` counts candidate rows: a batch
    holds batch_size // k prompts (at least one), so their cache repeated k times is no larger than that of a
    generation batch of as many rows (with 20 labels and few-shot prompts, all of a 16-row batch's prompts
    repeated would hold 320 copies)."""
    k = len(candidates[0]) if candidates else 0
    out = np.zeros((len(prompts), k))
    if not k:
        return out
    accepts = inspect.signature(causal_lm_of(model).forward).parameters
    cache_name = "cache" if "cache" in accepts else "past_key_values"  # transformers 5.24 deprecates the old name
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}  # the prompt's logits at its end only
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: less padding
    per_batch = max(1, batch_size // k)
    was_training = model.training
    model.eval()  # no dropout in the scores; the model's mode comes back at the end
    try:
        with contiguous_head_input(model):
            for start in range(0, len(order), per_batch):
                chunk = order[start:start + per_batch]
                out[chunk] = _batch(model, [prompts[i] for i in chunk], [candidates[i] for i in chunk], pad_id,
                                    cache_name, last_only)
    finally:
        model.train(was_training)
    return out


def _batch(model, prompts: list[np.ndarray], candidates: list[list[np.ndarray]], pad_id: int, cache_name: str,
           last_only: dict) -> np.ndarray:
    """[len(prompts), k] for one batch of prompts: the prompts, then their candidates on the repeated cache."""
    device = next(model.parameters()).device
    k = len(candidates[0])
    ids, mask = (t.to(device) for t in left_padded(prompts, pad_id))
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    prompt = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **last_only)
    first = torch.log_softmax(prompt.logits[:, -1].float(), -1)  # predicts each candidate's first token
    cache = getattr(prompt, cache_name)
    cache.batch_repeat_interleave(k)  # prompt r's cache k times: rows r*k .. r*k+k-1 are its candidates
    cand = [c for row in candidates for c in row]
    firsts = torch.tensor([c[0] for c in cand], device=device)
    scores = first.repeat_interleave(k, 0).gather(1, firsts[:, None]).squeeze(1).double()
    width = max(len(c) for c in cand)
    if width > 1:  # the later tokens of each candidate, predicted from the ones before
        scores += _continuation(model, cand, mask.repeat_interleave(k, 0), {cache_name: cache}, pad_id, width)
    return scores.view(len(prompts), k).cpu().numpy()


def _continuation(model, cand: list[np.ndarray], prompt_mask: torch.Tensor, cache: dict, pad_id: int,
                  width: int) -> torch.Tensor:
    device = prompt_mask.device
    ids = torch.full((len(cand), width), pad_id, dtype=torch.long, device=device)
    real = torch.zeros((len(cand), width), dtype=torch.long, device=device)
    for r, c in enumerate(cand):
        ids[r, :len(c)] = torch.as_tensor(c, device=device)
        real[r, :len(c)] = 1
    # positions go on from each row's own prompt length (left padding: the prompt holds positions 0 .. n-1)
    positions = prompt_mask.sum(-1, keepdim=True) + torch.arange(width - 1, device=device)
    logits = model(input_ids=ids[:, :-1], attention_mask=torch.cat([prompt_mask, real[:, :-1]], 1),
                   position_ids=positions, use_cache=True, **cache).logits
    total = torch.zeros(len(cand), dtype=torch.float64, device=device)
    step = max(1, LOGIT_BUDGET // logits[0].numel())  # rows whose fp32 log-softmax fits the budget
    for a in range(0, len(cand), step):
        logp = torch.log_softmax(logits[a:a + step].float(), -1).gather(2, ids[a:a + step, 1:, None]).squeeze(2)
        total[a:a + step] = (logp * real[a:a + step, 1:]).sum(1).double()
    return total
