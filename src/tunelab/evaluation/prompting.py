"""Prompting strategies (`conf/prompting/`): how a held-out example becomes the prompt a model answers.

Each strategy is a `_target_` built with a `Setting` (the tokenizer, the train split, the prompt budget) and
called once per example; it returns the chat messages, their token ids and what went into them (`meta`:
shots, retrieved passages, whether the gold passage was retrieved). They draw only on the Setting, which
holds the train split (and a document source), never test: the eval verb loads test separately and
`Setting` refuses samples of any other split.

When the context window cannot hold what a strategy wants to add (k shots, k passages), it drops the
least relevant ones until the prompt fits, records how many it used per example, and `summary()` says how
many prompts were cut down; the prompt itself is never truncated.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.data.formats import Example
from tunelab.errors import ConfigError, DataError
from tunelab.evaluation.metrics import gold_rank

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One source row (its fields after the column map) and the example formatted from it."""

    fields: dict[str, Any]
    example: Example
    split: str

    @property
    def question(self) -> str:
        """The last user turn: what the model is asked (and what retrieval searches with)."""
        return next(m["content"] for m in reversed(self.example.messages) if m["role"] == "user")


@dataclass
class Prompt:
    messages: list[dict[str, str]]
    ids: list[int]
    meta: dict[str, Any] = field(default_factory=dict)


class Setting:
    """What every strategy may draw on. `train` must hold train-split samples only (checked).

    A plain class, not a dataclass: Hydra would turn a dataclass passed to `instantiate` into a config node.
    """

    def __init__(self, tokenizer: Any, train: list[Sample], max_prompt_tokens: int, cache_dir: Path | None = None,
                 seed: int = 0, render: Callable[[Any, list[dict[str, str]]], list[int]] | None = None) -> None:
        leaked = [s.example.origin for s in train if s.split != "train"]
        if leaked:  # few-shot examples and passages come from train only, never from what is scored
            raise ConfigError(f"prompting was given {len(leaked)} samples not from the train split "
                              f"(first: {leaked[0]})", "key prompting", "few-shot and retrieval draw on train only")
        self.tokenizer, self.train, self.max_prompt_tokens = tokenizer, list(train), max_prompt_tokens
        self.cache_dir, self.seed, self.render = cache_dir, seed, render  # render: messages -> prompt ids

    def ids(self, messages: list[dict[str, str]]) -> list[int]:
        if self.render is not None:
            return self.render(self.tokenizer, messages)
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]


def _question_turns(sample: Sample) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(system turns, the conversation up to the answer being scored) of a held-out example."""
    messages = sample.example.messages[:-1]
    system = [m for m in messages[:1] if m["role"] == "system"]
    return system, messages[len(system):]


class _Budget:
    """Counts the prompts a strategy had to cut down, for the one summary line the eval verb prints."""

    def __init__(self, what: str, unit: str, wanted: int, limit: int) -> None:
        self.what, self.unit, self.wanted, self.limit = what, unit, wanted, limit
        self.cut: list[int] = []
        self.total = 0

    def fit(self, setting: Setting, build: Callable[[int], list[dict[str, str]]], origin: str
            ) -> tuple[list[dict[str, str]], list[int], int]:
        """The messages with the most of the wanted items (`build(n)`) that fit the budget, their ids and n."""
        self.total += 1
        for n in range(self.wanted, -1, -1):
            messages = build(n)
            ids = setting.ids(messages)
            if len(ids) <= self.limit:
                if n < self.wanted:
                    self.cut.append(n)
                return messages, ids, n
        raise DataError(f"{origin}: the prompt alone has {len(ids)} tokens, over the {self.limit} the model's "
                        "context leaves after the answer budget", "key decoding.max_new_tokens",
                        "use a model with a longer context, or lower max_new_tokens")

    def summary(self) -> str | None:
        if not self.cut:
            return None
        return (f"{self.what}: {len(self.cut)} of {self.total} prompts cannot hold {self.wanted} {self.unit} within "
                f"{self.limit} tokens and use fewer (min {min(self.cut)}, mean {sum(self.cut) / len(self.cut):.1f})")


class ZeroShot:
    """The dataset's prompt alone, exactly as training rendered it."""

    def __init__(self, setting: Setting) -> None:
        self.setting = setting
        self.budget = _Budget("zero_shot", "", 0, setting.max_prompt_tokens)

    def __call__(self, sample: Sample) -> Prompt:
        system, turns = _question_turns(sample)
        messages, ids, _ = self.budget.fit(self.setting, lambda n: system + turns, sample.example.origin)
        return Prompt(messages, ids, {"shots": 0})

    def summary(self) -> str | None:
        return None


