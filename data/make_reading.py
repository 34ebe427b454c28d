"""Generate reading practice (``data/reading/``): tasks whose answer is in the prompt and nowhere else.

Issue 20's diagnosis: the bundled bases never learnt to read their context (retrieval scored 0.000 with the
right passage in every prompt), because nothing in their data rewards reading. Every row here is drawn afresh,
entities, values and label words included, so no answer can be memorised; the only way to be right is to read.
Four kinds (a third each of the two reading kinds, a sixth each of the two episode kinds):

* ``passage``: one passage about an invented vessel, machine, plant, breed or club, and a question on one of
  its facts, asked in words that differ from the passage's (``How fast does the Velmo Wave usually cruise?``
  over ``its usual cruising speed is 12 knots by day``);
* ``passages``: the shape ``prompting=retrieval`` builds (``[id] text`` lines, then the question): three
  passages, one or two about the entity asked about and the rest about other entities of the same kind, often
  with names one syllable apart, so the right passage is found by the name before the answer is copied;
* ``episode``: a few-shot episode whose label words are drawn anew each time from unrelated words (symbol
  tuning, Wei et al. 2023; MetaICL, Min et al. 2022): which word names which class is only in the
  demonstrations;
* ``chat_episode``: the same idea as earlier chat turns, the way ``prompting=few_shot`` shows examples: each
  episode draws two small pools of topic words, every message mixes words of its class with shared filler, and
  the question names both label words; the label of the last message is that of the demonstrations sharing
  its topic words (the nearest-neighbour reading that few-shot prompting relies on).

General English constructions recur on purpose (``is made by``, ``keeps ... in``, ``the highest ... is``,
``must not exceed``): they are what a reader of any document meets. Kept out: reviews, products and sentiment
(the held-out zero/few-shot task) and the drug formulary's domain (no drugs, doses, milligrams, clinics or
formularies: the knowledge task stays unseen). Rows are ``{"kind", "messages"}`` chats (``dataset/format:
chat``); stdlib only, seeded, byte-identical on every run.

Usage::

    python data/make_reading.py            # --seed 2027 (default), --out data/ (default)
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from make_bundled import COLOURS
from make_tasks import FIRST_NAMES, LAST_NAMES, TOWNS

# Train is large on purpose: 3,000 rows of a kind were memorised within three epochs (train loss 1.0, held-out 2.2)
# before any reading was learnt, so every training example must be new: 48,000 rows are more than the recipe sees.
SPLITS = {"train": 48000, "validation": 200, "test": 400}
# Invented names cost the tiny tokenizer about one token per two characters: 560 characters of user text keep
# almost every row under 256 tokens, inside max_seq_len 256 with the chat markup (checked when the data was made).
MAX_CHARS = 470
SYLLABLES = ["ka", "lo", "mir", "ven", "tal", "dor", "bri", "sen", "qua", "ril", "fen", "zo", "mar", "tes", "vo",
             "lin", "ghar", "pel", "nu", "cro", "ash", "bel", "dru", "hin", "jor", "kel", "mos", "rad", "sul", "wen"]
ORG_WORDS = ["Works", "Yards", "Farms", "Foundry", "Company", "Guild", "Brothers", "Trading", "Partners", "Mills"]
FREQUENCIES = ["once daily", "twice daily", "three times daily", "once weekly", "twice weekly", "every hour",
               "each morning", "by day", "at night", "in winter"]

# A family: the kind of entity, how its name is made, and its facts. Each fact: how a value is drawn, sentences
# stating it ({n} the name, {v} the value) and questions asking it. Quantity pairs (usual, highest) share a
# sentence as real documents often do, so the question's words must pick the right one.
FAMILIES: dict[str, dict] = {
    "vessel": {
        "suffixes": ["Star", "Wave", "Runner", "Gull"], "keeper": "harbour",
        "category": ["ferry", "trawler", "schooner", "barge", "tug", "cutter"],
        "unit": "knots", "usual": "cruising speed", "top": "top speed",
        "usual_q": ["How fast does the {n} usually cruise?", "At what speed does the {n} normally travel?",
                    "What is the usual cruising speed of the {n}?"],
        "top_q": ["What speed must the {n} never go beyond?", "What is the highest speed of the {n}?",
                  "What speed can the {n} not exceed?"],
        "places": ["in the north dock", "in the dry dock", "at the outer pier", "in the boat shed"],
    },
    "machine": {
        "suffixes": [], "keeper": "workshop",
        "category": ["loom", "press", "kiln", "pump", "lathe", "turbine", "mill"],
        "unit": "turns", "usual": "working load", "top": "maximum load",
        "usual_q": ["How hard is the {n} normally run?", "What is the standard working load of the {n}?",
                    "How is the {n} usually worked?"],
        "top_q": ["What load of the {n} must not be exceeded?", "What is the most the {n} may be run?",
                  "What is the maximum load of the {n}?"],
        "places": ["indoors", "under cover", "in a dry room", "away from damp", "at low heat"],
    },
    "plant": {
        "suffixes": [], "keeper": "garden",
        "category": ["fern", "shrub", "vine", "moss", "grass", "creeper", "palm"],
        "unit": "litres", "usual": "watering", "top": "greatest watering",
        "usual_q": ["How is the {n} watered?", "What is the usual watering of the {n}?",
                    "How much water does the {n} normally get?"],
        "top_q": ["What amount of water must the {n} never exceed?", "How much water may the {n} get at most?",
                  "What is the greatest watering the {n} can take?"],
        "places": ["in the shade", "under glass", "in full sun", "indoors", "away from frost"],
    },
    "breed": {
        "suffixes": ["herd", "flock"], "keeper": "farm",
        "category": ["dairy breed", "wool breed", "meat breed", "hardy breed", "hill breed"],
        "unit": "kg", "usual": "ration", "top": "largest ration",
        "usual_q": ["How are the {n} fed?", "What is the standard ration of the {n}?",
                    "How much feed do the {n} normally get?"],
        "top_q": ["What ration of the {n} must not be exceeded?", "What is the largest ration the {n} may get?",
                  "How much feed may the {n} get at most?"],
        "places": ["in the barn", "out to pasture", "in the upper field", "under shelter", "on the hill"],
    },
}
KIND_Q = ["What kind of {noun} is the {n}?", "The {n} is listed as what type of {noun}?",
          "Which class of {noun} is the {n}?"]
MAKER_Q = ["Who makes the {n}?", "Which company produced the {n}?", "The {n} comes from which maker?",
           "Who is the maker of the {n}?"]
PLACE_Q = ["How does the {k} keep its {n}?", "Where is the {n} kept?", "How is the {n} stored by the {k}?",
           "Where does the {k} keep the {n}?"]
TOWN_Q = ["Where is the {n} based?", "In which town is the {n}?", "Which town is home to the {n}?"]
LEADER_Q = ["Who looks after the {n}?", "Who is in charge of the {n}?", "Who is the keeper of the {n}?"]
MOTTO_Q = ["What is the motto of the {n}?", "Which motto does the {n} go by?"]
YEAR_Q = ["When did the {n} arrive?", "In what year did the {n} arrive?", "What year did the {n} come?"]
PREAMBLES = ["", "Answer from the {register} register.\n", "Answer from the {register} records.\n"]

# Episodes: label words with no tie to the classes they will name, and neutral filler for chat episodes.
LABEL_WORDS = ["apple", "river", "stone", "paper", "cloud", "lamp", "tiger", "violin", "pepper", "garden", "rocket",
               "window", "honey", "anchor", "forest", "mirror", "pencil", "candle", "feather", "bottle", "zib", "lom",
               "trax", "vop", "quen", "dax", "blick", "wug", "fep", "morn"]
TOPIC_WORDS = ["rain", "snow", "bread", "coal", "salt", "sand", "wool", "iron", "milk", "corn", "rope", "tin", "ink",
               "glass", "clay", "moss", "oak", "reed", "fog", "ice", "wind", "ash", "tar", "wax", "hay", "silk",
               "drum", "bell", "horn", "flute", "kite", "wheel", "cart", "boat", "road", "gate", "wall", "roof",
               "hill", "lake", "pond", "cave", "nest", "hive", "barn", "mill", "well", "bridge", "tower", "field"]
FILLER = ["the", "a", "we", "saw", "some", "near", "again", "today", "there", "with", "and", "more", "old", "new",
          "then", "after", "it", "was", "by", "our"]
QUESTIONS_CHAT = ["Is this note {a} or {b}?", "Label this message as {a} or {b}.", "{a} or {b}? Answer with one word.",
                  "Which is it, {a} or {b}?"]


def corpus_words(folder: Path) -> list[str]:
    """Plain words of the general pretraining corpus (data/corpus, written before this file), so that what is
    copied covers the tokenizer's vocabulary and not only a few invented syllables: a copy that works for any
    token is what carries over to documents never seen."""
    words: set[str] = set()
    with open(folder / "corpus" / "general" / "train.jsonl") as handle:
        for line in handle:
            words.update(re.findall(r"\b[a-z]{4,11}\b", json.loads(line)["text"]))
    return sorted(words)


WORDS: list[str] = []  # filled by generate() from the corpus


def common(rng: random.Random) -> str:
    return rng.choice(WORDS) if WORDS else word(rng)


def word(rng: random.Random, lo: int = 2, hi: int = 3) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(lo, hi))).capitalize()


def near_name(rng: random.Random, name: str) -> str:
    """A name one syllable away from `name` (the first word changed at one end), the distractor a search finds."""
    head, _, tail = name.partition(" ")
    changed = head[:-2] + rng.choice(SYLLABLES) if rng.random() < 0.5 else rng.choice(SYLLABLES).capitalize() + head[2:]
    return f"{changed} {tail}".strip() if changed != head else f"{word(rng)} {tail}".strip()


def entity(rng: random.Random, family: str) -> dict[str, str]:
    spec = FAMILIES[family]
    name = word(rng, 2, 3) + (f" {rng.choice(spec['suffixes'])}" if spec["suffixes"] else "")
    usual = rng.randint(1, 400)
    return {
        "name": name, "family": family,
        "category": rng.choice(spec["category"]) if rng.random() < 0.6 else common(rng),
        "usual": f"{usual} {spec['unit']} {rng.choice(FREQUENCIES)}",
        "top": f"{rng.randint(usual + 1, usual * 4 + 10)} {spec['unit']}",
        "maker": f"{(common(rng).capitalize() if rng.random() < 0.5 else word(rng))} {rng.choice(ORG_WORDS)}",
        "place": rng.choice(spec["places"]) if rng.random() < 0.5 else f"{rng.choice(['in', 'near', 'by'])} the "
                                                                          f"{common(rng)}",
        "motto": " ".join(common(rng) for _ in range(rng.randint(2, 4))),
        "town": rng.choice(TOWNS),
        "leader": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
        "year": str(rng.randint(1850, 2024)),
        "colour": rng.choice(COLOURS),
    }


def sentences(rng: random.Random, e: dict[str, str], keeper_org: str) -> dict[str, str]:
    """One sentence per fact group, each in one of several wordings."""
    spec, n = FAMILIES[e["family"]], e["name"]
    return {
        "category": rng.choice([f"The {n} is a {e['category']}.", f"The {n} is listed as a {e['category']}."]),
        "amounts": rng.choice([
            f"The usual {spec['usual']} of the {n} is {e['usual']}, and its {spec['top']} is {e['top']}.",
            f"The {n} has a usual {spec['usual']} of {e['usual']}; the {spec['top']} is {e['top']}.",
            f"Its {spec['top']} is {e['top']}, while the usual {spec['usual']} of the {n} is {e['usual']}."]),
        "maker": rng.choice([f"The {n} is made by {e['maker']}.", f"{e['maker']} makes the {n}."]),
        "place": rng.choice([f"The {keeper_org} keeps the {n} {e['place']}.", f"The {n} is kept {e['place']}."]),
        "town": rng.choice([f"The {n} is based in {e['town']}.", f"{e['town']} is home to the {n}."]),
        "leader": rng.choice([f"{e['leader']} looks after the {n}.", f"The {n} is in the care of {e['leader']}."]),
        "year": rng.choice([f"The {n} arrived in {e['year']}.", f"It arrived in {e['year']}."]),
        "motto": rng.choice([f"The motto of the {n} is {e['motto']}.", f"The {n} goes by the motto {e['motto']}."]),
    }


# The fact asked -> (the sentence group holding it, the question wordings).
ASKED = {"category": ("category", KIND_Q), "usual": ("amounts", None), "top": ("amounts", None),
         "maker": ("maker", MAKER_Q), "place": ("place", PLACE_Q), "town": ("town", TOWN_Q),
         "leader": ("leader", LEADER_Q), "year": ("year", YEAR_Q), "motto": ("motto", MOTTO_Q)}


def question(rng: random.Random, e: dict[str, str], fact: str, keeper_org: str) -> str:
    spec = FAMILIES[e["family"]]
    wordings = ASKED[fact][1] or spec[f"{fact}_q"]
    noun = e["family"] if e["family"] != "breed" else "breed"
    return rng.choice(wordings).format(n=e["name"], noun=noun, k=keeper_org)


def one_passage(rng: random.Random) -> dict:
    family = rng.choice(sorted(FAMILIES))
    e, keeper = entity(rng, family), f"{rng.choice(TOWNS)} {FAMILIES[family]['keeper']}"
    said = sentences(rng, e, keeper)
    fact = rng.choice(sorted(ASKED))
    rest = [g for g in said if g not in ("category", ASKED[fact][0])]
    groups = [ASKED[fact][0], *rng.sample(rest, 3)]  # the asked fact and three others
    rest = [said[g] for g in groups if g != "category"]
    rng.shuffle(rest)  # no fact sits at a fixed place to be found by position
    first = said["category"]
    q, answer = ask_fact(rng, e, fact, keeper)
    intro = rng.choice(["Read the passage and answer.", "Use the passage to answer."])
    return {"kind": "passage", "messages": chat(f"{intro}\n\n{' '.join([first, *rest])}\n\n{q}", answer)}


def slug(name: str) -> str:
    return name.lower().replace(" ", "-")


def several_passages(rng: random.Random) -> dict:
    """Three `[id] text` lines, exactly as the retrieval template renders them; the asked fact's passage among
    them, with passages of entities whose names are often one syllable away."""
    family = rng.choice(sorted(FAMILIES))
    keeper = f"{rng.choice(TOWNS)} {FAMILIES[family]['keeper']}"
    target = entity(rng, family)
    others = []
    while len(others) < 2:
        other = entity(rng, family)
        if rng.random() < 0.6:
            other["name"] = near_name(rng, target["name"])
        if other["name"] != target["name"] and all(o["name"] != other["name"] for o in others):
            others.append(other)
    fact = rng.choice(sorted(ASKED))
    group = ASKED[fact][0]
    aspects = ["profile", "care", "notes", "history"]

    def block(e: dict[str, str], must: str | None) -> tuple[str, str]:
        said = sentences(rng, e, keeper)
        groups = rng.sample(sorted(said), rng.randint(2, 3))
        if must and must not in groups:
            groups[0] = must
        return f"{slug(e['name'])}-{rng.choice(aspects)}", " ".join(said[g] for g in groups)

    # One or two passages on the target (one holds the answer), the rest on the others; each distractor states
    # the asked kind of fact too, about its own entity, so only the name tells them apart.
    blocks = [block(target, group)]
    if rng.random() < 0.4:
        blocks.append(block(target, None))
    blocks += [block(o, group) for o in others][: 3 - len(blocks)]
    rng.shuffle(blocks)
    lines = "".join(f"[{i}] {text}\n" for i, text in blocks)
    q, answer = ask_fact(rng, target, fact, keeper)
    return {"kind": "passages", "messages": chat(f"Use the following passages to answer.\n\n{lines}\n{q}", answer)}


def ask_fact(rng: random.Random, e: dict[str, str], fact: str, keeper: str) -> tuple[str, str]:
    preamble = rng.choice(PREAMBLES).format(register=keeper)
    return f"{preamble}Question: {question(rng, e, fact, keeper)}", e[fact]


def _colour_or_town(rng: random.Random, cls: int) -> str:
    return rng.choice(COLOURS) if cls == 0 else rng.choice(TOWNS)


def _number_size(rng: random.Random, cls: int) -> str:
    return str(rng.randint(1, 49) if cls == 0 else rng.randint(51, 99))


def _person_or_town(rng: random.Random, cls: int) -> str:
    return rng.choice(FIRST_NAMES) if cls == 0 else rng.choice(TOWNS)


def episode(rng: random.Random) -> dict:
    draw = rng.choice([_colour_or_town, _number_size, _person_or_town])
    labels = rng.sample(LABEL_WORDS, 2)  # which word names which class: only the demonstrations say
    shots = rng.randint(2, 6)
    classes = [0, 1] + [rng.randint(0, 1) for _ in range(shots - 2)]  # both classes always shown
    rng.shuffle(classes)
    lines = [f"Input: {draw(rng, c)}\nLabel: {labels[c]}" for c in classes]
    query = rng.randint(0, 1)
    prompt = "Label the last input the way the examples are labelled.\n\n" + "\n\n".join(lines)
    prompt += f"\n\nInput: {draw(rng, query)}\nLabel:"
    return {"kind": "episode", "messages": chat(prompt, labels[query])}


def chat_episode(rng: random.Random) -> dict:
    """Demonstrations as earlier chat turns; a message's class is given by the topic words it shares with them."""
    pool = rng.sample(TOPIC_WORDS, 12)
    topics = [pool[:6], pool[6:]]
    labels = rng.sample(LABEL_WORDS, 2)
    ask_t = rng.choice(QUESTIONS_CHAT)
    shots = rng.randint(1, 4)
    classes = [rng.randint(0, 1) for _ in range(shots)] + [rng.randint(0, 1)]
    if shots >= 2 and len(set(classes[:-1])) == 1:
        classes[0] = 1 - classes[0]  # with two or more shots, both classes are shown

    def message(cls: int) -> str:
        words = rng.sample(topics[cls], rng.randint(2, 3)) + rng.sample(FILLER, rng.randint(2, 4))
        rng.shuffle(words)
        return " ".join(words).capitalize() + "."

    order = labels if rng.random() < 0.5 else labels[::-1]  # the question names both words, in either order
    turns: list[dict[str, str]] = []
    for cls in classes:
        turns += [{"role": "user", "content": f"{ask_t.format(a=order[0], b=order[1])}\n\n{message(cls)}"},
                  {"role": "assistant", "content": labels[cls]}]
    return {"kind": "chat_episode", "messages": turns}


