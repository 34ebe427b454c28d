"""Generate a heavy-tailed prompt/completion set for packing benchmarks (written where you say, not bundled).

Most examples are short and a few are long, as in real instruction data: each completion strings
together k sentences of the bundled general corpus (``data/corpus/general/train.jsonl``), with k
drawn from a Pareto distribution (shape ``--alpha``, tail P(k > x) ~ x^-alpha) and capped at
``--max-sentences``. With the defaults, the tiny tokenizer and max_seq_len 256 the 4,000 train
examples have token lengths median 58, p90 133, p95 192, p99 256, mean 75; 3% reach max_seq_len
(truncated by the dataset's ``overlength: truncate``): padding each batch to its longest example
wastes most of the step.

Stdlib only and seeded: the same arguments write byte-identical files. Use it with the
``instructions_general`` dataset config (its template is ``{{ prompt }}`` / ``{{ completion }}``)::

    python data/make_heavy_tail.py --out /tmp/heavy_tail
    tunelab train dataset=instructions_general dataset.source.path=/tmp/heavy_tail \\
        dataset.overlength=truncate hyperparams.packing=dataset
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

SPLITS = {"train": 4000, "validation": 100, "test": 100}
CORPUS = Path(__file__).resolve().parent / "corpus" / "general" / "train.jsonl"
ASKS = ["Write a note about {topic}.", "Tell me about {topic}.", "Describe {topic} in your own words.",
        "What can you say about {topic}?"]


def sentences(corpus: Path = CORPUS) -> list[str]:
    """The corpus's distinct sentences, in file order."""
    seen: dict[str, None] = {}
    for line in corpus.read_text(encoding="utf-8").splitlines():
        for sentence in re.split(r"(?<=[.!?])\s+", json.loads(line)["text"].replace("\n", " ")):
            if len(sentence.split()) >= 4:
                seen.setdefault(sentence.strip(), None)
    return list(seen)


def make_rows(count: int, rng: random.Random, pool: list[str], alpha: float, cap: int) -> list[dict[str, str]]:
    rows = []
    for _ in range(count):
        k = min(cap, int(rng.paretovariate(alpha)))  # 1 most often; a long tail of many-sentence answers
        picked = rng.sample(pool, k)
        topic = " ".join(picked[0].split()[:3]).rstrip(".,:;!?")
        rows.append({"prompt": rng.choice(ASKS).format(topic=topic), "completion": " ".join(picked)})
    return rows


def write(out: Path, seed: int = 0, alpha: float = 1.5, cap: int = 12, splits: dict[str, int] | None = None) -> Path:
    """Write `<out>/<split>.jsonl` for each split; returns `out`."""
    pool = sentences()
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    for split, count in (splits or SPLITS).items():
        with open(out / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as file:
            for row in make_rows(count, rng, pool, alpha, cap):
                file.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=1.5, help="Pareto shape: smaller means a heavier tail")
    parser.add_argument("--max-sentences", type=int, default=12)
    parser.add_argument("--train", type=int, default=SPLITS["train"])
    args = parser.parse_args()
    write(args.out, args.seed, args.alpha, args.max_sentences, {**SPLITS, "train": args.train})
    print(f"wrote {args.out}/{{{','.join(SPLITS)}}}.jsonl")


if __name__ == "__main__":
    main()
