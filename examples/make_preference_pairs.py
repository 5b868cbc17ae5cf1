"""Build the preference set of docs/llm.md ("Preference tuning") from the packaged chatterbot corpus.

Each question's real answer is chosen and another question's answer (a seeded permutation) rejected: a rule a model
can learn (answer the question asked), on which a base model already leans one way. Writes
examples/data/pairs_train.csv (the first N pairs, default 256) and examples/data/pairs_val.csv (the next 64):

    .venv/bin/python examples/make_preference_pairs.py [N] [--out FOLDER] [--disjoint]
    cadenza train --config examples/dpo.yaml \\
        --training_set examples/data/pairs_train.csv --validation_set examples/data/pairs_val.csv

By default the rejected answers are a permutation of ALL answers, so a held-out pair's rejected answer can be a
training pair's chosen one (23 of the 64 held-out pairs at N = 256) and a held-out chosen answer a training rejected
one (18). `--disjoint` draws the rejected answers within each split instead: no completion of a held-out pair occurs
in training, and held-out accuracy measures the rule, not which answers were seen as good or bad.
"""

import argparse
from pathlib import Path

import numpy as np

from cadenza.data import assets

OUT = Path(__file__).resolve().parent / "data"
HELD_OUT = 64


def questions():
    return assets.chatterbot_pairs().drop_duplicates("question").sample(frac=1.0, random_state=0)


def pairs():
    """Rejected = the answers permuted over the whole set (the set the docs' measurements before --disjoint used)."""
    df = questions()
    df["rejected"] = df.answer.to_numpy()[np.random.default_rng(0).permutation(len(df))]
    return df[df.rejected != df.answer][["question", "answer", "rejected"]]


def disjoint_pairs(n: int, held_out: int = HELD_OUT):
    """The first n questions and the next `held_out`, each split rejecting only its own answers: a cyclic shift of a
    seeded permutation, so no row rejects its own answer (rows whose two answers are equal texts are dropped)."""
    df, rng, parts = questions(), np.random.default_rng(0), []
    for part in (df.iloc[:n].copy(), df.iloc[n:n + held_out].copy()):
        order = rng.permutation(len(part))
        rejected = np.empty(len(part), dtype=object)
        rejected[order] = part.answer.to_numpy()[np.roll(order, 1)]
        part["rejected"] = rejected
        parts.append(part[part.rejected != part.answer][["question", "answer", "rejected"]])
    return parts


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("n", nargs="?", type=int, default=256, help="training pairs (default 256)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"folder to write to (default {OUT})")
    parser.add_argument("--disjoint", action="store_true", help="rejected answers drawn within each split")
    args = parser.parse_args()
    if args.disjoint:
        train, val = disjoint_pairs(args.n)
    else:
        df = pairs()
        train, val = df.iloc[:args.n], df.iloc[args.n:args.n + HELD_OUT]
    args.out.mkdir(parents=True, exist_ok=True)
    train.to_csv(args.out / "pairs_train.csv", index=False)
    val.to_csv(args.out / "pairs_val.csv", index=False)
    print(f"wrote {len(train)} training and {len(val)} held-out pairs to {args.out}"
          + (" (rejected answers drawn within each split)" if args.disjoint else ""))
