"""The checks an export passes before it is moved into place: the exported file is loaded by its own runtime
(transformers' GGUF loader, onnxruntime) and must give what Cadenza gives. A failure is a bug, not a user error:
it raises RuntimeError and no output is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# the largest logit difference allowed, as a share of the largest |logit|: f32 is the same arithmetic; f16, bf16
# and q8_0 round every weight (measured: SmolLM2-135M q8_0 1.3 of 38; the tiny test Llama f16 6e-4, bf16 6e-3,
# q8_0 1.2e-2 of 0.8). A wrong layout (an unpermuted Q/K, a misnamed tensor) moves them by the whole scale.
GGUF_TOLERANCE = {"f32": 1e-4, "f16": 2e-2, "bf16": 5e-2, "q8_0": 1e-1}
PROBE = "The quick brown fox jumps over the lazy dog; 12 of 345 foxes agree."


def probe_texts(tokenizer) -> list[str]:
    """A plain sentence and, when the model has a chat template, a chat turn (special tokens included)."""
    texts = [PROBE]
    if getattr(tokenizer, "chat_template", None):
        texts.append(tokenizer.apply_chat_template([{"role": "user", "content": "What is a GGUF file?"}],
                                                   tokenize=False, add_generation_prompt=True))
    return texts


@torch.no_grad()
def check_gguf(path: Path, reference, tokenizer, dtype: str) -> dict:
    """Load `path` with transformers (`gguf_file=`): its tokenizer must give the same ids and its logits must
    match `reference` (the float32 merged model) within GGUF_TOLERANCE[dtype]."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = probe_texts(tokenizer)
    loaded_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    expected_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    got_ids = loaded_tokenizer(texts, add_special_tokens=False)["input_ids"]
    if got_ids != expected_ids:
        raise RuntimeError(f"{path.name}: its tokenizer splits the probe texts differently from the model's "
                           f"({got_ids} vs {expected_ids}); refusing to write it")
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    diff, scale = 0.0, 0.0
    for ids in expected_ids:
        batch = torch.tensor([ids])
        want = reference(input_ids=batch).logits.float()
        got = loaded(input_ids=batch).logits.float()
        diff, scale = max(diff, (want - got).abs().max().item()), max(scale, want.abs().max().item())
    tolerance = GGUF_TOLERANCE[dtype] * max(1.0, scale)
    if not diff <= tolerance:
        raise RuntimeError(f"{path.name} loaded with transformers gives logits {diff:.3g} away from the model's "
                           f"(tolerance {tolerance:.3g} for {dtype}); refusing to write it")
    return {"runtime": "transformers (gguf_file=)", "max_abs_logit_diff": diff, "max_abs_logit": scale,
            "tolerance": tolerance, "probe_tokens": sum(len(ids) for ids in expected_ids)}


def check_onnx(folder: Path, model) -> dict:
    """Run the exported graph with onnxruntime on rows prepared with the shipped tokenizers; its outputs must equal
    Cadenza's predictions. Cadenza embeds cached text features in bf16 where that is its precision (auto on bf16
    hardware), the graph in float32: the tolerance follows."""
    import onnxruntime
    from transformers import AutoTokenizer

    from .. import device
    from .to_onnx import ONNX_FILE, TOKENIZERS_DIR, encode_rows, example_rows, output_names

    config = model.config
    rows = example_rows(model, n=3)
    tokenizers = {f.name: AutoTokenizer.from_pretrained(str(folder / TOKENIZERS_DIR / f.name))
                  for f in config.input_features if f.type == "text"}
    session = onnxruntime.InferenceSession(str(folder / ONNX_FILE), providers=["CPUExecutionProvider"])
    got = dict(zip(output_names(config), session.run(None, encode_rows(model, rows, tokenizers))))
    predictions = model.predict(rows)
    bf16 = device.precision(config.trainer.use_mixed_precision, "embed").bf16 and any(
        model.model.metadata[f.name].get("cached") for f in config.input_features if f.type == "text")
    tolerance = 3e-2 if bf16 else 1e-4
    diffs = {}
    for f, name in zip(config.output_features, output_names(config)):
        want = cadenza_outputs(predictions, f, model.model.metadata[f.name])
        diffs[name] = float(np.abs(got[name].astype(np.float64) - want).max())
        scale = 1.0 if f.type != "number" else max(1.0, float(np.abs(want).max()))
        if not diffs[name] <= tolerance * scale:
            raise RuntimeError(f"{ONNX_FILE} run with onnxruntime gives {name} {diffs[name]:.3g} away from Cadenza's "
                               f"predictions (tolerance {tolerance * scale:.3g}); refusing to write it")
    return {"runtime": f"onnxruntime {onnxruntime.__version__}", "max_abs_diff": diffs, "tolerance": tolerance,
            "rows": len(rows), "cadenza_embeddings": "bf16" if bf16 else "fp32"}


def cadenza_outputs(predictions, feature, meta: dict) -> np.ndarray:
    """What the graph's output for `feature` is, from Cadenza's prediction columns."""
    name = feature.name
    if feature.type in ("category", "set"):
        return predictions[[f"{name}_probabilities_{label}" for label in meta["vocab"]]].to_numpy(np.float64)
    if feature.type == "binary":
        return predictions[f"{name}_probabilities_true"].to_numpy(np.float64)
    return predictions[f"{name}_predictions"].to_numpy(np.float64)
