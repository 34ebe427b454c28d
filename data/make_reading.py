"""Generate reading practice (``data/reading/``): tasks whose answer is in the prompt and nowhere else.

Issue 20's diagnosis: the bundled bases never learnt to read their context (retrieval scored 0.000 with the
right passage in every prompt), because nothing in their data rewards reading. Every row here is drawn afresh,
entities and values included, so no answer can be memorised; the only way to be right is to read:

* ``passage``: one short passage about an invented club, ship, bakery or festival, and a question on one of
  its facts (a town, a colour, a person, a year, a count, a fee with several digits);
* ``passages``: the same kind of question over two or three short passages about invented entities of one
  kind, each stating the asked fact, so the right one is found by the entity's name before the value is
  copied; in the shape ``prompting=retrieval`` builds (``[id] text`` blocks);
* ``episode``: a few-shot episode whose label words are drawn anew each time from unrelated words (symbol
  tuning, Wei et al. 2023; MetaICL, Min et al. 2022): the classes are easy (a colour or a town? a number above
  or below 50?), but which word names which class is only in the demonstrations.

Kept out on purpose: reviews, products and sentiment (the held-out zero/few-shot task) and the drug formulary
(the knowledge task). Rows are ``{"kind", "prompt", "completion"}``; stdlib only, seeded, byte-identical on
every run.

Usage::

    python data/make_reading.py            # --seed 2027 (default), --out data/ (default)
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from make_bundled import COLOURS
from make_tasks import FIRST_NAMES, LAST_NAMES, TOWNS

SPLITS = {"train": 6000, "validation": 200, "test": 200}
# Invented names cost the tiny tokenizer about one token per two characters: 520 characters keep every row under
# 240 tokens, inside max_seq_len 256 with the chat markup (checked with the tokenizer when the data was made).
MAX_PROMPT_CHARS = 520
SYLLABLES = ["ka", "lo", "mir", "ven", "tal", "dor", "bri", "sen", "qua", "ril", "fen", "zo", "mar", "tes", "vo",
             "lin", "ghar", "pel", "nu", "cro", "ash", "bel", "dru", "hin", "jor", "kel", "mos", "rad", "sul", "wen"]
KINDS = {  # entity kind -> (name suffixes, noun)
    "club": (["Club", "Society", "Circle"], "club"),
    "ship": (["Star", "Wave", "Runner"], "ship"),
    "bakery": (["Bakery", "Ovens", "Loaf House"], "bakery"),
    "festival": (["Festival", "Fair", "Days"], "festival"),
}
# Label words for episodes: common words with no tie to the classes they will name.
LABEL_WORDS = ["apple", "river", "stone", "paper", "cloud", "lamp", "tiger", "violin", "pepper", "garden", "rocket",
               "window", "honey", "anchor", "forest", "mirror", "pencil", "candle", "feather", "bottle", "zib", "lom",
               "trax", "vop", "quen", "dax", "blick", "wug", "fep", "morn"]


def invented_name(rng: random.Random, kind: str) -> str:
    word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
    return f"{word} {rng.choice(KINDS[kind][0])}"


def facts(rng: random.Random, kind: str) -> dict[str, str]:
    return {
        "town": rng.choice(TOWNS),
        "colour": rng.choice(COLOURS),
        "leader": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
        "year": str(rng.randint(1850, 2024)),
        "count": str(rng.randint(12, 980)),
        "fee": str(rng.randint(105, 9800)),
    }


def passage(rng: random.Random, name: str, kind: str, f: dict[str, str], keep: tuple[str, ...] = ()) -> str:
    """The facts in a random order and wording, so no fact sits at a fixed place to be found by position; with
    `keep`, only the opening sentence and those facts (short passages, so several fit a 256-token example)."""
    noun = KINDS[kind][1]
    sentences = [
        rng.choice([f"The {name} is a {noun} based in {f['town']}.", f"{f['town']} is home to the {name}, a {noun}."]),
        rng.choice([f"It was founded in {f['year']}.", f"The {name} dates from {f['year']}."]),
        rng.choice([f"It is led by {f['leader']}.", f"{f['leader']} leads the {name}."]),
        rng.choice([f"Its colour is {f['colour']}.", f"The {name} uses {f['colour']} as its colour."]),
        rng.choice([f"It has {f['count']} members.", f"The {name} counts {f['count']} members."]),
        rng.choice([f"A yearly pass costs {f['fee']} credits.", f"Members pay {f['fee']} credits a year."]),
    ]
    first, rest = sentences[0], sentences[1:]
    if keep:
        rest = [text for fact, text in zip(FACT_ORDER, rest, strict=True) if fact in keep]
    rng.shuffle(rest)
    return " ".join([first, *rest])


FACT_ORDER = ("year", "leader", "colour", "count", "fee")  # the facts of `passage`'s sentences after the first
QUESTIONS = {
    "town": ["Where is the {name} based?", "In which town is the {name}?"],
    "colour": ["What is the colour of the {name}?", "Which colour does the {name} use?"],
    "leader": ["Who leads the {name}?", "Who is the leader of the {name}?"],
    "year": ["When was the {name} founded?", "In what year was the {name} founded?"],
    "count": ["How many members does the {name} have?", "What is the number of members of the {name}?"],
    "fee": ["How many credits does a yearly pass to the {name} cost?", "What does a yearly pass to the {name} cost, "
            "in credits?"],
}


def one_passage(rng: random.Random) -> dict[str, str]:
    kind = rng.choice(sorted(KINDS))
    name, f = invented_name(rng, kind), facts(rng, kind)
    fact = rng.choice(sorted(QUESTIONS))
    question = rng.choice(QUESTIONS[fact]).format(name=name)
    prompt = f"Read the passage and answer.\n\n{passage(rng, name, kind, f)}\n\nQuestion: {question}"
    return {"kind": "passage", "prompt": prompt, "completion": f[fact]}


def several_passages(rng: random.Random) -> dict[str, str]:
    kind = rng.choice(sorted(KINDS))
    names: list[str] = []
    wanted = rng.randint(2, 3)  # the right passage and one or two distractors, all distinct
    while len(names) < wanted:
        name = invented_name(rng, kind)
        if name not in names:
            names.append(name)
    fact = rng.choice(sorted(QUESTIONS))
    # Every passage states the asked fact (of another entity in the distractors): only the name tells them apart.
    keep = (fact,)
    worlds = [(name, facts(rng, kind)) for name in names]
    target, f = worlds[0]
    rng.shuffle(worlds)
    blocks = "\n\n".join(f"[{kind}-{i + 1}] {passage(rng, name, kind, fs, keep)}"
                          for i, (name, fs) in enumerate(worlds))
    question = rng.choice(QUESTIONS[fact]).format(name=target)
    prompt = f"Use the following passages to answer.\n\n{blocks}\n\nQuestion: {question}"
    return {"kind": "passages", "prompt": prompt, "completion": f[fact]}


def _colour_or_town(rng: random.Random, cls: int) -> str:
    return rng.choice(COLOURS) if cls == 0 else rng.choice(TOWNS)


def _number_size(rng: random.Random, cls: int) -> str:
    return str(rng.randint(1, 49) if cls == 0 else rng.randint(51, 99))


def _person_or_town(rng: random.Random, cls: int) -> str:
    return rng.choice(FIRST_NAMES) if cls == 0 else rng.choice(TOWNS)


def episode(rng: random.Random) -> dict[str, str]:
    draw = rng.choice([_colour_or_town, _number_size, _person_or_town])
    labels = rng.sample(LABEL_WORDS, 2)  # which word names which class: only the demonstrations say
    shots = rng.randint(2, 6)
    classes = [0, 1] + [rng.randint(0, 1) for _ in range(shots - 2)]  # both classes always shown
    rng.shuffle(classes)
    lines = [f"Input: {draw(rng, c)}\nLabel: {labels[c]}" for c in classes]
    query = rng.randint(0, 1)
    prompt = "Label the last input the way the examples are labelled.\n\n" + "\n\n".join(lines)
    prompt += f"\n\nInput: {draw(rng, query)}\nLabel:"
    return {"kind": "episode", "prompt": prompt, "completion": labels[query]}


def generate(seed: int) -> dict[str, list[dict[str, str]]]:
    rng = random.Random(seed)
    makers = [one_passage, several_passages, episode]
    seen: set[str] = set()
    out: dict[str, list[dict[str, str]]] = {}
    for split, size in SPLITS.items():
        rows: list[dict[str, str]] = []
        while len(rows) < size:
            row = makers[len(rows) % len(makers)](rng)
            if row["prompt"] in seen or len(row["prompt"]) > MAX_PROMPT_CHARS:  # no prompt in two splits
                continue
            seen.add(row["prompt"])
            rows.append(row)
        out[split] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=2027)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    folder = args.out / "reading"
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in generate(args.seed).items():
        with open(folder / f"{split}.jsonl", "w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        kinds = {k: sum(r["kind"] == k for r in rows) for k in ("passage", "passages", "episode")}
        print(f"reading/{split}: {len(rows)} rows {kinds}")


if __name__ == "__main__":
    main()
