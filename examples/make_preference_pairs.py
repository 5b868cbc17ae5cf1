"""Build the preference set of docs/llm.md ("Preference tuning") from the packaged chatterbot corpus.

Each question's real answer is chosen and another question's answer (a seeded permutation) rejected: a rule a model
can learn (answer the question asked), on which a base model already leans one way. Writes
examples/data/pairs_train.csv (the first N pairs, default 256) and examples/data/pairs_val.csv (the next 64):

    .venv/bin/python examples/make_preference_pairs.py [N]
    cadenza train --config examples/dpo.yaml \\
        --training_set examples/data/pairs_train.csv --validation_set examples/data/pairs_val.csv
"""

import sys
from pathlib import Path

import numpy as np

from cadenza.data import assets

OUT = Path(__file__).resolve().parent / "data"
HELD_OUT = 64


def pairs():
    df = assets.chatterbot_pairs().drop_duplicates("question").sample(frac=1.0, random_state=0)
    df["rejected"] = df.answer.to_numpy()[np.random.default_rng(0).permutation(len(df))]
    return df[df.rejected != df.answer][["question", "answer", "rejected"]]


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    df = pairs()
    OUT.mkdir(exist_ok=True)
    df.iloc[:n].to_csv(OUT / "pairs_train.csv", index=False)
    df.iloc[n:n + HELD_OUT].to_csv(OUT / "pairs_val.csv", index=False)
    print(f"wrote {n} training and {HELD_OUT} held-out pairs to {OUT}")
