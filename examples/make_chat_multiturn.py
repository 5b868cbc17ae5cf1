"""Build examples/data/chat_multiturn.jsonl: multi-turn conversations from the packaged chatterbot corpus.

The corpus is mostly question/answer pairs, grouped by topic file. Consecutive pairs of one topic are chained into
conversations of 2 or 3 exchanges (user, assistant, user, assistant[, user, assistant]), in OpenAI `messages` form,
one JSON object per line. Deterministic (seeded), so rerunning writes the same file:

    .venv/bin/python examples/make_chat_multiturn.py
"""

import json
import random
from pathlib import Path

from cadenza.data.assets import chatterbot_pairs

OUT = Path(__file__).resolve().parent / "data" / "chat_multiturn.jsonl"
CONVERSATIONS = 300


def conversations(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for category, pairs in chatterbot_pairs().groupby("category", sort=True):
        rows = list(zip(pairs["question"], pairs["answer"]))
        start = 0
        while start + 2 <= len(rows):
            size = rng.choice((2, 3))
            chunk = rows[start:start + size]
            start += size
            messages = [turn for q, a in chunk for turn in ({"role": "user", "content": q},
                                                             {"role": "assistant", "content": a})]
            out.append({"messages": messages, "category": category})
    rng.shuffle(out)
    return out[:CONVERSATIONS]


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    rows = conversations()
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    turns = sum(len(r["messages"]) for r in rows)
    print(f"wrote {OUT}: {len(rows)} conversations, {turns} turns")
