"""Fuzz the inputs a user controls: >= 100 bad configs and >= 60 bad datasets, generated from a fixed seed.

Every case must be refused with a tunelab error and the exit code of the README's table (2 config,
3 data), never a raw exception and never accepted. Cases run in-process (the CLI's `preflight` for
configs, the datamodule's `setup` for data); `test_cli_path_prints_no_traceback` runs one case of each
kind through the real console script to show the same refusal reaches the terminal as one message.

Config cases that set an existing key to a value are applied to a once-composed config exactly as Hydra
applies an override (its own parser gives the value) and then validated; composing 100 configs costs a
minute on 2 cores. `test_fast_path_equals_preflight` checks a sample of them through `preflight` itself.
"""

from __future__ import annotations

import copy
import json
import os
import random
import string
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from conftest import fmt
from procs import run_all
from tunelab.cli import preflight
from tunelab.config.compose import compose
from tunelab.config.validate import validate
from tunelab.errors import TunelabError

SEED = 8  # issue 8
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]
    verb: str = "train"
    base: tuple[str, ...] = ()  # group choices composed first (the fast path composes each base once)
    code: int = 2


def _typo(rng: random.Random, word: str) -> str:
    """A one-edit misspelling (drop, swap, double or replace a letter) that differs from `word`."""
    while True:
        i = rng.randrange(len(word))
        op = rng.choice("dswr")
        if op == "d":
            out = word[:i] + word[i + 1:]
        elif op == "s" and i < len(word) - 1:
            out = word[:i] + word[i + 1] + word[i] + word[i + 2:]
        elif op == "w":
            out = word[:i] + word[i] + word[i:]
        else:
            out = word[:i] + rng.choice(string.ascii_lowercase) + word[i + 1:]
        if out != word and out:
            return out


