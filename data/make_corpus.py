"""Generate the bundled pretraining corpora and a general instruction set (``data/corpus/``, ``data/instructions/``).

Unlabelled English-like text for pretraining a small base model offline, assembled from the
same vocabulary as the bundled tasks (review categories, brands and phrase banks from
``make_bundled.py``; people, towns, organisations and abbreviations from ``make_tasks.py``) so
that knowledge learnt in pretraining can transfer to them:

* ``corpus/general/``: product descriptions, reviews written out with their star rating,
  short encyclopedic entries (towns, companies, people, product categories, real places),
  everyday / business / technical abbreviations used in context and expanded, glossaries,
  simple dialogues and Q&A.
* ``corpus/medical/``: clinical notes, glossaries and teaching text for the medical and
  paediatric cardiology abbreviations, for continued pretraining (domain adaptation).
* ``instructions/``: simple generated prompt/completion pairs (what does X stand for, which
  category is this product, capital cities, word counts, ...) for the general instruction mixture.

No held-out row of a bundled task leaks in: reviews and entity sentences equal to a validation
or test row are redrawn, and abbreviations are shown only in their two *training* clauses
(validation/test use the third clause, see data/README.md). Each document is one JSON line
``{"text": ...}``; the script is stdlib-only and seeded, byte-identical on every run.

Usage::

    python data/make_corpus.py             # --seed 1234 (default), --out data/ (default)
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

from make_bundled import (
    CATEGORIES,
    COLOURS,
    GENERIC_ASPECTS,
    PRICES,
    make_catalogue,
    make_text,
    make_title,
)
from make_tasks import (
    ENTITY_TEMPLATES,
    FIRST_NAMES,
    LAST_NAMES,
    REAL_PLACES,
    TERMINOLOGY,
    TOWNS,
    WRAPPERS,
    _organisations,
    make_sentence,
    wrap,
    write_jsonl,  # the same JSONL writer as the other bundled data
)

HERE = Path(__file__).resolve().parent
# documents per split; general ≈ 2.4 MB of train text, medical ≈ 0.8 MB (a few hundred thousand tokens each)
CORPUS_SPLITS: dict[str, dict[str, int]] = {
    "general": {"train": 12000, "validation": 400, "test": 400},
    "medical": {"train": 4000, "validation": 200, "test": 200},
}
INSTRUCTION_SPLITS: dict[str, int] = {"train": 4500, "validation": 200, "test": 200}

# fmt: off
PLACE_FACTS = {
    "Lisbon": "the capital of Portugal", "Nairobi": "the capital of Kenya", "Toronto": "a large city in Canada",
    "Norway": "a country in northern Europe", "Chile": "a long, narrow country in South America",
    "Osaka": "a port city in Japan", "Melbourne": "a city in the south of Australia",
    "Ghana": "a country in West Africa", "Portugal": "a country in south-west Europe",
    "Vienna": "the capital of Austria", "Canada": "a country in North America",
    "Seoul": "the capital of South Korea",
}
TOWN_FEATURES = ["a river port", "a market town", "a seaside town", "a hill town", "a former mill town",
                 "a university town", "a commuter town", "a fishing village that grew into a town"]
TOWN_KNOWN_FOR = ["its Saturday market", "a long stone bridge", "the annual kite festival", "its botanical garden",
                  "a ruined castle", "the old railway station", "a large public library", "its cycling paths",
                  "a busy harbour", "its cheese"]
JOBS = ["engineer", "nurse", "teacher", "accountant", "designer", "journalist", "chef", "architect", "pharmacist",
        "data analyst", "cardiologist", "lawyer", "librarian", "paramedic", "researcher", "project manager"]
HOBBIES = ["cycling", "chess", "gardening", "baking", "sailing", "photography", "running", "painting", "hiking"]
COMPANY_WORK = {
    "Labs": "runs research laboratories", "Systems": "builds software and control systems",
    "Foods": "produces packaged food", "Logistics": "moves parcels and freight",
    "Energy": "supplies wind and solar power", "Analytics": "analyses data for other firms",
    "Holdings": "owns several smaller businesses", "Robotics": "designs industrial robots",
    "Media": "publishes magazines and podcasts", "Pharmaceuticals": "develops medicines",
    "Appliances": "makes kitchen and home appliances", "Outdoor": "sells camping and hiking gear",
}
FEATURES = ["a two-year warranty", "a detachable cable", "a matte finish", "a quiet motor", "a soft-touch grip",
            "an energy-saving mode", "a recycled plastic shell", "a USB-C charging port", "a compact design",
            "a rubberised base", "dishwasher-safe parts", "an auto shut-off", "a carry handle", "an LED indicator"]
SENTIMENT_WORDS = {"pos": ["positive", "pleased", "happy", "satisfied"],
                   "neg": ["negative", "disappointed", "unhappy", "dissatisfied"]}
GREETINGS = ["Hi", "Hello", "Good morning", "Hey", "Good afternoon"]
MEDICAL_NOTES = ["Reviewed on the ward today.", "Plan discussed with the family.", "Observations stable overnight.",
                 "Seen in clinic with her daughter.", "Referred by the GP last week.", "Eating and drinking well.",
                 "Pain controlled with paracetamol.", "Bloods sent this morning.", "Safety-netting advice given.",
                 "Follow-up booked in six weeks.", "Mobilising with a frame.", "Parents updated by phone."]
CARDIO_NOTES = ["Echo performed under sedation.", "Saturations 94% in air.", "Feeding well, gaining weight.",
                "Murmur heard at the left sternal edge.", "Seen in the joint fetal cardiology clinic.",
                "Discussed at the cardiac MDT.", "Parents counselled about surgery.", "ECG shows sinus rhythm."]
# fmt: on


def sentence_case(text: str) -> str:
    return text[0].upper() + text[1:]


class Vocab:
    """The shared pools, built once: the review catalogue (as the reviews were made), organisations, people."""

    def __init__(self, seed: int) -> None:
        self.catalogue = make_catalogue(random.Random(seed))  # the same products as data/reviews (same first draws)
        self.orgs = _organisations()
        rng = random.Random(f"{seed}:corpus:vocab")
        self.people = sorted({f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}" for _ in range(200)})
        self.town_facts = {t: (rng.choice(TOWN_FEATURES), rng.choice(TOWN_KNOWN_FOR), rng.choice(TOWNS))
                           for t in TOWNS}
        held_out: set[str] = set()
        for split in ("validation", "test"):
            for name in ("reviews", "entities"):
                path = HERE / name / f"{split}.jsonl"
                if path.is_file():
                    held_out |= {json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()}
        self.held_out = held_out


# ---- general documents ------------------------------------------------------------------------
def _product(rng: random.Random, vocab: Vocab) -> tuple[str, dict[str, str], str]:
    category = rng.choice(sorted(CATEGORIES))
    brand, model, product = rng.choice(vocab.catalogue[category])
    return category, {"category": category, "brand": brand, "model": model}, product


def _review(rng: random.Random, vocab: Vocab) -> tuple[str, str, int, str, str]:
    """(product, title, rating, text, polarity) of a fresh review that is not a held-out one."""
    category, ctx, product = _product(rng, vocab)
    rating = rng.choice([1, 2, 4, 5])
    pol = "pos" if rating >= 4 else "neg"
    while True:
        text = make_text(rng, ctx, pol, rating, rng.random() < 0.1)
        if text not in vocab.held_out:
            return product, make_title(rng, ctx, pol, rating), rating, text, pol


def doc_product_description(rng: random.Random, vocab: Vocab) -> str:
    category, ctx, product = _product(rng, vocab)
    names, noun, aspects, usages = CATEGORIES[category]
    colour, colour2 = rng.sample(COLOURS, 2)
    feats = rng.sample(FEATURES, 2)
    lines = [
        f"The {product} is a {category} from {ctx['brand']}.",
        "It is designed to be used {} and {}.".format(*rng.sample(usages, 2)),
        f"Key parts are the {', the '.join(rng.sample(aspects, 3))}.",
        f"It comes with {feats[0]} and {feats[1]}.",
        f"Available in {colour} and {colour2}, it costs {rng.choice(PRICES)}.",
    ]
    rng.shuffle(lines[1:4])
    if rng.random() < 0.5:
        lines.append(f"Customers mention the {rng.choice(aspects + GENERIC_ASPECTS)} most often in reviews.")
    return " ".join(lines)


def doc_review(rng: random.Random, vocab: Vocab) -> str:
    product, title, rating, text, pol = _review(rng, vocab)
    stars = f"{rating} star{'s' if rating > 1 else ''}"
    style = rng.randrange(4)
    if style == 0:
        return f"Review of the {product}\nRating: {rating} out of 5\nTitle: {title}\n{text}"
    if style == 1:
        return f'"{title}" ({stars}). {text} This {SENTIMENT_WORDS[pol][0]} review is about the {product}.'
    if style == 2:
        return (f"A customer gave the {product} {stars} and wrote: \"{text}\" The headline of the review was "
                f"\"{title}\". Overall the reviewer was {rng.choice(SENTIMENT_WORDS[pol])}.")
    reviews = []
    for _ in range(rng.randint(2, 3)):
        product, title, rating, text, _pol = _review(rng, vocab)
        reviews.append(f"{title} - {rating}/5\n{text}")
    return "Customer reviews\n\n" + "\n\n".join(reviews)


def doc_category(rng: random.Random, vocab: Vocab) -> str:
    category = rng.choice(sorted(CATEGORIES))
    names, noun, aspects, usages = CATEGORIES[category]
    makers = sorted({brand for brand, _, _ in vocab.catalogue[category]})
    return (f"A {category} is a product people use {usages[0]}, {usages[1]} or {usages[2]}. "
            f"Common types include the {', the '.join(names)}. When choosing a {noun}, buyers compare the "
            f"{', the '.join(aspects[:-1])} and the {aspects[-1]}. Brands that sell one include "
            f"{', '.join(makers)}.")


def doc_town(rng: random.Random, vocab: Vocab) -> str:
    town = rng.choice(TOWNS)
    feature, known_for, neighbour = vocab.town_facts[town]
    hospital = rng.choice([o for o in vocab.orgs["OH"] if town in o] or vocab.orgs["OH"])
    university = rng.choice([o for o in vocab.orgs["OU"] if town in o])
    person = rng.choice(vocab.people)
    parts = [f"{town} is {feature}, known for {known_for}.",
             f"The nearest larger town is {neighbour}." if neighbour != town else "",
             f"Patients from {town} are treated at {hospital}.", f"{university} is based in {town}.",
             f"The writer {person} grew up in {town}." if rng.random() < 0.5 else ""]
    return " ".join(p for p in parts if p)


def doc_company(rng: random.Random, vocab: Vocab) -> str:
    company = rng.choice(vocab.orgs["OC"])
    suffix = company.rsplit(" ", 1)[1]
    founder, ceo = rng.sample(vocab.people, 2)
    place = rng.choice(TOWNS + REAL_PLACES)
    year = rng.randint(1950, 2020)
    return (f"{company} is a company that {COMPANY_WORK[suffix]}. It was founded by {founder} in {year} and is "
            f"based in {place}. Its CEO (chief executive officer) is {ceo}. "
            f"{company} employs about {rng.randint(2, 90) * 10} people.")


def doc_person(rng: random.Random, vocab: Vocab) -> str:
    person = rng.choice(vocab.people)
    first = person.split()[0]
    job = rng.choice(JOBS)
    employer = rng.choice(vocab.orgs["OH"] if job in ("nurse", "cardiologist", "paramedic") else vocab.orgs["OC"])
    title = "Dr " if job in ("cardiologist", "researcher") and rng.random() < 0.6 else ""
    home, studied = rng.choice(TOWNS + REAL_PLACES), rng.choice(vocab.orgs["OU"])
    article = "an" if job[0] in "aeiou" else "a"
    return (f"{title}{person} is {article} {job} who works at {employer}. {first} was born in {home} and studied at "
            f"{studied}. In their free time, {first} enjoys {rng.choice(HOBBIES)}.")


def doc_place(rng: random.Random, vocab: Vocab) -> str:
    places = rng.sample(sorted(PLACE_FACTS), 3)
    return " ".join(f"{p} is {PLACE_FACTS[p]}." for p in places)


def doc_news(rng: random.Random, vocab: Vocab) -> str:
    """Two to four sentences in the entity templates' style (none equal to a held-out entities row)."""
    sentences = []
    while len(sentences) < rng.randint(2, 4):
        text = str(make_sentence(rng, rng.choice(ENTITY_TEMPLATES), vocab.orgs)["text"])
        if text not in vocab.held_out:
            sentences.append(text)
    return " ".join(sentences)


