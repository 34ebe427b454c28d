"""Generate the bundled knowledge task (``data/knowledge/``): a fictional clinic's drug formulary and questions on it.

Stdlib only and seeded like the other generators, so every run writes byte-identical files. The drugs,
makers and facts are invented, so no pretrained model knows them in advance: a model answers either from
its weights (after fine-tuning on train) or from retrieved passages (RAG).

* ``documents.jsonl``: the formulary, two passages per drug (``<drug>-dosing``: class, standard dose,
  maximum daily dose; ``<drug>-handling``: maker, storage), ``{"id", "title", "text"}``.
* ``train/validation/test.jsonl``: ``{"id", "drug", "fact", "question", "answer", "passage_id"}``. Every
  fact is asked in four phrasings: train holds phrasings 0 and 1 of every fact, validation phrasing 2 of a
  seeded sample, test phrasing 3 of every fact. The test questions' wording never occurs in train; their
  facts do (the task measures recall of facts from the documents, as a closed-book QA benchmark does).
* ``openbook/``: reading practice for retrieval-augmented fine-tuning (as in RAFT, Zhang et al. 2024): the
  same questions, each with a passage in a field ``passage``, but the facts in these passages are drawn
  afresh (``OPENBOOK_WORLDS`` random formularies), so the answer can only come from the passage, not from
  memory. A model trained on them learns to read a retrieved passage; ``knowledge_raft`` mixes them with
  the closed-book questions.
* ``updated/``: the same formulary after an update in which a seeded quarter of the facts changed (new
  dose, new maker, new storage...): ``documents.jsonl`` and the three splits with the new answers and
  ``"changed": true|false`` per row, so accuracy on changed facts can be reported on its own. The original
  splits carry ``changed`` too (the facts the update will change), so answers can also be scored against
  the old facts.

Usage::

    python data/make_knowledge.py              # writes data/knowledge/
    python data/make_knowledge.py --seed 7 --out /tmp/data
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

N_DRUGS = 40
VALIDATION_FACTS = 60
CHANGED_SHARE = 0.25
OPENBOOK_WORLDS = 3
CLINIC = "Harbourside Clinic"

# fmt: off
SYLLABLES_A = ["Vel", "Tor", "Mira", "Zan", "Quel", "Dor", "Fen", "Lor", "Cal", "Bren", "Sor", "Nex", "Pra", "Ulm"]
SYLLABLES_B = ["mo", "da", "ri", "ve", "na", "lu", "ze", "ta", "po", "xi"]
SYLLABLES_C = ["ra", "lin", "zol", "pam", "tex", "dine", "vir", "mab", "sta", "fen"]
CLASSES = ["antihypertensive", "antibiotic", "antihistamine", "anticoagulant", "antidiabetic", "analgesic",
           "antiemetic", "bronchodilator"]
MAKERS = ["Corvane Labs", "Astley Pharma", "Norwick Health", "Pellmar Biotech", "Quillon Medical", "Ardent Generics"]
STORAGE = ["room temperature", "refrigerated", "frozen", "away from light"]
DOSES = ["5 mg once daily", "10 mg once daily", "20 mg twice daily", "25 mg three times daily",
         "50 mg twice daily", "100 mg once daily", "250 mg twice daily", "500 mg three times daily"]
MAX_DOSES = ["20 mg", "40 mg", "60 mg", "80 mg", "150 mg", "200 mg", "1000 mg", "2000 mg"]
# fact -> (passage kind, four phrasings of the question)
QUESTIONS = {
    "class": ("dosing", [
        "What class of drug is {drug}?",
        "{drug} belongs to which drug class?",
        "Which therapeutic class does {drug} fall under?",
        "In the formulary, {drug} is listed as what kind of drug?",
    ]),
    "dose": ("dosing", [
        "What is the standard adult dose of {drug}?",
        "How much {drug} does an adult normally take?",
        "What dose of {drug} is usual for adults?",
        "According to the formulary, how is {drug} dosed in adults?",
    ]),
    "max_dose": ("dosing", [
        "What is the maximum daily dose of {drug}?",
        "How much {drug} may be given per day at most?",
        "What is the daily limit for {drug}?",
        "What daily amount of {drug} must not be exceeded?",
    ]),
    "maker": ("handling", [
        "Who makes {drug}?",
        "Which company manufactures {drug}?",
        "Who is the manufacturer of {drug}?",
        "{drug} is supplied by which maker?",
    ]),
    "storage": ("handling", [
        "How should {drug} be stored?",
        "What are the storage conditions for {drug}?",
        "Where is {drug} kept?",
        "How does the clinic store its {drug}?",
    ]),
}
CHOICES = {"class": CLASSES, "dose": DOSES, "max_dose": MAX_DOSES, "maker": MAKERS, "storage": STORAGE}
# fmt: on


def drug_names(rng: random.Random, count: int) -> list[str]:
    names: set[str] = set()
    while len(names) < count:
        names.add(rng.choice(SYLLABLES_A) + rng.choice(SYLLABLES_B) + rng.choice(SYLLABLES_C))
    return sorted(names)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def passages(drug: str, facts: dict[str, str]) -> list[dict[str, str]]:
    key = drug.lower()
    return [
        {"id": f"{key}-dosing", "title": f"{drug} dosing",
         "text": f"{drug} is {article(facts['class'])} {facts['class']}. "
                 f"The standard adult dose of {drug} is {facts['dose']}, "
                 f"and the maximum daily dose is {facts['max_dose']}."},
        {"id": f"{key}-handling", "title": f"{drug} handling",
         "text": f"{drug} is made by {facts['maker']}. The {CLINIC} keeps {drug} {facts['storage']}."},
    ]


def make(seed: int) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    drugs = drug_names(rng, N_DRUGS)
    facts = {d: {fact: rng.choice(options) for fact, options in CHOICES.items()} for d in drugs}
    keys = [(d, f) for d in drugs for f in QUESTIONS]
    changed = set(rng.sample(keys, round(CHANGED_SHARE * len(keys))))
    updated = {d: dict(v) for d, v in facts.items()}
    for drug, fact in sorted(changed):
        updated[drug][fact] = rng.choice([o for o in CHOICES[fact] if o != facts[drug][fact]])
    validation_keys = set(rng.sample(keys, VALIDATION_FACTS))

    def rows(world: dict[str, dict[str, str]]) -> dict[str, list[dict]]:
        splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
        for drug, fact in keys:
            kind, phrasings = QUESTIONS[fact]
            wanted = [("train", 0), ("train", 1), ("test", 3)]
            if (drug, fact) in validation_keys:
                wanted.append(("validation", 2))
            for split, phrasing in wanted:
                row = {"id": f"{drug.lower()}-{fact}-q{phrasing}", "drug": drug, "fact": fact,
                       "question": phrasings[phrasing].format(drug=drug), "answer": world[drug][fact],
                       "passage_id": f"{drug.lower()}-{kind}"}
                row["changed"] = (drug, fact) in changed  # in both worlds: old answers of changed facts
                splits[split].append(row)
        for name, split_rows in splits.items():  # the same order in both worlds, so rows line up
            random.Random(f"{seed}:{name}").shuffle(split_rows)
        return splits

    out = dict(rows(facts))
    out.update({f"openbook/{name}": items for name, items in openbook(rng, drugs, keys, seed).items()})
    out["documents"] = [p for d in drugs for p in passages(d, facts[d])]
    out.update({f"updated/{name}": items for name, items in rows(updated).items()})
    out["updated/documents"] = [p for d in drugs for p in passages(d, updated[d])]
    return out


def openbook(rng: random.Random, drugs: list[str], keys: list[tuple[str, str]], seed: int) -> dict[str, list[dict]]:
    """Questions with the passage to read them from, in random formularies unrelated to the real one."""
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for world in range(OPENBOOK_WORLDS):
        facts = {d: {fact: rng.choice(options) for fact, options in CHOICES.items()} for d in drugs}
        for drug, fact in keys:
            kind, phrasings = QUESTIONS[fact]
            text = next(p["text"] for p in passages(drug, facts[drug]) if p["id"].endswith(kind))
            wanted = [("train", world % 2)] + ([("validation", 2)] if world == 0 and rng.random() < 0.15 else [])
            wanted += [("test", 3)] if world == 1 and rng.random() < 0.25 else []
            for split, phrasing in wanted:
                splits[split].append({
                    "id": f"{drug.lower()}-{fact}-w{world}-q{phrasing}", "drug": drug, "fact": fact,
                    "question": phrasings[phrasing].format(drug=drug), "answer": facts[drug][fact],
                    "passage_id": f"{drug.lower()}-{kind}", "passage": text,
                })
    for name, split_rows in splits.items():
        random.Random(f"{seed}:openbook:{name}").shuffle(split_rows)
    return splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=20261202)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    for name, items in make(args.seed).items():
        path = args.out / "knowledge" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
        extra = f", {sum(r['changed'] for r in items)} changed" if items and "changed" in items[0] else ""
        print(f"{path}: {len(items)} rows{extra}")


if __name__ == "__main__":
    main()
