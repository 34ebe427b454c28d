"""Data contract: bad-row policy, tokenised-data cache, weighted mixtures with per-task metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import fmt
from procs import budget
from tunelab.data.datamodule import TuneDataModule, encode_task
from tunelab.errors import DataError
from tunelab.models.load import load_tokenizer
from tunelab.paths import assets_dir

TEMPLATE = [{"prompt": "Q: {{ q }}", "completion": "{{ a }}"}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(assets_dir() / "tiny-llama"))


def _write(folder: Path, rows: dict[str, list[str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, lines in rows.items():
        (folder / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines))
    return folder


def _good(n: int, answer: str = "yes") -> list[str]:
    return [json.dumps({"q": f"question {i}", "a": answer}) for i in range(n)]


def _task(folder: Path, **extra) -> dict:
    return {"name": "qa", "source": {"path": str(folder), "splits": {"train": "train", "validation": "validation",
                                                                    "test": "test"}},
            "format": fmt("prompt_completion"), "templates": TEMPLATE, **extra}


def test_bad_row_is_an_error_with_file_and_line(tmp_path, tokenizer):
    rows = _good(5)
    rows[3] = json.dumps({"q": "no answer here"})
    folder = _write(tmp_path / "d", {"train": rows, "validation": _good(2), "test": _good(2)})
    with pytest.raises(DataError) as err:
        encode_task(_task(folder), tokenizer, 64, 0)
    assert f"{folder / 'train.jsonl'}:4: completion template: 'a' is undefined" in str(err.value)
    assert err.value.exit_code == 3


def test_skip_policy_counts_and_names_lines_and_aborts_past_the_bound(tmp_path, tokenizer):
    rows = _good(40)
    rows[9] = "{not json"
    rows[19] = json.dumps({"q": "empty", "a": "  "})
    folder = _write(tmp_path / "d", {"train": rows, "validation": _good(2), "test": _good(2)})
    splits, stats = encode_task(_task(folder, on_bad_row="skip", max_bad_fraction=0.1), tokenizer, 64, 0)
    assert len(splits["train"]) == 38
    assert stats["train"]["bad_rows"] == 2
    assert stats["train"]["bad_lines"] == [f"{folder / 'train.jsonl'}:10", f"{folder / 'train.jsonl'}:20"]
    with pytest.raises(DataError, match=r"2 of 40 rows are bad \(5.0% > max_bad_fraction=0.01\)"):
        encode_task(_task(folder, on_bad_row="skip", max_bad_fraction=0.01), tokenizer, 64, 0)


def test_cache_hit_and_invalidation_on_content_change(tmp_path, tokenizer):
    folder = _write(tmp_path / "d", {"train": _good(8), "validation": _good(2), "test": _good(2)})
    cache = tmp_path / "cache"

    def load() -> TuneDataModule:
        dm = TuneDataModule(_task(folder), tokenizer, max_seq_len=64, cache_dir=str(cache))
        dm.setup()
        return dm

    first = load()
    entries = sorted(cache.glob("*.json"))
    assert len(entries) == 1
    assert [e.input_ids for e in load().splits["qa"]["train"]] == [e.input_ids for e in first.splits["qa"]["train"]]
    assert sorted(cache.glob("*.json")) == entries  # a hit writes nothing new
    # Same file name, same size, new content: the content hash changes the key; the stale entry is not used.
    (folder / "train.jsonl").write_text("".join(line + "\n" for line in _good(8, answer="no!")))
    changed = load()
    assert len(list(cache.glob("*.json"))) == 2
    assert changed.splits["qa"]["train"][0].reference == "no!"
    # A damaged entry is rebuilt rather than trusted.
    for entry in cache.glob("*.json"):
        entry.write_text("{broken")
    assert load().splits["qa"]["train"][0].reference == "no!"
    assert not list(cache.glob(".*.tmp-*"))


def test_mixture_sampling_follows_the_weights(tmp_path, tokenizer):
    a = _write(tmp_path / "a", {"train": _good(50), "validation": _good(2), "test": _good(2)})
    b = _write(tmp_path / "b", {"train": _good(200, "no"), "validation": _good(2), "test": _good(2)})
    mixture = {"name": "mix", "tasks": {"a": _task(a), "b": _task(b)}, "weights": {"a": 0.7, "b": 0.3},
               "samples_per_epoch": 4000}
    dm = TuneDataModule(mixture, tokenizer, batch_size=50, max_seq_len=64)
    dm.setup()
    # Count by supervised answer: task a answers "yes", task b answers "no".
    yes = tokenizer("yes", add_special_tokens=False)["input_ids"]
    drawn = Counter()
    for batch in dm.train_dataloader():
        for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
            answer = ids[labels != -100].tolist()[: len(yes)]
            drawn["a" if answer == yes else "b"] += 1
    assert sum(drawn.values()) == 4000
    # Binomial(4000, 0.7): sd ≈ 29, so ±0.03 of the proportion is more than 4 sd.
    assert abs(drawn["a"] / 4000 - 0.7) < 0.03
    assert [len(loader.dataset) for loader in dm.val_dataloader()] == [2, 2]


def test_mixture_weights_must_name_tasks(tmp_path, tokenizer):
    a = _write(tmp_path / "a", {"train": _good(5), "validation": _good(2), "test": _good(2)})
    dm = TuneDataModule({"name": "mix", "tasks": {"a": _task(a)}, "weights": {"aa": 1.0}}, tokenizer, max_seq_len=64)
    with pytest.raises(DataError, match="did you mean 'a'"):
        dm.setup()


def test_mixture_run_reports_per_task_metrics(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "tunelab.cli", "train", "dataset=reviews_mix", "hyperparams.max_steps=3",
         "eval.max_eval_samples=8", "eval.baseline=false", "logger=none", f"paths.output_dir={tmp_path}"],
        capture_output=True, text=True, timeout=budget(600),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads(next(tmp_path.glob("runs/*/metrics.json")).read_text())
    for prefix in ("val", "test"):
        for key in ("loss", "accuracy", "sentiment/loss", "sentiment/accuracy", "rating/loss", "rating/accuracy"):
            assert f"{prefix}/{key}" in metrics, f"{prefix}/{key} missing from {sorted(metrics)}"
    # The overall loss is the token mean over both tasks, so it lies between the per-task losses.
    low, high = sorted([metrics["val/sentiment/loss"], metrics["val/rating/loss"]])
    assert low <= metrics["val/loss"] <= high


def test_instruction_and_chat_formats_from_files(tmp_path, tokenizer):
    alpaca = [json.dumps({"instruction": "Translate to French", "input": "cat", "output": "chat"}),
              json.dumps({"instruction": "Say hi", "output": "hi"})]
    folder = _write(tmp_path / "alpaca", {"train": alpaca, "validation": alpaca, "test": alpaca})
    task = {"name": "a", "source": {"path": str(folder)}, "format": fmt("instruction")}
    splits, _ = encode_task(task, tokenizer, 128, 0)
    first = tokenizer.decode(splits["train"][0].input_ids)
    assert first == ("<|im_start|>user\nTranslate to French\n\ncat<|im_end|>\n"
                     "<|im_start|>assistant\nchat<|im_end|>\n")
    prompt = tokenizer.decode(splits["train"][1].prompt_ids)
    assert prompt == "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"

    chats = [json.dumps({"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]})]
    folder = _write(tmp_path / "chat", {"train": chats, "validation": chats, "test": chats})
    splits, _ = encode_task({"name": "c", "source": {"path": str(folder)}, "format": fmt("chat")}, tokenizer, 128, 0)
    item = splits["train"][0]
    supervised = [t for t, label in zip(item.input_ids, item.labels, strict=True) if label != -100]
    assert tokenizer.decode(supervised) == "4<|im_end|>"

    bad = [json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]})]
    folder = _write(tmp_path / "bad", {"train": bad, "validation": bad, "test": bad})
    with pytest.raises(DataError, match=r"train.jsonl:1: messages\[0\].role: unknown role 'robot'"):
        encode_task({"name": "b", "source": {"path": str(folder)}, "format": fmt("chat")}, tokenizer, 128, 0)


def test_seeded_val_and_test_split_from_one_file(tmp_path, tokenizer):
    file = tmp_path / "all.jsonl"
    file.write_text("".join(line + "\n" for line in _good(100)))
    task = {"name": "one", "source": {"path": str(file), "val_size": 0.1, "test_size": 20}, "templates": TEMPLATE}
    splits, _ = encode_task(task, tokenizer, 64, 0)
    assert {k: len(v) for k, v in splits.items()} == {"train": 70, "test": 20, "validation": 10}
    origins = [e.origin for v in splits.values() for e in v]
    assert len(set(origins)) == 100  # disjoint and complete
    again, _ = encode_task(task, tokenizer, 64, 0)
    assert [e.origin for e in again["test"]] == [e.origin for e in splits["test"]]  # seeded


HAMMER = """
import sys
from pathlib import Path
from tunelab.data.cache import read_cache, write_cache
from tunelab.data.encode import Encoded
ok = 0
for i in range(40):
    items = [Encoded([1, 2, 3] * (50 + i), [1, 2, 3] * (50 + i), None, None, "x")] * 20
    write_cache(Path(sys.argv[1]), "samekey", {"train": items}, {"round": i})
    got = read_cache(Path(sys.argv[1]), "samekey")
    ok += got is not None and len(got[0]["train"]) == 20