def _term_doc(rng: random.Random, domain: str, vocab: Vocab) -> str:
    """An abbreviation in one of its *training* clauses, with its expansion said in one of several ways."""
    term, expansion, clauses = rng.choice(TERMINOLOGY[domain])
    context = wrap(rng, rng.choice(WRAPPERS[domain]["train"]), clauses[rng.randrange(2)])
    style = rng.randrange(6)
    if style == 0:
        return f"{context} Here {term} stands for {expansion}."
    if style == 1:
        return f"{term} ({expansion}). Example: {context}"
    if style == 2:
        return f"Q: What does {term} mean in \"{clauses[rng.randrange(2)]}\"?\nA: {term} means {expansion}."
    if style == 3:
        entries = rng.sample(TERMINOLOGY[domain], 4)
        return "Glossary\n" + "\n".join(f"{t}: {e}" for t, e, _ in entries)
    if style == 4:
        return f"The abbreviation {term} is short for {expansion}. {context}"
    return f"{sentence_case(expansion)}, usually written {term}, came up again. {context}"


def doc_terms_general(rng: random.Random, vocab: Vocab) -> str:
    return _term_doc(rng, "general", vocab)


def doc_dialogue(rng: random.Random, vocab: Vocab) -> str:
    style = rng.randrange(3)
    a, b = rng.sample(FIRST_NAMES, 2)
    if style == 0:
        category, ctx, product = _product(rng, vocab)
        aspect = rng.choice(CATEGORIES[category][2])
        return (f"Customer: {rng.choice(GREETINGS)}, I bought the {product} and the {aspect} is not working.\n"
                f"Agent: Sorry to hear that. When did you buy it?\nCustomer: About {rng.randint(2, 9)} weeks ago.\n"
                f"Agent: It is still under warranty, so we can send a replacement {CATEGORIES[category][1]}.")
    if style == 1:
        term, expansion, clauses = rng.choice(TERMINOLOGY["general"])
        return (f"{a}: {clauses[rng.randrange(2)]}\n{b}: Sorry, what is {term}?\n{a}: It means {expansion}.\n"
                f"{b}: Thanks, that makes sense.")
    place = rng.choice(sorted(PLACE_FACTS))
    return f"{a}: Where is {place}?\n{b}: {place} is {PLACE_FACTS[place]}.\n{a}: I would love to visit one day."