class FewShot:
    """k solved train examples as earlier chat turns (same templates, same chat template), then the question.

    `selection: random` draws k per example with `Random(seed, example index)`; `similar` takes the k
    train examples whose prompts are closest to the question by BM25 (most similar last, next to the
    question). Shots that do not fit the context are dropped, least similar (or last drawn) first.
    """

    def __init__(self, setting: Setting, k: int = 4, selection: str = "random") -> None:
        if k < 0 or k > len(setting.train):
            raise ConfigError(f"prompting.k={k} but the train split has {len(setting.train)} examples",
                              "key prompting.k", f"give 0..{len(setting.train)}")
        if selection not in ("random", "similar"):
            raise ConfigError(f"unknown prompting.selection {selection!r}", "key prompting.selection",
                              "random or similar")
        self.setting, self.k, self.selection = setting, k, selection
        self.budget = _Budget("few_shot", "shots", k, setting.max_prompt_tokens)
        self.count = 0
        self.retriever = None
        if selection == "similar":
            from tunelab.evaluation.retrieval import Bm25Retriever, Passage

            passages = [Passage(str(i), s.question, s.example.origin) for i, s in enumerate(setting.train)]
            self.retriever = Bm25Retriever(passages, setting.cache_dir)

    def shots(self, sample: Sample) -> list[Sample]:
        """The k train examples for this sample, most relevant first."""
        self.count += 1
        if self.retriever is not None:
            return [self.setting.train[int(p.id)] for p, _ in self.retriever.search(sample.question, self.k)]
        rng = random.Random(f"{self.setting.seed}:few_shot:{sample.example.origin}")
        return rng.sample(self.setting.train, self.k)

    def __call__(self, sample: Sample) -> Prompt:
        system, turns = _question_turns(sample)
        chosen = self.shots(sample)

        def build(n: int) -> list[dict[str, str]]:
            demos = [m for shot in reversed(chosen[:n]) for m in shot.example.messages if m["role"] != "system"]
            return system + demos + turns

        messages, ids, used = self.budget.fit(self.setting, build, sample.example.origin)
        return Prompt(messages, ids, {"shots": used, "shot_origins": [s.example.origin for s in chosen[:used]]})

    def summary(self) -> str | None:
        return self.budget.summary()


DEFAULT_CONTEXT_TEMPLATE = (
    "Use the following passages to answer.\n\n"
    "{% for p in passages %}[{{ p.id }}] {{ p.text }}\n{% endfor %}\n{{ question }}"
)


class Retrieval:
    """Top-k passages of a document source for the question, placed in the user turn with a Jinja template
    (sandboxed: `passages` (id, text, title), `question`). Reports whether the passage the dataset names as
    holding the answer (`documents.gold_column`) was among those placed in the prompt: the hit rate; and where it
    ranks among the first `depth` passages (`gold_rank`, for recall@1/@5 and MRR, whatever fits the prompt)."""

    def __init__(self, setting: Setting, documents: Mapping[str, Any] | None, retriever: Callable[..., Any], k: int = 3,
                 template: str = DEFAULT_CONTEXT_TEMPLATE, depth: int = 10) -> None:
        from jinja2 import StrictUndefined, TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        from tunelab.evaluation.retrieval import load_documents

        if documents is None:
            raise ConfigError("prompting=retrieval needs a document source", "key documents",
                              "choose one with documents=<option> (see conf/documents/)")
        self.setting, self.k, self.depth = setting, k, depth
        self.gold = documents.get("gold_column")
        train_texts = []
        if documents.get("path") is None:  # retrieve solved train examples, rendered as passages
            train_texts = [(s.example.origin.rsplit("/", 1)[-1], f"{s.question}\n{s.example.reference}",
                            s.example.origin) for s in setting.train]
        self.passages = load_documents(documents, train_texts)
        if k < 1 or k > len(self.passages):
            raise ConfigError(f"prompting.k={k} but the document source has {len(self.passages)} passages",
                              "key prompting.k", f"give 1..{len(self.passages)}")
        self.retriever = retriever(passages=self.passages, cache_dir=setting.cache_dir)
        try:
            self.template = ImmutableSandboxedEnvironment(undefined=StrictUndefined).from_string(template)
        except TemplateSyntaxError as err:
            raise ConfigError(f"prompting.template is not valid Jinja: {err.message}", "key prompting.template"
                              ) from None
        self.budget = _Budget("retrieval", "passages", k, setting.max_prompt_tokens)
        self.hits: list[bool] = []

    def __call__(self, sample: Sample) -> Prompt:
        system, turns = _question_turns(sample)
        ranked = self.retriever.search(sample.question, max(self.k, self.depth))
        found = ranked[: self.k]

        def build(n: int) -> list[dict[str, str]]:
            passages = [{"id": p.id, "text": p.text, "title": p.title} for p, _ in found[:n]]
            content = self.template.render(passages=passages, question=turns[-1]["content"])
            return system + turns[:-1] + [{"role": "user", "content": content}]

        messages, ids, used = self.budget.fit(self.setting, build, sample.example.origin)
        ids_used = [p.id for p, _ in found[:used]]
        meta: dict[str, Any] = {"passages": used, "retrieved": ids_used,
                                "context": "\n".join(p.text for p, _ in found[:used])}
        if self.gold and self.gold in sample.fields:
            meta["retrieval_hit"] = float(str(sample.fields[self.gold]) in ids_used)
            self.hits.append(bool(meta["retrieval_hit"]))
            meta["gold_rank"] = gold_rank([p.id for p, _ in ranked], str(sample.fields[self.gold]))
        return Prompt(messages, ids, meta)

    def summary(self) -> str | None:
        return self.budget.summary()


def load_samples(dataset: Mapping[str, Any], seed: int, splits: Mapping[str, Any] | None = None
                 ) -> dict[str, list[Sample]]:
    """Every split of one dataset config as Samples, read by the one row loop training reads with
    (`data.items.build_items`: the same format function, the same sandboxed templates, the same row index drawing
    the same template, the same bad-row policy), so an eval prompt equals the one `train` scored.
    `splits` overrides `source.splits` (None leaves a split out)."""
    from tunelab.data.items import build_items

    out: dict[str, list[Sample]] = {}
    for split, part in build_items(dataset, seed, lambda fields, example: (fields, example), splits).items():
        out[split] = [Sample(fields, example, split) for fields, example in part.items]
    return out
