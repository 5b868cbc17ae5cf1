"""The training module: final hidden states -> LM head on target positions only -> summed cross entropy.

Skipping the LM head on prompt positions avoids a (tokens x vocab) logits tensor that is mostly thrown away
(the head is ~20% of SmolLM2-135M's FLOPs per token with a 49k vocabulary). The loss is SUMMED; the shared
trainer divides by the effective batch's target-token count, which makes gradient accumulation exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from peft.helpers import disable_input_dtype_casting

from .attention import NAME as SEGMENT_ATTENTION, rows_pay, use_segment_attention


def causal_lm_of(model):
    """The transformers model under a PEFT wrapper (PEFT injects its layers in place, so it sees them)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def can_share_prefix(model) -> bool:
    """Shared-prefix batches pass an explicit 4D mask, which sdpa/eager honour. A 4D mask replaces the model's
    own mask building, so models with sliding-window or other non-full attention layers keep plain packing."""
    config = causal_lm_of(model).config
    if config._attn_implementation not in ("sdpa", "eager", SEGMENT_ATTENTION) or getattr(config, "sliding_window", None):
        return False
    return all(t == "full_attention" for t in (getattr(config, "layer_types", None) or []))


class TargetLoss(torch.nn.Module):
    forward_methods = ("target_logits",)  # runs the model outside forward (cadenza.train.sharding gathers for it)

    def __init__(self, model, neftune_noise_alpha: float = 0.0):
        super().__init__()
        self.model = model  # the causal LM, PEFT-wrapped or not
        self.neftune_noise_alpha = neftune_noise_alpha

    def parts(self):
        lm = causal_lm_of(self.model)
        return getattr(lm, lm.base_model_prefix), lm.get_output_embeddings(), lm.config

    def target_logits(self, batch: dict) -> torch.Tensor:
        decoder, head, config = self.parts()
        device = head.weight.device
        kwargs = {"input_ids": batch["input_ids"].to(device), "position_ids": batch["position_ids"].to(device),
                  "use_cache": False}  # a cache disables transformers' packed-sequence detection
        mask = batch.get("attention_mask")
        segments = batch.get("segments")
        # cadenza.llm.attention: row by row (no (T x T) scores) where that pays, the explicit form of the block
        # mask while training short packs in bf16; transformers' sdpa everywhere else
        switched = can_share_prefix(self.model) and use_segment_attention(causal_lm_of(self.model))
        low_precision = torch.is_autocast_enabled(device.type) or head.weight.dtype != torch.float32
        if segments is not None and switched and rows_pay(batch["computed_tokens"], low_precision):
            kwargs["segments"], mask = segments.to(device), None
        if mask is not None:
            mask = mask.to(device)
            if mask.dim() == 4 and config._attn_implementation == "eager":
                # eager attention adds the mask to the scores: it needs 0 / -inf, not booleans
                mask = torch.zeros(mask.shape, dtype=head.weight.dtype, device=device).masked_fill(
                    ~mask, torch.finfo(head.weight.dtype).min)
            kwargs["attention_mask"] = mask
        if self.training and self.neftune_noise_alpha:
            kwargs["inputs_embeds"] = self._noisy_embeddings(kwargs.pop("input_ids"), batch["longest_row"])
        # Under autocast PEFT's cast of each LoRA input to the adapter's fp32 is wasted (autocast casts it back to bf16
        # for the matmul) and makes the LoRA dropout draw in fp32: a LoRA module's forward + backward 0.35 ms slower
        # (SmolLM2 shapes, 2-core CPU); a whole step with q/v adapters ~1% faster (within the A/B's noise)
        with disable_input_dtype_casting(self.model, active=torch.is_autocast_enabled(device.type)):
            hidden = decoder(**kwargs).last_hidden_state
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["target_index"].to(device))
        logits = head(picked)
        cap = getattr(config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    def _noisy_embeddings(self, input_ids: torch.Tensor, longest_row: int) -> torch.Tensor:
        """NEFTune (Jain et al., 2023): uniform noise of magnitude alpha / sqrt(L * d) on the input embeddings while
        training. L is the padded sequence length in the paper (and transformers' Trainer); for a packed batch
        that is its longest row, so packing does not change the noise level."""
        embeddings = causal_lm_of(self.model).get_input_embeddings()(input_ids)
        scale = self.neftune_noise_alpha / math.sqrt(longest_row * embeddings.shape[-1])
        return embeddings + torch.empty_like(embeddings).uniform_(-scale, scale)

    def forward(self, batch: dict) -> torch.Tensor:
        logits = self.target_logits(batch)
        return F.cross_entropy(logits, batch["target_ids"].to(logits.device), reduction="sum")

    @torch.no_grad()
    def score(self, batch: dict) -> tuple[float, int, int]:
        """(summed loss, target tokens, correctly predicted target tokens)."""
        logits = self.target_logits(batch)
        targets = batch["target_ids"].to(logits.device)
        loss = F.cross_entropy(logits, targets, reduction="sum")
        return float(loss), int(targets.numel()), int((logits.argmax(-1) == targets).sum())
