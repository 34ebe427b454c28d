"""Why the bundled bases do not read their context (issue 20): three probes of `tiny_instruct`, each a plain
PyTorch loop (no Lightning: the question is what the weights can learn, not what the trainer does).

    .venv/bin/python bench/reading_probe.py induction [--steps 400]   # copy the token that followed this one before
    .venv/bin/python bench/reading_probe.py recall [--steps 800]      # associative recall: value of a 2-token key
    .venv/bin/python bench/reading_probe.py facts [--steps 1000]      # facts read from passages, values drawn afresh

* ``induction``: 24 random token ids, a separator, the same 24 again; loss on the repeat. Prints the share of
  repeated tokens predicted (teacher forced) on a fixed held-out batch.
* ``recall``: 8 pairs ``k1 k2 : v1 v2 ;`` of random ids, then ``? k1 k2 :``; loss on the value. Prints the
  share of held-out rows whose whole value is predicted, and of first value tokens.
* ``facts``: chats about an invented entity (made by, kept where, what kind, standard and maximum amounts),
  every value drawn afresh from the general corpus's words and from numbers, so nothing can be guessed from
  the prior; four in five rows ask every fact of one passage in turn (five supervised answers a row), the
  rest one fact in the retrieval template's shape, sometimes beside another entity's passage. Prints greedy
  exact match on 120 held-out rows and on the knowledge task's first 120 test questions with only their gold
  passage (``k_gold``) or the drug's two passages (``k_both``) in the retrieval template: a perfect retriever.

Batch 32 (``facts``: 16), AdamW lr 1e-3, two torch threads; figures in README "Teaching the base to read".
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "src" / "tunelab" / "assets" / "tiny-instruct"
Batch = tuple[torch.Tensor, torch.Tensor]
SEP, KV, PAIR, ASK = 5, 7, 8, 9  # token ids used as punctuation in the synthetic probes (specials of no meaning)


def induction(model: torch.nn.Module, steps: int, every: int = 50) -> None:
    length, batch = 24, 32

    def draw(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        seq = torch.randint(10, model.config.vocab_size, (batch, length), generator=gen)
        x = torch.cat([seq, torch.full((batch, 1), SEP), seq], 1)
        labels = x.clone()
        labels[:, : length + 1] = -100
        return x, labels

    def score(x: torch.Tensor) -> float:
        with torch.no_grad():
            guess = model(x).logits[:, length:-1].argmax(-1)
        return (guess == x[:, length + 1 :]).float().mean().item()

    train_loop(model, steps, every, draw, lambda x, _y: f"copy={score(x):.3f}")


def recall(model: torch.nn.Module, steps: int, every: int = 100, pairs: int = 8) -> None:
    batch, key_len, value_len = 32, 2, 2

    def draw(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        rows, labels = [], []
        for _ in range(batch):
            keys = torch.randint(10, model.config.vocab_size, (pairs, key_len), generator=gen).tolist()
            values = torch.randint(10, model.config.vocab_size, (pairs, value_len), generator=gen).tolist()
            seq = [t for k, v in zip(keys, values, strict=True) for t in k + [KV] + v + [PAIR]]
            asked = int(torch.randint(0, pairs, (1,), generator=gen))
            seq += [ASK] + keys[asked] + [KV]
            rows.append(seq + values[asked])
            labels.append([-100] * len(seq) + values[asked])
        return torch.tensor(rows), torch.tensor(labels)

    def score(x: torch.Tensor) -> str:
        with torch.no_grad():
            guess = model(x).logits[:, -value_len - 1 : -1].argmax(-1)
        hit = guess == x[:, -value_len:]
        return f"exact={hit.all(-1).float().mean().item():.3f} first={hit[:, 0].float().mean().item():.3f}"

    train_loop(model, steps, every, draw, lambda x, _y: score(x))


def train_loop(
    model: torch.nn.Module,
    steps: int,
    every: int,
    draw: Callable[[torch.Generator], Batch],
    report: Callable[[torch.Tensor, torch.Tensor], str],
) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    held_x, held_y = draw(torch.Generator().manual_seed(99))
    gen = torch.Generator().manual_seed(1)
    start = time.time()
    for step in range(steps + 1):
        if step % every == 0:
            model.eval()
            print(f"step {step} {time.time() - start:.0f}s {report(held_x, held_y)}", flush=True)
            model.train()
        if step == steps:
            return
        x, y = draw(gen)
        loss = model(x, labels=y).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


# --- facts: relation-keyed reading with values that cannot be guessed -------------------------------------
SYLLABLES = [
    "ka",
    "lo",
    "mir",
    "ven",
    "tal",
    "dor",
    "bri",
    "sen",
    "qua",
    "ril",
    "fen",
    "zo",
    "mar",
    "tes",
    "vo",
    "lin",
    "ghar",
    "pel",
    "nu",
    "cro",
    "ash",
    "bel",
    "dru",
    "hin",
    "jor",
    "kel",
    "mos",
    "rad",
    "sul",
    "wen",
]
ORGS = ["Works", "Yards", "Farms", "Foundry", "Company", "Guild", "Brothers", "Trading", "Partners", "Mills"]
KEEPERS = ["office", "depot", "workshop", "station", "harbour", "school", "library", "museum", "garden", "farm"]
REGISTERS = ["register", "records", "catalogue", "list", "handbook", "inventory"]
FAMILIES = [
    ("boat", "speed", "knots", "cruise"),
    ("machine", "load", "turns", "run"),
    ("plant", "watering", "litres", "water"),
    ("herd", "ration", "kg", "feed"),
    ("engine", "fuel", "gallons", "fuel"),
    ("kiln", "heat", "degrees", "fire"),
    ("bridge", "weight", "tonnes", "load"),
    ("lamp", "oil", "pints", "fill"),
]
FREQUENCIES = [
    "once daily",
    "twice daily",
    "three times daily",
    "once weekly",
    "twice weekly",
    "every hour",
    "each morning",
    "at night",
    "in winter",
    "by day",
]


def corpus_words() -> list[str]:
    with open(ROOT / "data" / "corpus" / "general" / "train.jsonl") as handle:
        return sorted({w for line in handle for w in re.findall(r"\b[a-z]{4,10}\b", json.loads(line)["text"])})


class Facts:
    """Draws entities and their facts; every value fresh (corpus words, numbers), so reading is the only way."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.words = WORDS

    def name(self) -> str:
        return "".join(self.rng.choice(SYLLABLES) for _ in range(self.rng.randint(2, 3))).capitalize()

    def entity(self, name: str) -> tuple[list[str], list[str], dict[str, tuple[list[str], str]]]:
        r, w = self.rng, self.words
        noun, qty, unit, verb = r.choice(FAMILIES)
        kind = r.choice(w)
        maker = f"{r.choice(w).capitalize()} {r.choice(ORGS)}"
        keeper = r.choice(KEEPERS)
        where = r.choice(["{a}", "in the {a}", "near the {a}", "away from {a}", "under the {a}", "{a} and {b}"])
        where = where.format(a=r.choice(w), b=r.choice(w))

        def amount() -> str:
            number = r.choice([r.randint(1, 9), r.randint(10, 99), r.randint(1, 30) * 10, r.randint(1, 40) * 50])
            return f"{number} {unit}"

        usual, top = f"{amount()} {r.choice(FREQUENCIES)}", amount()
        article = "an" if kind[0] in "aeiou" else "a"
        profile = [
            r.choice([f"{name} is {article} {kind}.", f"The {name} is {article} {kind} {noun}."]),
            r.choice([f"{name} is made by {maker}.", f"{maker} makes {name}."]),
            r.choice([f"The {keeper} keeps {name} {where}.", f"{name} is kept {where} by the {keeper}."]),
        ]
        r.shuffle(profile)
        amounts = [
            r.choice(
                [
                    f"The standard {qty} of {name} is {usual}, and the maximum {qty} is {top}.",
                    f"The maximum {qty} of {name} is {top}, and the standard {qty} is {usual}.",
                ]
            )
        ]
        questions = {
            "kind": (
                [f"In the {{reg}}, {name} is listed as what kind of {noun}?", f"What kind of {noun} is {name}?"],
                kind,
            ),
            "maker": ([f"{name} is supplied by which maker?", f"Who makes {name}?"], maker),
            "storage": ([f"How does the {keeper} store its {name}?", f"Where is {name} kept?"], where),
            "usual": (
                [f"According to the {{reg}}, how is {name} {verb}ed?", f"What is the standard {qty} of {name}?"],
                usual,
            ),
            "top": ([f"What {qty} of {name} must not be exceeded?", f"What is the maximum {qty} of {name}?"], top),
        }
        return profile, amounts, questions

    def row(self) -> list[dict[str, str]]:
        """A chat: one entity's passages (sometimes beside another's), then one or every fact asked."""
        r = self.rng
        name, register = self.name(), r.choice(REGISTERS)
        profile, amounts, questions = self.entity(name)
        passages = [(f"{name.lower()}-profile", " ".join(profile)), (f"{name.lower()}-notes", " ".join(amounts))]
        if r.random() < 0.3:
            other = self.name()
            p2, a2, _ = self.entity(other)
            passages.append((f"{other.lower()}-notes", " ".join(r.choice([p2, a2]))))
        r.shuffle(passages)
        if r.random() < 0.5:
            head = "Use the following passages to answer.\n\n" + "".join(f"[{i}] {t}\n" for i, t in passages) + "\n"
        else:
            head = "Read the passage and answer.\n\n" + " ".join(t for _, t in passages) + "\n\n"
        head += r.choice(["", f"Answer from the {r.choice(KEEPERS)} {register}.\n"])
        asked = list(questions)
        r.shuffle(asked)
        if r.random() < 0.2:
            asked = asked[:1]
        chat = []
        for turn, fact in enumerate(asked):
            phrasings, answer = questions[fact]
            question = r.choice(phrasings).format(reg=register)
            chat.append({"role": "user", "content": (head if turn == 0 else "") + f"Question: {question}"})
            chat.append({"role": "assistant", "content": answer})
        return chat


