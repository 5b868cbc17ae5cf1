"""Token ids of ecd text inputs, fast: what `tokenizer(texts, truncation=True, max_length=L)["input_ids"]` gives.

Savings, all exact (MiniLM's tokenizer, 65k review texts of ~350 characters at 16 tokens, 2 cores: 76 us a text
through transformers' call, 25 here):
- the fast tokenizer's Rust backend is called directly, without character offsets: transformers turns every
  text's encoding into a dict of Python lists first, a third of the time (74 vs 45 us a text), and offsets cost
  the backend ~5 us a text more to compute and free;
- a text much longer than L tokens is cut, at a whitespace, to a prefix that still holds more than L tokens before
  it is tokenized: tokenizing costs per character (~0.35 us a character for MiniLM's WordPiece on one core), and
  a 350-character review kept to 16 tokens needs its first ~130. This is exact only where the tokenizer splits
  the text at spaces before anything else (so the words before a cut tokenize as they would in the whole
  text): the backend's normalizer and pre-tokenizer must be in the SAFE tables below, and no added token may hold
  whitespace. A cut text that holds L tokens or fewer is tokenized again whole. Tokenizers outside the tables
  (Llama-3/Qwen's regex splits, SentencePiece without a pre-tokenizer) are tokenized whole.
"""

from __future__ import annotations

import json
import re
import weakref

# normalizers that map characters to characters, never looking across a whitespace
SAFE_NORMALIZERS = {"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents", "Strip", "Prepend"}
# pre-tokenizers that split at every whitespace (ByteLevel with its GPT-2 regex; Metaspace when it splits), and the
# ones that only split further, safe beside them
SPLITS_AT_WHITESPACE = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit", "ByteLevel", "Metaspace"}
SAFE_PRE_TOKENIZERS = SPLITS_AT_WHITESPACE | {"Punctuation", "Digits"}
CHARACTERS_PER_TOKEN = 8  # kept before the cut, per token of L: English runs ~4.5 characters a token
_WHITESPACE = re.compile(r"\s")


def token_ids(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Each text's token ids, special tokens added, truncated to max_length (from the right: with
    `truncation_side: left` texts are tokenized whole)."""
    backend = _truncating_backend(tokenizer, max_length)
    if backend is None:  # a slow (Python) tokenizer: no backend to call
        return tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    layout = _cut_layout(tokenizer, max_length)
    if layout is None:
        return [encoding.ids for encoding in _encode(backend, texts)]
    whole, _, after = layout
    keep = CHARACTERS_PER_TOKEN * max_length
    cut = [_prefix(text, keep) for text in texts]
    # tokenized without truncation and truncated here as the tokenizer would, its special tokens kept at both ends
    # (`before` + the text's first max_length - before - after tokens + `after`): asking the backend to truncate costs
    # its overflowing part, and asking whether there was one 8 us a text more
    out = [encoding.ids for encoding in _encode(whole, cut)]
    head = max_length - after
    again = []
    for i, ids in enumerate(out):
        if len(ids) > max_length:
            out[i] = ids[:head] + ids[len(ids) - after:] if after else ids[:head]
        elif cut[i] is not texts[i]:  # the cut lost tokens the whole text has: tokenized again whole, below
            again.append(i)
    if again:
        for i, encoding in zip(again, _encode(backend, [texts[i] for i in again])):
            out[i] = encoding.ids
    return out


def _encode(backend, texts: list[str]) -> list:
    """Encodings without character offsets (`encode_batch_fast`, tokenizers >= 0.20), which ids do not need: 65k
    texts at 16 tokens 25.5 vs 30.4 us a text to encode and half the time to free (MiniLM, 2 cores)."""
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return encode(texts, add_special_tokens=True)


def _prefix(text: str, keep: int) -> str:
    """The text up to the first space at or after `keep` characters (the text itself when there is none). A plain
    space only: every pre-tokenizer in SPLITS_AT_WHITESPACE splits there, where Python's other whitespace is not
    always theirs (Metaspace splits at spaces alone; BERT's normalizer deletes \x1c-\x1f, which `str.isspace`
    calls whitespace, joining the words around them)."""
    if len(text) <= keep:
        return text
    found = text.find(" ", keep)
    return text[:found] if found >= 0 else text


# per tokenizer: a copy of its backend per length, set to truncate as transformers would (the user's tokenizer object
# is left as it was; transformers sets its backend's truncation on every call), and whether texts may be cut
_BACKENDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LAYOUTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _truncating_backend(tokenizer, max_length: int):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    copies = _BACKENDS.setdefault(tokenizer, {})
    if max_length not in copies:
        from tokenizers import Tokenizer

        copy = Tokenizer.from_str(backend.to_str())
        copy.no_padding()
        copy.enable_truncation(max_length, stride=0, strategy="longest_first",
                               direction=getattr(tokenizer, "truncation_side", "right"))
        copy.encode_special_tokens = backend.encode_special_tokens
        copies[max_length] = copy
    return copies[max_length]


def _cut_layout(tokenizer, max_length: int):
    """(the backend without truncation, special tokens before the text, after it) where texts may be cut before
    tokenizing (module docstring); None where not."""
    if getattr(tokenizer, "truncation_side", "right") != "right":
        return None
    if tokenizer not in _LAYOUTS:
        from tokenizers import Tokenizer

        spec = tokenizer.backend_tokenizer.to_str()
        _LAYOUTS[tokenizer] = None
        if _splits_at_whitespace(json.loads(spec)):
            whole = Tokenizer.from_str(spec)
            whole.no_truncation()
            whole.no_padding()
            whole.encode_special_tokens = tokenizer.backend_tokenizer.encode_special_tokens
            mask = whole.encode("a", add_special_tokens=True).special_tokens_mask
            if 0 in mask:  # where the text goes between the special tokens the tokenizer adds
                _LAYOUTS[tokenizer] = (whole, mask.index(0), len(mask) - 1 - max(i for i, m in enumerate(mask) if not m))
    layout = _LAYOUTS[tokenizer]
    return layout if layout is not None and max_length > layout[1] + layout[2] else None


def _splits_at_whitespace(spec: dict) -> bool:
    if any(_WHITESPACE.search(token.get("content", "")) for token in spec.get("added_tokens") or []):
        return False
    normalizers = _components(spec.get("normalizer"), "normalizers")
    pre_tokenizers = _components(spec.get("pre_tokenizer"), "pretokenizers")
    if not pre_tokenizers or not all(p["type"] in SAFE_PRE_TOKENIZERS for p in pre_tokenizers):
        return False
    if any(p["type"] == "ByteLevel" and not p.get("use_regex", True) for p in pre_tokenizers):
        return False  # without its regex ByteLevel does not split at all
    if any(p["type"] == "Metaspace" and not p.get("split", True) for p in pre_tokenizers):
        return False
    return all(n["type"] in SAFE_NORMALIZERS for n in normalizers) and \
        any(p["type"] in SPLITS_AT_WHITESPACE for p in pre_tokenizers)


def _components(spec, key: str) -> list[dict]:
    """A normalizer or pre-tokenizer as a flat list of its parts (a Sequence's, recursively); [] for none."""
    if not spec:
        return []
    if spec.get("type") == "Sequence":
        return [part for item in spec.get(key) or [] for part in _components(item, key)]
    return [spec]