GENERAL_DOCS: list[tuple[Callable[[random.Random, Vocab], str], float]] = [
    (doc_product_description, 2), (doc_review, 4), (doc_category, 0.5), (doc_town, 1), (doc_company, 1),
    (doc_person, 1), (doc_place, 0.3), (doc_news, 2), (doc_terms_general, 3), (doc_dialogue, 1.5),
]


# ---- medical documents --------------------------------------------------------------------------
def doc_medical_terms(rng: random.Random, vocab: Vocab) -> str:
    return _term_doc(rng, rng.choice(["medical", "medical", "paediatric_cardiology"]), vocab)


def doc_clinical_note(rng: random.Random, vocab: Vocab) -> str:
    domain = rng.choice(["medical", "paediatric_cardiology"])
    picks = rng.sample(TERMINOLOGY[domain], 3)
    lines = [wrap(rng, rng.choice(WRAPPERS[domain]["train"]), clauses[rng.randrange(2)]) for _, _, clauses in picks]
    notes = rng.sample(MEDICAL_NOTES if domain == "medical" else CARDIO_NOTES, 2)
    key = "; ".join(f"{t} = {e}" for t, e, _ in picks)
    return " ".join(lines[:2] + notes[:1] + lines[2:] + notes[1:]) + f"\nAbbreviations: {key}."