# key -> (group choices it needs, bad values as they are typed on the command line)
BAD_VALUES: dict[str, tuple[tuple[str, ...], list[str]]] = {
    "hyperparams.lr": ((), ["-1e-3", "0", "nan", "inf", "-inf", "'1e-3'"]),
    "hyperparams.batch_size": ((), ["0", "-4"]),
    "hyperparams.eval_batch_size": ((), ["0", "-1"]),
    "hyperparams.epochs": ((), ["0", "-2", "-1"]),  # -1 with max_steps=-1: forever
    "hyperparams.max_steps": ((), ["0", "-7"]),
    "hyperparams.weight_decay": ((), ["-0.1", "nan", "inf"]),
    "hyperparams.warmup_ratio": ((), ["-0.1", "1.5", "nan"]),
    "hyperparams.accumulate_grad_batches": ((), ["0", "-1"]),
    "hyperparams.gradient_clip_val": ((), ["-1.0", "0", "nan"]),
    "hyperparams.seed": ((), ["-1", str(2**32), str(2**40)]),
    "hyperparams.max_seq_len": ((), ["0", "4", "-1"]),
    "hyperparams.optimizer.betas": ((), ["[2.0,0.98]", "[0.9,-1.0]"]),
    "hyperparams.optimizer.lr": ((), ["-5.0"]),
    "hyperparams.scheduler.name": ((), ["nope", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay"]),
    "hyperparams.optimizer._target_": ((), ["adamw", "torch.nn.Linear", "torch.optimm.AdamW"]),
    "dataset.max_bad_fraction": ((), ["-0.1", "1.5", "nan"]),
    "dataset.source.val_size": ((), ["-0.2", "nan", "2.5"]),
    "dataset.chat_template": ((), ["nope", "'{{ 1 + }}'", "'hello {{ name }}'", "chatmll", "5"]),
    "dataset.samples_per_epoch": (("dataset=reviews_mix",), ["0", "-5"]),
    "dataset.weights.sentiment": (("dataset=reviews_mix",), ["-1", "nan"]),
    "eval.max_eval_samples": ((), ["0", "-1"]),
    "trainer.val_check_interval": ((), ["0", "-0.5", "1.5"]),
    "trainer.log_every_n_steps": ((), ["0"]),
    "trainer.devices": ((), ["0", "-2"]),
    "trainer.num_sanity_val_steps": ((), ["-2"]),
    "trainer.precision": ((), ["33", "fp32"]),
    "trainer.max_epochs": ((), ["-5"]),
    "method.peft.r": (("method=lora",), ["0", "-4"]),
    "method.peft.lora_dropout": (("method=lora",), ["1.0", "-0.1"]),
    "method.peft.lora_alpha": (("method=lora",), ["0"]),
    "method.peft.num_virtual_tokens": (("method=prompt_tuning",), ["0"]),
    "method.freeze.last_n_layers": (("method=freeze",), ["-1"]),
    "decoding.max_new_tokens": ((), ["0"]),
    "decoding.top_p": ((), ["0", "1.5"]),
    "decoding.temperature": ((), ["0", "-1"]),
    "decoding.top_k": ((), ["-1"]),
    "decoding.repetition_penalty": ((), ["0"]),
    "callbacks.best.save_top_k": ((), ["-2"]),
    "callbacks.checkpoint.every_n_steps": ((), ["0", "-5"]),
    "callbacks.checkpoint.every_minutes": ((), ["0", "-1.5", "nan"]),
    "callbacks.checkpoint.keep_last": ((), ["0"]),
    "+callbacks.throughput.window": ((), ["0"]),  # not in the YAML: added, then range-checked
    "model.dtype": ((), ["float33", "int8"]),
}
VERB_BAD_VALUES: dict[str, dict[str, list[str]]] = {
    "generate": {"decoding.temperature": ["0", "-1"], "decoding.top_p": ["2"], "decoding.top_k": ["-1"],
                 "decoding.max_new_tokens": ["0"], "decoding.repetition_penalty": ["0"], "seed": ["-1"],
                 "template": ["-1"]},
    "export": {"dtype": ["float33", "int4"]},
    "serve": {"port": ["-1", "70000"], "max_tokens": ["0"], "max_concurrent": ["0"], "max_waiting": ["-1"],
              "max_request_bytes": ["0"], "graceful_timeout_s": ["-5"]},
}
SCHEDULERS = ["linear", "cosine", "constant_with_warmup", "polynomial", "inverse_sqrt"]
HYPERPARAMS = ["lr", "batch_size", "epochs", "weight_decay", "warmup_ratio", "max_seq_len", "packing", "seed"]


def config_cases() -> list[Case]:
    """The bad configs: every listed bad value, plus seeded typos, syntax errors and random out-of-range numbers."""
    rng = random.Random(SEED)
    cases = [Case(f"{key}={v}", (f"{key}={v}",), base=base) for key, (base, values) in BAD_VALUES.items()
             for v in values]
    cases += [Case(f"{verb}:{key}={v}", (f"{key}={v}",), verb=verb) for verb, table in VERB_BAD_VALUES.items()
              for key, values in table.items() for v in values]
    for _ in range(4):  # negative or zero numbers where a positive one is needed, of random size
        key = rng.choice(["hyperparams.lr", "hyperparams.batch_size", "hyperparams.accumulate_grad_batches",
                          "hyperparams.eval_batch_size"])
        value = -rng.randrange(1, 10**6) if "lr" not in key else -rng.random() * 10 ** rng.randrange(-8, 3)
        cases.append(Case(f"random {key}={value}", (f"{key}={value}",)))
    for _ in range(6):  # scheduler names one edit away from a real one
        name = _typo(rng, rng.choice(SCHEDULERS))
        cases.append(Case(f"scheduler typo {name}", (f"hyperparams.scheduler.name={name}",)))
    for _ in range(4):  # optimizer classes one edit away
        name = _typo(rng, rng.choice(["AdamW", "SGD", "Adagrad", "RMSprop"]))
        cases.append(Case(f"optimizer typo {name}", (f"hyperparams.optimizer._target_=torch.optim.{name}",)))
    for _ in range(6):  # key typos: did-you-mean over the group's keys (composition refuses them)
        key = _typo(rng, rng.choice(HYPERPARAMS))
        cases.append(Case(f"key typo {key}", (f"hyperparams.{key}=1",)))
    for _ in range(3):
        group, option = rng.choice([("model", "tiny"), ("method", "lora"), ("dataset", "reviews_sentiment")])
        typo = _typo(rng, option)
        cases.append(Case(f"option typo {group}={typo}", (f"{group}={typo}",)))
    for _ in range(8):  # an unbalanced quote or bracket appended to a valid value
        key, value = rng.choice([("hyperparams.lr", "1e-3"), ("dataset.system_prompt", "hi"), ("tags", "[a]"),
                                 ("hyperparams.batch_size", "4")])
        cases.append(Case(f"syntax {key} {_}", (key + "=" + value + rng.choice(['"', "'", "[", "{", "("]),)))
    cases += [Case("syntax a=b\"", ('a=b"',)), Case("syntax bare =1", ("=1",)),
              Case("wrong type", ("hyperparams.batch_size=abc",)), Case("wrong enum", ("dataset.overlength=trunc",)),
              Case("format as a value", ("dataset.format=chatt",)), Case("unknown format", ("dataset/format=chatt",)),
              Case("wrong bool", ("hyperparams.packing=maybe",)),
              Case("weights all 0", ("dataset.weights.sentiment=0", "dataset.weights.rating=0"),
                   base=("dataset=reviews_mix",))]
    # Directories that cannot be written: `{file}` is a regular file the test creates.
    cases += [Case("output_dir under a file", ("paths.output_dir={file}/out",)),
              Case("cache_dir under a file", ("paths.cache_dir={file}/cache",)),
              Case("output_dir is a file", ("paths.output_dir={file}",)),
              Case("export out under a file", ("run=x", "out={file}/model"), verb="export")]
    unique = {(c.verb, c.base, c.argv): c for c in cases}  # a random typo can repeat a listed case
    assert len({c.name for c in unique.values()}) == len(unique), "case names must be unique"
    return list(unique.values())


CONFIG_CASES = config_cases()


def _run_case(case: Case, file: Path, fast: bool) -> tuple[str, str]:
    """('refused', message), ('accepted', '') or ('crashed', exception) for one config case."""
    argv = [a.replace("{file}", str(file)) for a in case.argv]
    try:
        if fast and _fast_path(case, argv):
            return _validate_fast(case, argv)
        preflight([*case.base, *argv], case.verb)
    except TunelabError as err:
        return "refused", f"{err.exit_code} {err.message()}"
    except Exception as err:  # what a user would see as a traceback
        return "crashed", f"{type(err).__name__}: {err}"
    return "accepted", ""


@cache
def _base(verb: str, base: tuple[str, ...]):
    return compose(list(base), verb)


def _parse(override: str):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(override)


def _fast_path(case: Case, argv: list[str]) -> bool:
    """A plain `key=value` on a value (not a group) the composed config has: apply it as Hydra does, no compose."""
    if len(argv) != 1 or argv[0].startswith(("+", "~")):
        return False
    try:
        key = _parse(argv[0]).get_key_element()
    except Exception:  # a syntax error: preflight's own path
        return False
    current = OmegaConf.select(_base(case.verb, case.base), key, default=KeyError)
    return "@" not in key and "/" not in key and current is not KeyError and not OmegaConf.is_config(current)


def _validate_fast(case: Case, argv: list[str]) -> tuple[str, str]:
    override = _parse(argv[0])
    cfg = copy.deepcopy(_base(case.verb, case.base))
    with open_dict(cfg):
        OmegaConf.update(cfg, override.get_key_element(), override.value(), merge=False)
        cfg.hydra.overrides.task = [*case.base, *argv]  # what `_where` reads to blame the command line
    try:
        validate(cfg)
    except TunelabError as err:
        return "refused", f"{err.exit_code} {err.message()}"
    except Exception as err:
        return "crashed", f"{type(err).__name__}: {err}"
    return "accepted", ""


@pytest.fixture(scope="module")
def a_file(tmp_path_factory) -> Path:
    file = tmp_path_factory.mktemp("fuzz") / "a_file"
    file.write_text("not a directory\n")
    return file


def test_bad_configs_are_refused_with_exit_2(a_file):
    assert len(CONFIG_CASES) >= 100
    assert len({(c.verb, c.base, c.argv) for c in CONFIG_CASES}) == len(CONFIG_CASES), "duplicate cases"
    results = {case.name: _run_case(case, a_file, fast=True) for case in CONFIG_CASES}
    crashed = {n: m for n, (kind, m) in results.items() if kind == "crashed"}
    accepted = [n for n, (kind, _) in results.items() if kind == "accepted"]
    wrong_code = {n: m for n, (kind, m) in results.items() if kind == "refused" and not m.startswith("2 ")}
    print(f"{len(CONFIG_CASES)} bad configs: {len(crashed)} crashed, {len(accepted)} accepted, "
          f"{len(wrong_code)} wrong exit code")
    assert not crashed and not accepted and not wrong_code, (crashed, accepted, wrong_code)
    for case in CONFIG_CASES:  # each message says where: the override that set the value, or the file
        message = results[case.name][1]
        assert message.startswith("2 tunelab: config error: ") and "\n  hint: " in message, message
        assert "command line" in message or ".yaml" in message or "key " in message, message
    valued = [(c, key.lstrip("+")) for c in CONFIG_CASES for key in [c.argv[0].split("=", 1)[0]]
              if (key in BAD_VALUES or key in VERB_BAD_VALUES.get(c.verb, {})) and not key.endswith("_target_")]
    for case, key in valued:  # refused for its value, not because the key went missing from conf/
        message = results[case.name][1]
        named = key in message or f"key {key.rsplit('.', 1)[0]} " in message  # the key, or the node built with it
        assert "unknown key" not in message and named, (case.name, message)


def test_fast_path_equals_preflight(a_file):
    """The in-place override gives the same refusal as composing the command line for real."""
    rng = random.Random(SEED)
    fast = [c for c in CONFIG_CASES if _fast_path(c, list(c.argv))]
    assert len(fast) >= 60
    for case in rng.sample(fast, 4):
        assert _run_case(case, a_file, fast=True) == _run_case(case, a_file, fast=False), case


# ---- bad datasets ------------------------------------------------------------------------------
GOOD = {"title": "Fine", "text": "It works.", "sentiment": "positive", "category": "kettle", "product": "K1",
        "rating": 5}
CHAT_GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@dataclass(frozen=True)
class DataCase:
    name: str
    files: dict[str, bytes | None]  # split file name -> bytes (None: a directory in its place)
    settings: tuple[tuple[str, object], ...] = ()  # dataset keys changed for this case
    expect: str = ""  # text the message must contain (besides the file's path)


def _jsonl(rows: list) -> bytes:
    return ("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n").encode()


def _splits(train: bytes | None, name: str = "train.jsonl", **settings) -> dict[str, bytes | None]:
    suffix = name.rsplit(".", 1)[1]
    good = {"jsonl": _jsonl([GOOD] * 2), "csv": _csv([GOOD] * 2), "json": json.dumps([GOOD] * 2).encode()}[suffix] \
        if suffix in ("jsonl", "csv", "json") else _jsonl([GOOD] * 2)
    other = suffix if suffix in ("jsonl", "csv", "json") else "jsonl"
    return {name: train, f"validation.{other}": good, f"test.{other}": good}


def _csv(rows: list[dict]) -> bytes:
    header = list(GOOD)
    lines = [",".join(header)] + [",".join(str(r.get(h, "")) for h in header) for r in rows]
    return ("\n".join(lines) + "\n").encode()


def _with_bad(rng: random.Random, bad: str, count: int = 6) -> tuple[bytes, int]:
    rows = [json.dumps(GOOD)] * count
    line = rng.randrange(count)
    rows[line] = bad
    return _jsonl(rows), line + 1


def _parquet(rows: list[dict]) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def data_cases() -> list[DataCase]:
    rng = random.Random(SEED)
    cases: list[DataCase] = []
    for i in range(3):  # a Latin-1 line in UTF-8 JSONL, at a random line
        data, line = _with_bad(rng, json.dumps({**GOOD, "text": "x"}).replace('"x"', '"caf\\u00e9"'))
        raw = data.split(b"\n")
        raw[line - 1] = raw[line - 1].replace(b"\\u00e9", bytes([rng.choice([0xE9, 0xFC, 0xF1])]))
        cases.append(DataCase(f"latin1 jsonl {i}", _splits(b"\n".join(raw)), expect=f"train.jsonl:{line}: not UTF-8"))
    for i in range(3):
        cases.append(DataCase(f"binary jsonl {i}", _splits(b"\xff\xfe" + rng.randbytes(300)), expect="train.jsonl:"))
    for i in range(2):
        rows = _csv([GOOD] * 4).split(b"\n")
        line = rng.randrange(1, 5)
        rows[line] = rows[line].replace(b"works", b"w\xf6rks")
        cases.append(DataCase(f"latin1 csv {i}", _splits(b"\n".join(rows), "train.csv"),
                              expect=f"train.csv:{line + 1}: not UTF-8"))
    for i in range(2):
        cases.append(DataCase(f"binary csv {i}", _splits(b"\x89PNG\r\n\x1a\n" + rng.randbytes(200), "train.csv"),
                              expect="train.csv:"))
    cases.append(DataCase("latin1 json", _splits(json.dumps([GOOD]).replace("Fine", "F\\u00efne").encode().replace(
        b"\\u00ef", b"\xef"), "train.json"), expect="train.json:1: not UTF-8"))
    cases.append(DataCase("binary json", _splits(rng.randbytes(64) + b"\xff", "train.json"), expect="train.json"))
    good_parquet = _parquet([GOOD] * 4)
    cases += [DataCase("random parquet", _splits(rng.randbytes(500), "train.parquet"), expect="not a readable Parquet"),
              DataCase("truncated parquet", _splits(good_parquet[: len(good_parquet) // 2], "train.parquet"),
                       expect="not a readable Parquet"),
              DataCase("parquet missing footer", _splits(good_parquet[:-8], "train.parquet"),
                       expect="not a readable Parquet"),
              DataCase("jsonl named parquet", _splits(_jsonl([GOOD] * 3), "train.parquet"),
                       expect="not a readable Parquet"),
              DataCase("empty parquet", _splits(b"", "train.parquet"), expect="not a readable Parquet")]
    for i in range(3):
        good = json.dumps(GOOD)
        data, line = _with_bad(rng, good[: rng.randrange(1, len(good) - 1)])
        cases.append(DataCase(f"truncated json line {i}", _splits(data), expect=f"train.jsonl:{line}: invalid JSON"))
    for value in ("[1, 2]", "3", '"text"', "null"):
        data, line = _with_bad(rng, value)
        cases.append(DataCase(f"non-object line {value}", _splits(data),
                              expect=f"train.jsonl:{line}: expected a JSON object"))
    for value in (None, 3, 2.5, True, ["positive"], {"label": "positive"}):
        data, line = _with_bad(rng, json.dumps({**GOOD, "sentiment": value}))
        cases.append(DataCase(f"completion {type(value).__name__}", _splits(data),
                              expect=f"train.jsonl:{line}: sentiment: the completion renders"))
    for value in ("", "   "):
        data, line = _with_bad(rng, json.dumps({**GOOD, "sentiment": value}))
        cases.append(DataCase(f"completion {value!r}", _splits(data), expect=f"train.jsonl:{line}: completion: empty"))
    for field in ("sentiment", "title"):
        data, line = _with_bad(rng, json.dumps({k: v for k, v in GOOD.items() if k != field}))
        cases.append(DataCase(f"missing {field}", _splits(data), expect=f"train.jsonl:{line}: "
                              f"{'completion' if field == 'sentiment' else 'prompt'} template: '{field}' is undefined"))
    rows = _csv([GOOD] * 4).split(b"\n")
    cases += [DataCase("csv extra value", _splits(b"\n".join([*rows[:2], rows[2] + b",extra", *rows[3:]]), "train.csv"),
                       expect="train.csv:3: 7 values but the header has 6 columns"),
              DataCase("csv missing values", _splits(b"\n".join([*rows[:2], b"a,b", *rows[3:]]), "train.csv"),
                       expect="train.csv:3: 2 values but the header has 6 columns"),
              DataCase("csv field over the size limit", _splits(b"\n".join([*rows[:2], rows[2].replace(
                  b"Fine", b"F" * 200_000), *rows[3:]]), "train.csv"), expect="train.csv:3: invalid CSV"),
              DataCase("json object top level", _splits(b'{"a": 1, "b": 2}', "train.json"),
                       expect="expected a list of objects"),
              DataCase("json number top level", _splits(b"42", "train.json"), expect="expected a list of objects"),
              DataCase("json items not objects", _splits(json.dumps([GOOD, 3]).encode(), "train.json"),
                       expect="train.json:item 2: expected a JSON object"),
              DataCase("train file is a directory", _splits(None), expect="no train.jsonl"),
              DataCase("empty train file", _splits(b""), expect="no supervised tokens"),
              DataCase("blank train file", _splits(b"\n\n  \n"), expect="no supervised tokens"),
              DataCase("no validation split", {"train.jsonl": _jsonl([GOOD] * 3)}, expect="has no validation split"),
              DataCase("deeply nested line", _splits(_jsonl([GOOD, "[" * 100_000 + "]" * 100_000])),
                       expect="train.jsonl:2: invalid JSON"),
              DataCase("5000-digit number", _splits(_jsonl([GOOD, '{"title": ' + "9" * 5000 + "}"])),
                       expect="train.jsonl:2: invalid JSON"),
              DataCase("overlength row", _splits(_jsonl([GOOD, {**GOOD, "text": "word " * 2000}])),
                       expect="train.jsonl:2: example has"),
              DataCase("truncation removes the answer", _splits(_jsonl([GOOD, {**GOOD, "text": "word " * 2000}])),
                       settings=(("overlength", "truncate"),), expect="removes every supervised token"),
              DataCase("too many bad rows skipped", _splits(_jsonl([GOOD, "{", "{", GOOD])),
                       settings=(("on_bad_row", "skip"),), expect="max_bad_fraction")]
    chat_bad = [("messages not a list", {"messages": "hi"}, "messages: expected a non-empty list"),
                ("messages empty", {"messages": []}, "messages: expected a non-empty list"),
                ("message not an object", {"messages": ["hi", CHAT_GOOD["messages"][1]]}, "messages[0]: expected"),
                ("unknown role", {"messages": [{"role": "robot", "content": "x"}, CHAT_GOOD["messages"][1]]},
                 "messages[0].role: unknown role"),
                ("content int", {"messages": [{"role": "user", "content": 5}, CHAT_GOOD["messages"][1]]},
                 "messages[0].content: expected a string"),
                ("content null", {"messages": [CHAT_GOOD["messages"][0], {"role": "assistant", "content": None}]},
                 "messages[1].content: expected a string"),
                ("last not assistant", {"messages": CHAT_GOOD["messages"][:1]}, "messages: the last message must be"),
                ("empty assistant", {"messages": [CHAT_GOOD["messages"][0], {"role": "assistant", "content": " "}]},
                 "messages[1].content: empty assistant message")]
    for name, row, expect in chat_bad:
        data = _jsonl([CHAT_GOOD, row, CHAT_GOOD])
        good = _jsonl([CHAT_GOOD])
        cases.append(DataCase(f"chat {name}", {"train.jsonl": data, "validation.jsonl": good, "test.jsonl": good},
                              settings=(("format", fmt("chat")), ("templates", [])),
                              expect=f"train.jsonl:2: {expect}"))
    for value in (None, 7, ["a"]):
        good = _jsonl([{"text": "some text"}])
        cases.append(DataCase(f"text {type(value).__name__}",
                              {"train.jsonl": _jsonl([{"text": "ok"}, {"text": value}]), "validation.jsonl": good,
                               "test.jsonl": good}, settings=(("format", fmt("text")), ("templates", [])),
                              expect="train.jsonl:2: text: expected a string"))
    instruction = {"instruction": "Say hi", "input": "", "output": "hi"}
    good = _jsonl([instruction])
    for name, row, expect in [("no output", {"instruction": "x"}, "output: missing"),
                              ("input int", {**instruction, "input": 3}, "input: expected a string"),
                              ("output list", {**instruction, "output": ["hi"]}, "output: expected a string")]:
        files = {"train.jsonl": _jsonl([instruction, row]), "validation.jsonl": good, "test.jsonl": good}
        cases.append(DataCase(f"instruction {name}", files,
                              settings=(("format", fmt("instruction")), ("templates", [])),
                              expect=f"train.jsonl:2: {expect}"))
    for i in range(4):  # random bytes spliced into one line of an otherwise good file
        rows = [json.dumps(GOOD).encode()] * 5
        line = rng.randrange(5)
        cut = rng.randrange(1, len(rows[line]) - 1)
        rows[line] = rows[line][:cut] + rng.randbytes(rng.randrange(1, 8)) + b"\xc3" + rows[line][cut:]
        cases.append(DataCase(f"spliced bytes {i}", _splits(b"\n".join(rows) + b"\n"),
                              expect=f"train.jsonl:{line + 1}:"))
    return cases


DATA_CASES = data_cases()


@pytest.fixture(scope="module")
def tokenizer():
    from tunelab import paths
    from tunelab.models.load import load_tokenizer

    return load_tokenizer(str(paths.assets_dir() / "tiny-llama"))


@pytest.fixture(scope="module")
def dataset_cfg() -> dict:
    cfg = compose(["dataset=reviews_sentiment"], "train", return_hydra_config=False)
    return OmegaConf.to_container(cfg.dataset, resolve=True)


def _write(folder: Path, files: dict[str, bytes | None]) -> None:
    folder.mkdir(parents=True)
    for name, data in files.items():
        if data is None:
            (folder / name).mkdir()
        else:
            (folder / name).write_bytes(data)


def _setup(case: DataCase, folder: Path, tokenizer, dataset_cfg: dict) -> tuple[str, str]:
    from tunelab.data.datamodule import TuneDataModule

    _write(folder, case.files)
    dataset = {**copy.deepcopy(dataset_cfg), **dict(case.settings)}
    dataset["source"] = {**dataset["source"], "path": str(folder)}
    try:
        TuneDataModule(dataset, tokenizer, batch_size=2, eval_batch_size=2, max_seq_len=256).setup("fit")
    except TunelabError as err:
        return "refused", f"{err.exit_code} {err.message()}"
    except Exception as err:
        return "crashed", f"{type(err).__name__}: {str(err)[:300]}"
    return "accepted", ""


def test_bad_datasets_are_refused_with_exit_3(tmp_path, tokenizer, dataset_cfg):
    assert len(DATA_CASES) >= 60
    assert len({c.name for c in DATA_CASES}) == len(DATA_CASES)
    results = {c.name: _setup(c, tmp_path / f"case{i}", tokenizer, dataset_cfg) for i, c in enumerate(DATA_CASES)}
    crashed = {n: m for n, (kind, m) in results.items() if kind == "crashed"}
    accepted = [n for n, (kind, _) in results.items() if kind == "accepted"]
    print(f"{len(DATA_CASES)} bad datasets: {len(crashed)} crashed, {len(accepted)} accepted")
    assert not crashed and not accepted, (crashed, accepted)
    for i, case in enumerate(DATA_CASES):
        message = results[case.name][1]
        assert message.startswith("3 tunelab: data error: "), (case.name, message)
        assert str(tmp_path / f"case{i}") in message, (case.name, message)  # names the file (or folder)
        assert case.expect in message, (case.name, case.expect, message)


# ---- the real command line, one case per path a failure takes ---------------------------------------
@pytest.mark.slow  # three console-script processes
def test_cli_path_prints_no_traceback(tmp_path):
    """Each path a refusal takes reaches the terminal as one `tunelab:` message with its exit code: the
    pre-flight check (a range), the override parser (a syntax error) and a job's data loading (undecodable
    bytes). The other cases above raise the same errors on the same paths; tests/test_errors.py has more."""
    case = next(c for c in DATA_CASES if c.name == "latin1 jsonl 0")
    _write(tmp_path / "data", case.files)
    runs = {  # name -> (argv, exit code, text)
        "range": (["hyperparams.lr=-1"], 2, "tunelab: config error: hyperparams.lr must be a finite number > 0"),
        "syntax": (['a=b"'], 2, "tunelab: config error: cannot parse override"),
        "data": ([f"dataset.source.path={tmp_path / 'data'}", "logger=none", "eval.baseline=false"], 3,
                 f"tunelab: data error: {tmp_path / 'data' / case.expect}"),
    }
    done = run_all({name: ([sys.executable, "-m", "tunelab.cli", "train", *argv, f"paths.output_dir={tmp_path / name}"],
                           {"cwd": tmp_path, "env": ENV}) for name, (argv, _, _) in runs.items()}, seconds=120)
    for name, out in done.items():
        _, code, text = runs[name]
        assert out.returncode == code, (name, out.stderr[-2000:])
        assert "Traceback" not in out.stdout + out.stderr, (name, out.stderr[-2000:])
        assert text in out.stderr, (name, out.stderr[-2000:])


def test_diverged_run_exits_5(tmp_path):
    """lr=1e9 for one step: the train loss of that step is finite (computed before the update), the weights
    after it are not; the run used to end with exit 0 and NaN val/test loss in metrics.json."""
    from conftest import make_cfg
    from tunelab.errors import NumericsError
    from tunelab.verbs.train import train

    cfg = make_cfg(tmp_path, ["hyperparams.lr=1e9", "hyperparams.warmup_ratio=0", "hyperparams.max_steps=1",
                              "eval.baseline=false", "eval.generate_on_val=false", "eval.max_eval_samples=4",
                              "logger=none", "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1"])
    with pytest.raises(NumericsError, match=r"non-finite .*val/loss") as err:
        train(cfg)
    assert err.value.exit_code == 5
    assert not (tmp_path / "metrics.json").exists()
