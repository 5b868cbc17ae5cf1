"""The tokenizer as GGUF metadata, the way llama.cpp's converter writes it: every token with its type, the
pre-tokenizer's name, and (through the gguf package's SpecialVocab) the merges, special token ids, add-BOS/EOS
flags and the chat template. Byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3, Qwen) only."""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from ..errors import CadenzaError

# llama.cpp splits text before BPE by a pre-tokenizer it knows by name (tokenizer.ggml.pre). These are the
# tokenizer.json shapes whose llama.cpp name is certain; transformers' GGUF loader names the regex-split ones.
BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True}
DIGITS_THEN_BYTE_LEVEL = "smollm"  # Digits(individual_digits) then GPT-2's ByteLevel regex (SmolLM, StarCoder)


def add_tokenizer(writer: gguf.GGUFWriter, folder: Path, tokenizer, vocab_size: int) -> None:
    """Write the tokenizer saved in `folder` (tokenizer.json, tokenizer_config.json, chat template, config.json)."""
    spec = _tokenizer_json(folder)
    tokens, types = token_list(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def _tokenizer_json(folder: Path) -> dict:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise CadenzaError("GGUF export needs a fast tokenizer (tokenizer.json); this model's tokenizer has none")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise CadenzaError(f"GGUF export supports byte-level BPE tokenizers (GPT-2 style, as SmolLM2 and Llama 3 "
                           f"use); this model's tokenizer is {model.get('type')} with a {decoder.get('type')} "
                           "decoder")
    return spec


def token_list(tokenizer, vocab_size: int) -> tuple[list[str], list[gguf.TokenType]]:
    """Every id up to the model's vocabulary size: special added tokens are CONTROL (llama.cpp matches them whole
    and hides them in output), other added tokens USER_DEFINED, ids the tokenizer lacks UNUSED placeholders."""
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a tokenizer.json pre_tokenizer; one llama.cpp would split differently is refused
    rather than written under a wrong name (the model would then see different tokens than it was trained on)."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    if len(steps) == 1 and _is(steps[0], BYTE_LEVEL):
        return "gpt2"
    if len(steps) == 2 and _is(steps[0], {"type": "Digits", "individual_digits": True}) and _is(steps[1], BYTE_LEVEL):
        return DIGITS_THEN_BYTE_LEVEL
    if len(steps) == 2 and steps[0].get("type") == "Split" and _is(steps[1], {"type": "ByteLevel", "use_regex": False}):
        name = _split_name(steps[0].get("pattern", {}).get("Regex"))
        if name:
            return name
    raise CadenzaError(f"GGUF export: llama.cpp has no pre-tokenizer known to match this tokenizer's "
                       f"({json.dumps(pre)[:300]}); exporting it would change how text is split into tokens")


def _is(step: dict, expected: dict) -> bool:
    return all(step.get(k) == v for k, v in expected.items())


def _split_name(regex: str | None) -> str | None:
    try:  # transformers' GGUF loader keeps the table of llama.cpp pre-tokenizer names and their split regexes
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # an older transformers without it: only the shapes above are named
        return None
    return next((name for name, split in GGUF_PRE_TOKENIZER_SPLITS.items() if split == regex), None)
