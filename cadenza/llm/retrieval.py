"""Few-shot examples for `prompt.retrieval`: k training rows per prompt, random or semantically nearest.

Semantic retrieval embeds each row's prompt body (before any chat template) with a local sentence-embedding
model (default: the packaged all-MiniLM-L6-v2), mean-pooled over non-pad tokens and L2-normalised; the
nearest training rows by cosine similarity become the examples. A training row never retrieves itself.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..artifacts import hub_source_errors
from ..data import assets


class Retriever:
    def __init__(self, kind: str, k: int, examples: list[dict], texts: list[str], seed: int = 42,
                 model_name: Optional[str] = None):
        self.kind, self.k, self.examples, self.seed = kind, max(1, k), examples, seed
        self.model_name = model_name or "minilm"
        self._encoder = None
        self.vectors = self.embed(texts) if kind == "semantic" else None

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        from transformers import AutoModel, AutoTokenizer

        if self._encoder is None:
            source = assets.resolve_model_name(self.model_name)
            with hub_source_errors(source, "prompt.retrieval.model_name"):
                # never remote code: a retrieval encoder's config cannot ask for it
                self._encoder = (AutoTokenizer.from_pretrained(source, trust_remote_code=False),
                                 AutoModel.from_pretrained(source, trust_remote_code=False, use_safetensors=True).eval())
        tok, model = self._encoder
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
                hidden = model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
                out.append(torch.nn.functional.normalize(mean, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 1), dtype=np.float32)

    def select(self, texts: list[str], self_index: Optional[list[int]] = None) -> list[list[dict]]:
        """For each query text, k example rows. self_index[i]: the query's own training row (left out)."""
        n = len(self.examples)
        if n == 0:
            return [[] for _ in texts]
        picks: list[list[int]] = []
        if self.kind == "random":
            rng = np.random.default_rng(self.seed)
            for i in range(len(texts)):
                pool = np.arange(n)
                if self_index is not None:
                    pool = pool[pool != self_index[i]]
                picks.append(list(rng.choice(pool, size=min(self.k, len(pool)), replace=False)))
        else:
            sims = self.embed(texts) @ self.vectors.T
            for i in range(len(texts)):
                if self_index is not None:
                    sims[i, self_index[i]] = -np.inf
                top = np.argsort(-sims[i], kind="stable")[: min(self.k, n - (self_index is not None))]
                picks.append(list(top))
        return [[self.examples[j] for j in p] for p in picks]