print(ok)
"""


@pytest.mark.slow  # three processes racing on one cache
def test_parallel_writers_never_leave_a_torn_entry(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", HAMMER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [int(p.communicate(timeout=budget(120))[0].strip()) for p in procs]
    assert results == [40, 40, 40]  # every read, racing with the other writers, saw a whole entry
    assert [p.name for p in tmp_path.iterdir()] == ["samekey.json"]


def test_csv_json_and_parquet_sources_with_a_column_map(tmp_path, tokenizer):
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(6)]
    (tmp_path / "csv").mkdir()
    with (tmp_path / "csv/train.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["question", "answer"])
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "json").mkdir()
    (tmp_path / "json/train.json").write_text(json.dumps(rows))
    (tmp_path / "parquet").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "parquet/train.parquet")
    for kind, origin in (("csv", "train.csv:3"), ("json", "train.json:item 2"), ("parquet", "train.parquet:row 2")):
        task = {"name": kind, "source": {"path": str(tmp_path / kind), "val_size": 2, "test_size": 1},
                "format": fmt("prompt_completion"), "column_map": {"question": "prompt", "answer": "completion"}}
        splits, _ = encode_task(task, tokenizer, 64, 0)
        assert {k: len(v) for k, v in splits.items()} == {"train": 3, "test": 1, "validation": 2}, kind
        everything = {e.origin.rsplit("/", 1)[-1]: e for v in splits.values() for e in v}
        assert everything[origin].reference == "a1", kind  # the second row, wherever it landed


def test_data_preview_marks_supervised_tokens_and_prints_percentiles(tmp_path):
    # At 80 columns, a terminal's default: the length table's headers and split names stay whole (rich cut them).
    out = subprocess.run(
        [str(Path(sys.executable).with_name("tunelab")), "data", "preview", "preview.samples=2"],
        capture_output=True, text=True, timeout=budget(300), cwd=tmp_path, env={**os.environ, "COLUMNS": "80"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    # Without a terminal the supervised span is bracketed: the answer and its EOS, nothing of the prompt.
    assert out.stdout.count("[[positive<|im_end|>]]") + out.stdout.count("[[negative<|im_end|>]]") == 2
    assert any(t in out.stdout for t in ("Is the following review", "Classify the sentiment", "Review of the"))
    table = out.stdout[out.stdout.index("token lengths"):]
    assert max(len(line) for line in table.splitlines()) <= 80
    for column in ("split", "examples", "supervised", "p50", "p90", "p95", "p99", "max", "pad % padded",
                   "pad % packed", "pad % dataset", "train", "validation", "test"):
        assert column in table, column
    assert not list(tmp_path.iterdir())  # a preview writes nothing