def chat(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def generate(seed: int, data_dir: Path) -> dict[str, list[dict]]:
    WORDS[:] = corpus_words(data_dir)
    rng = random.Random(seed)
    makers = [one_passage, several_passages, episode, one_passage, several_passages, chat_episode]
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split, size in SPLITS.items():
        rows: list[dict] = []
        while len(rows) < size:
            row = makers[len(rows) % len(makers)](rng)
            text = "\n".join(m["content"] for m in row["messages"])
            if text in seen or len(text) > MAX_CHARS:  # no row in two splits; every row fits 256 tokens
                continue
            seen.add(text)
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
    for split, rows in generate(args.seed, args.out).items():
        if split == "train":  # Parquet with zstd: a fifth of the JSONL size (pyarrow comes with datasets)
            import pyarrow as pa
            import pyarrow.parquet as pq

            (folder / "train.jsonl").unlink(missing_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), folder / "train.parquet", compression="zstd",
                           compression_level=19)
        else:
            with open(folder / f"{split}.jsonl", "w") as handle:
                for row in rows:
                    handle.write(json.dumps(row) + "\n")
        kinds = {k: sum(r["kind"] == k for r in rows) for k in ("passage", "passages", "episode", "chat_episode")}
        print(f"reading/{split}: {len(rows)} rows {kinds}")


if __name__ == "__main__":
    main()