def doc_teaching(rng: random.Random, vocab: Vocab) -> str:
    domain = rng.choice(["medical", "paediatric_cardiology"])
    term, expansion, clauses = rng.choice(TERMINOLOGY[domain])
    hospital = rng.choice(vocab.orgs["OH"])
    field = "paediatric cardiology" if domain == "paediatric_cardiology" else "medicine"
    return (f"Teaching session at {hospital}: in {field}, {term} means {expansion}. "
            f"Students were shown the note \"{clauses[rng.randrange(2)]}\" and asked to expand {term}. "
            f"The answer is {expansion}.")


MEDICAL_DOCS: list[tuple[Callable[[random.Random, Vocab], str], float]] = [
    (doc_medical_terms, 4), (doc_clinical_note, 3), (doc_teaching, 2),
]


def generate_corpus(seed: int, name: str, vocab: Vocab) -> dict[str, list[dict[str, str]]]:
    """All splits of one corpus; documents are unique across splits (a repeat is redrawn)."""
    rng = random.Random(f"{seed}:corpus:{name}")
    kinds = GENERAL_DOCS if name == "general" else MEDICAL_DOCS
    makers, weights = [k for k, _ in kinds], [w for _, w in kinds]
    seen: set[str] = set()
    out: dict[str, list[dict[str, str]]] = {}
    for split, size in CORPUS_SPLITS[name].items():
        rows: list[dict[str, str]] = []
        while len(rows) < size:
            text = rng.choices(makers, weights)[0](rng, vocab)
            if text not in seen:
                seen.add(text)
                rows.append({"text": text})
        out[split] = rows
    return out


