"""Generate the bundled verifiable task ``data/larger_smaller/``: "which number is larger/smaller?" questions.

Stdlib only and seeded, like the other ``make_*.py`` scripts: every run writes byte-identical files.
Each row asks for the larger or the smaller of two whole numbers from 1 to 99 and carries the one right
answer (``answer``, a number as text), so a reward can check it exactly (``objective=grpo``, README
"Reinforcement fine-tuning with verifiable rewards"). The instruction set (``data/instructions``) already
asks "which is larger?" on some pairs; "smaller" is new to the instruction-tuned tiny model.

Held out: a pair of numbers (in either order, either question) is in one split only, and no validation or
test pair is one the instruction set asks about, so held-out questions are new to ``tiny_instruct`` too.

Usage::

    python data/make_verifiable.py              # writes data/larger_smaller/{train,validation,test}.jsonl
    python data/make_verifiable.py --seed 7 --out /tmp/data
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from make_tasks import write_jsonl  # the one JSONL writer of the data scripts

HERE = Path(__file__).resolve().parent
SPLITS: dict[str, int] = {"train": 2000, "validation": 100, "test": 200}
TEMPLATES = {
    "larger": ["Which number is larger, {a} or {b}?", "Pick the larger number: {a} or {b}.",
               "Which is bigger, {a} or {b}? Answer with the number."],
    "smaller": ["Which number is smaller, {a} or {b}?", "Pick the smaller number: {a} or {b}.",
                "Which is less, {a} or {b}? Answer with the number."],
}


def instruction_pairs(data_dir: Path) -> set[frozenset[int]]:
    """Pairs of numbers the bundled instruction set already compares (kept out of validation and test)."""
    pairs: set[frozenset[int]] = set()
    for path in sorted((data_dir / "instructions").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            prompt = json.loads(line)["prompt"]
            match = re.fullmatch(r"(?:Which number is larger, |Pick the larger number: )(\d+) or (\d+)[?.]", prompt)
            if match:
                pairs.add(frozenset(int(x) for x in match.groups()))
    return pairs


def generate(seed: int, seen_by_instructions: set[frozenset[int]]) -> dict[str, list[dict[str, object]]]:
    """Rows per split; each unordered pair of numbers belongs to one split."""
    rng = random.Random(f"{seed}:compare")
    pairs = [frozenset((x, y)) for x in range(1, 100) for y in range(x + 1, 100)]
    rng.shuffle(pairs)
    fresh = [p for p in pairs if p not in seen_by_instructions]
    held = {"validation": fresh[:SPLITS["validation"]],
            "test": fresh[SPLITS["validation"]:SPLITS["validation"] + SPLITS["test"]]}
    used = {p for split in held.values() for p in split}
    held["train"] = [p for p in pairs if p not in used][:SPLITS["train"]]
    out: dict[str, list[dict[str, object]]] = {}
    serial = 0
    for split in ("train", "validation", "test"):
        rows = []
        for pair in held[split]:
            a, b = rng.sample(sorted(pair), 2)  # the order the question names them in
            relation = "larger" if rng.random() < 0.5 else "smaller"
            serial += 1
            rows.append({"id": f"cmp-{serial:05d}", "question": rng.choice(TEMPLATES[relation]).format(a=a, b=b),
                         "answer": str(max(a, b) if relation == "larger" else min(a, b)), "relation": relation,
                         "a": a, "b": b})
        out[split] = rows
    return out


def table(splits: dict[str, list[dict[str, object]]]) -> str:
    """The split sizes and the larger/smaller balance, as a Markdown table (data/README.md)."""
    lines = ["| split | rows | larger | smaller |", "|---|---|---|---|"]
    for split, rows in splits.items():
        larger = sum(row["relation"] == "larger" for row in rows)
        lines.append(f"| {split} | {len(rows)} | {larger} | {len(rows) - larger} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="writes <out>/larger_smaller/")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    splits = generate(args.seed, instruction_pairs(HERE))
    for split, rows in splits.items():
        write_jsonl(args.out / "larger_smaller", split, rows)
    print(table(splits))


if __name__ == "__main__":
    main()