WORDS: list[str] = []


def facts(model: torch.nn.Module, steps: int, every: int = 200, space: bool = False) -> None:
    WORDS.extend(corpus_words())
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    draw, held_out = Facts(1), Facts(12345)
    held = [c[:2] for c in (held_out.row() for _ in range(120))]
    documents = {d["id"]: d for d in map(json.loads, open(ROOT / "data" / "knowledge" / "documents.jsonl"))}
    questions = [json.loads(line) for line in open(ROOT / "data" / "knowledge" / "test.jsonl")][:120]

    def knowledge(q: dict, both: bool) -> list[dict[str, str]]:
        drug = q["passage_id"].rsplit("-", 1)[0]
        ids = [q["passage_id"]] + (
            [i for i in (f"{drug}-dosing", f"{drug}-handling") if i != q["passage_id"]] if both else []
        )
        random.Random(q["id"]).shuffle(ids)
        body = "".join(f"[{i}] {documents[i]['text']}\n" for i in ids)
        prompt = (
            f"Use the following passages to answer.\n\n{body}\nAnswer from the Harbourside Clinic formulary.\n"
            f"Question: {q['question']}"
        )
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": q["answer"]}]

    sets = {
        "held": held,
        "k_gold": [knowledge(q, False) for q in questions],
        "k_both": [knowledge(q, True) for q in questions],
    }

    def encode(chat: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        ids, labels = [], []
        for i in range(1, len(chat), 2):  # every assistant turn supervised, each prompt part masked
            before = tokenizer.apply_chat_template(chat[: i - 1], tokenize=False) if i > 1 else ""
            prompt = tokenizer.apply_chat_template(chat[:i], add_generation_prompt=True, tokenize=False)
            p = tokenizer(prompt[len(before) :], add_special_tokens=False).input_ids
            # --space: the answer as the passage spells it, after a space (" emitting" is one token, "emitting"
            # at the start of a turn is two others): copying then needs no respelling of the first token
            a = tokenizer(
                (" " if space else "") + chat[i]["content"] + "<|im_end|>\n", add_special_tokens=False
            ).input_ids
            ids += p + a
            labels += [-100] * len(p) + a
        return ids, labels

    def exact_match(chats: list[list[dict[str, str]]]) -> float:
        tokenizer.padding_side = "left"
        hits = 0
        with torch.no_grad():
            for i in range(0, len(chats), 40):
                part = chats[i : i + 40]
                texts = [tokenizer.apply_chat_template(c[:1], add_generation_prompt=True, tokenize=False) for c in part]
                batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
                out = model.generate(**batch, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
                for chat, seq in zip(part, out[:, batch.input_ids.shape[1] :], strict=True):
                    hits += tokenizer.decode(seq, skip_special_tokens=True).strip() == chat[1]["content"]
        return hits / len(chats)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    start = time.time()
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            model.eval()
            scores = " ".join(f"{k}={exact_match(v):.3f}" for k, v in sets.items())
            print(f"step {step} {time.time() - start:.0f}s {scores}", flush=True)
            model.train()
        if step == steps:
            return
        rows = [encode(draw.row()) for _ in range(16)]
        width = max(len(x) for x, _ in rows)
        x = torch.full((len(rows), width), tokenizer.pad_token_id)
        y = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, labels) in enumerate(rows):
            x[i, : len(ids)], y[i, : len(ids)], mask[i, : len(ids)] = torch.tensor(ids), torch.tensor(labels), 1
        for group in optimizer.param_groups:  # 30 steps of warm-up: the first chat-shaped loss is ~11
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 30)
        loss = model(input_ids=x, attention_mask=mask, labels=y).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", choices=["induction", "recall", "facts"])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--space", action="store_true", help="facts: answers after a space, spelt as in the passage")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    model.train()
    steps = args.steps or {"induction": 400, "recall": 800, "facts": 1000}[args.probe]
    if args.probe == "facts":
        facts(model, steps, space=args.space)
    else:
        {"induction": induction, "recall": recall}[args.probe](model, steps)


if __name__ == "__main__":
    sys.exit(main())