# ---- simple instructions ------------------------------------------------------------------------
def generate_instructions(seed: int, vocab: Vocab) -> dict[str, list[dict[str, str]]]:
    """Short prompt/completion pairs of several kinds; none is a bundled task's held-out question."""
    rng = random.Random(f"{seed}:instructions")

    def pair(right: str, wrong: str) -> tuple[str, str]:
        """The two options in a seeded order, so the answer is not always the first one offered."""
        return (right, wrong) if rng.random() < 0.5 else (wrong, right)

    def one() -> tuple[str, str]:
        kind = rng.randrange(12)
        # Kinds 8-11 answer a question by picking one of two options named in it (FLAN-style choice
        # questions): the skill a zero-shot "X or Y?" task needs, taught on other content. No review
        # sentiment or star-rating question is among them: reviews_sentiment stays a held-out task.
        if kind == 8:
            place = rng.choice(sorted(PLACE_FACTS))
            right = "country" if "country" in PLACE_FACTS[place] else "city"
            a, b = pair(right, "city" if right == "country" else "country")
            return rng.choice([f"Is {place} a {a} or a {b}?", f"{place}: {a} or {b}? Answer with one word."]), right
        if kind == 9:
            category, ctx, product = _product(rng, vocab)
            a, b = pair(category, rng.choice(sorted(set(CATEGORIES) - {category})))
            return rng.choice([f"Is the {product} a {a} or a {b}?",
                               f"Which kind of product is the {product}, {a} or {b}? Answer with one of the two."
                               ]), category
        if kind == 10:
            x, y = rng.sample(range(1, 100), 2)
            a, b = pair(str(max(x, y)), str(min(x, y)))
            return rng.choice([f"Which number is larger, {a} or {b}?", f"Pick the larger number: {a} or {b}."]), str(
                max(x, y))
        if kind == 11:
            name, right = (rng.choice(vocab.people), "person") if rng.random() < 0.5 else (rng.choice(TOWNS), "town")
            a, b = pair(right, "town" if right == "person" else "person")
            return rng.choice([f"Is {name} a {a} or a {b}?",
                               f"In one word, is \"{name}\" the name of a {a} or a {b}?"]), right
        if kind == 0:
            term, expansion, _ = rng.choice(TERMINOLOGY["general"])
            return f"What does {term} stand for?", expansion
        if kind == 1:
            category, ctx, product = _product(rng, vocab)
            return f"What kind of product is the {product}? Answer with the category.", category
        if kind == 2:
            category, ctx, product = _product(rng, vocab)
            return f"Which brand makes the {product}?", ctx["brand"]
        if kind == 3:
            place = rng.choice(sorted(PLACE_FACTS))
            return f"Describe {place} in a few words.", PLACE_FACTS[place]
        if kind == 4:
            words = rng.sample(FIRST_NAMES + TOWNS[:10] + COLOURS, rng.randint(2, 6))
            return f"How many words are in this list? {' '.join(words)}", str(len(words))
        if kind == 5:
            words = rng.sample(COLOURS + HOBBIES, 3)
            return f"Repeat these words in reverse order: {', '.join(words)}", ", ".join(reversed(words))
        if kind == 6:
            _, title, rating, text, _ = _review(rng, vocab)
            return f"Copy the first sentence of this text.\n\n{text}", text.split(". ")[0].rstrip(".") + "."
        person = rng.choice(vocab.people)
        return f"What is the first name of {person}?", person.split()[0]

    seen: set[str] = set()
    out: dict[str, list[dict[str, str]]] = {}
    for split, size in INSTRUCTION_SPLITS.items():
        rows: list[dict[str, str]] = []
        while len(rows) < size:
            prompt, completion = one()
            if prompt not in seen:
                seen.add(prompt)
                rows.append({"prompt": prompt, "completion": completion})
        out[split] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    vocab = Vocab(args.seed)
    print("| corpus | split | documents | words | MB |")
    print("|---|---|---|---|---|")
    for name in CORPUS_SPLITS:
        for split, rows in generate_corpus(args.seed, name, vocab).items():
            write_jsonl(args.out / "corpus" / name, split, rows)
            words = sum(len(r["text"].split()) for r in rows)
            size = (args.out / "corpus" / name / f"{split}.jsonl").stat().st_size / 1e6
            print(f"| {name} | {split} | {len(rows)} | {words} | {size:.2f} |")
    for split, rows in generate_instructions(args.seed, vocab).items():
        write_jsonl(args.out / "instructions", split, rows)
    print(f"instructions: {', '.join(f'{s} {n}' for s, n in INSTRUCTION_SPLITS.items())}")
    print(f"wrote corpus/ and instructions/ under {args.out}")


if __name__ == "__main__":
    main()
