"""Write a Parquet file of N distinct review texts built from the packaged Rotten Tomatoes snippets, for the
larger-than-memory benchmark (bench/bench_scale.py, docs/scale.md). Written batch by batch: the generator itself
never holds more than one batch.

Row i pairs snippet a = i mod S with the first words of another snippet b (chosen from i // S), so texts stay
real review language and every (a, b) pair — every text — is distinct for N up to S * (S - 1) (~190M).
Columns:
  review     the text (snippet a, then up to 8 words of snippet b)
  words      number: the text's word count
  critic     category: one of 8 made-up critic names (by a hash of the row, so it carries no signal)
  sentiment  category: snippet a's label (fresh / rotten / plot)

    python bench/make_big_parquet.py --rows 1000000 --out /tmp/reviews-1m.parquet
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

BATCH = 100_000
CRITICS = np.array(["ann", "bob", "cho", "dee", "eli", "fay", "gus", "hal"])


def snippets():
    from cadenza.data.assets import rotten_tomatoes

    df = rotten_tomatoes().dropna(subset=["text"]).drop_duplicates("text").reset_index(drop=True)
    return df["text"].astype(str).to_numpy(), df["category"].astype(str).to_numpy()


def write(rows: int, out: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts, labels = snippets()
    heads = [" ".join(t.split()[:8]) for t in texts]
    count = len(texts)
    if rows > count * (count - 1):
        raise SystemExit(f"at most {count * (count - 1)} distinct rows from {count} snippets")
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    with pq.ParquetWriter(tmp, pa.schema([("review", pa.string()), ("words", pa.int64()), ("critic", pa.string()),
                                          ("sentiment", pa.string())])) as writer:
        for start in range(0, rows, BATCH):
            i = np.arange(start, min(rows, start + BATCH))
            a = i % count
            b = (a + 1 + i // count) % count  # never a itself; a new partner for each pass over the snippets
            review = [f"{texts[x]} {heads[y]}" for x, y in zip(a, b)]
            words = [r.count(" ") + 1 for r in review]
            critic = CRITICS[(i * 2654435761) % 2**32 % len(CRITICS)]
            writer.write_table(pa.table({"review": review, "words": words, "critic": critic.tolist(),
                                         "sentiment": labels[a].tolist()}))
    tmp.replace(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(f"{write(args.rows, args.out)}: {args.rows} rows")


if __name__ == "__main__":
    main()
