"""One batched generation for many requests: their prompts left-padded into one `model.generate` call, each row
decoded with its own settings.

transformers' `generate` runs the forward passes and the KV cache; two of its extension points do the per-row
work it does not offer:
- `RowSampler` (a LogitsProcessor) draws the token of every sampling row with that request's temperature, top_p,
  top_k and seeded generator, and leaves only that token possible; `generate` itself runs greedily, so greedy rows
  take the argmax exactly as an unbatched greedy `generate` does.
- `RowTracker` (a StoppingCriteria) sees each new token right after it is chosen: it turns the row's tokens into
  text, streams it to the request, and stops the row at end of sequence, a stop string, its max_tokens, or when the
  request went away. Stopped rows are padded by `generate` and the call ends when every row has stopped.
"""

from __future__ import annotations

import copy
import secrets
from typing import Optional

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from ..llm.generate import contiguous_head_input, left_padded
from .job import Delta, Finished, GenerationJob, Sampling


class IncrementalText:
    """Text of a growing token sequence, piece by piece. A piece is decoded together with a few tokens before it
    (tokenizers render a token differently at the start of a text) and held back while it ends in an incomplete
    UTF-8 character; the pieces add up to the decoded sequence (the algorithm of Hugging Face's TGI)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix = 0  # tokens[prefix:read] were decoded already and give the context of the next piece
        self.read = 0

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.tokens.append(token)
        before = self._decode(self.tokens[self.prefix:self.read])
        after = self._decode(self.tokens[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.tokens)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (bytes of a character the sequence never completed)."""
        before = self._decode(self.tokens[self.prefix:self.read])
        after = self._decode(self.tokens[self.prefix:])
        self.prefix = self.read = len(self.tokens)
        return after[len(before):]


def find_stop(text: str, stops: tuple[str, ...], new_from: int) -> Optional[int]:
    """Where the first stop string starts in `text`, looking only at matches that reach past `new_from` (the
    text before it was searched already), or None."""
    if not stops:
        return None
    start = max(0, new_from - max(len(s) for s in stops) + 1)
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could be the start of a stop string: they are not streamed until
    the next tokens show whether the stop string follows (its text is never sent)."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class Row:
    """One choice of one request inside the batch: its text so far and what has been sent of it."""

    def __init__(self, job: GenerationJob, index: int, tokenizer, eos_ids: set[int], generator: torch.Generator):
        self.job, self.index, self.prompt = job, index, job.prompts[index]
        self.sampling: Sampling = job.sampling
        self.generator = generator
        self.eos_ids = eos_ids
        self.text = IncrementalText(tokenizer)
        self.content = ""
        self.sent = 0
        self.generated = 0
        self.done = False

    @property
    def greedy(self) -> bool:
        return self.sampling.temperature == 0

    def step(self, token: int) -> None:
        if self.job.cancelled:  # the request is gone (client disconnected or timed out): stop spending on it
            self.done = True
            return
        self.generated += 1
        if token in self.eos_ids:
            self.finish("stop")
            return
        searched = len(self.content)
        self.content += self.text.add(token)
        stop_at = find_stop(self.content, self.sampling.stop, searched)
        if stop_at is not None:
            self.content = self.content[:stop_at]
            self.finish("stop", flush=False)
        elif self.generated >= self.sampling.max_tokens:
            self.finish("length")
        else:
            self._send(len(self.content) - held_back(self.content, self.sampling.stop))

    def finish(self, reason: str, flush: bool = True) -> None:
        if flush:
            self.content += self.text.flush()
        self._send(len(self.content))
        self.job.deliver(Finished(self.index, reason, self.generated))
        self.done = True

    def _send(self, upto: int) -> None:
        if upto > self.sent:
            self.job.deliver(Delta(self.index, self.content[self.sent:upto]))
            self.sent = upto


def sample_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """One token drawn from softmax(logits / temperature), restricted to the top_k tokens and to the smallest set
    whose probability reaches top_p."""
    scores = logits.float() / sampling.temperature
    if 0 < sampling.top_k < scores.numel():
        kth = torch.topk(scores, sampling.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p  # the likeliest token always stays
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


class RowSampler(LogitsProcessor):
    """Samples the rows that sample; leaves greedy and finished rows to generate's argmax and padding."""

    def __init__(self, rows: list[Row]):
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for r, row in enumerate(self.rows):
            if row.done or row.greedy:
                continue
            token = sample_token(scores[r], row.sampling, row.generator)
            scores[r] = float("-inf")
            scores[r, token] = 0.0
        return scores


class RowTracker(StoppingCriteria):
    """Hands each row its new token and tells generate which rows have stopped."""

    def __init__(self, rows: list[Row]):
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        for row, token in zip(self.rows, input_ids[:, -1].tolist()):
            if not row.done:
                row.step(token)
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)


def eos_ids(generation_config) -> set[int]:
    eos = generation_config.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())


class BatchGenerator:
    """Runs a batch of jobs through the model. `generation_config` is the model's (cadenza.llm.generate's
    mapping of the config's `generation:` section), set to greedy single-beam decoding: sampling is RowSampler's."""

    def __init__(self, model, tokenizer, generation_config):
        self.model = model
        self.tokenizer = tokenizer
        self.generation_config = generation_config
        self.eos_ids = eos_ids(generation_config)
        self.device = next(model.parameters()).device

    def _generator(self, seed: Optional[int]) -> torch.Generator:
        # every request has its own random stream: a seeded request draws the same tokens whatever it is batched with
        return torch.Generator(device=self.device).manual_seed(seed if seed is not None else secrets.randbits(63))

    @torch.no_grad()
    def __call__(self, jobs: list[GenerationJob]) -> None:
        rows = []
        for job in jobs:
            generator = self._generator(job.sampling.seed)
            rows += [Row(job, i, self.tokenizer, self.eos_ids, generator) for i in range(job.rows)]
        ids, mask = left_padded([row.prompt for row in rows], self.tokenizer.pad_token_id)
        config = copy.deepcopy(self.generation_config)
        config.max_new_tokens = max(row.sampling.max_tokens for row in rows)
        with contiguous_head_input(self.model):  # the first token's logits without a copy of the head per row
            self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                generation_config=config, logits_processor=LogitsProcessorList([RowSampler(rows)]),
                                stopping_criteria=StoppingCriteriaList([RowTracker(rows)]))
        for row in rows:
            if not row.done:  # generate ended before the row's own limit noticed (it should not): say why
                row.finish("length")
