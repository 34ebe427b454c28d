"""Read a dataset's rows, each with its origin (`file:line`), from local files or the Hugging Face hub.

Local JSONL is read line by line here (not through Arrow) so a malformed row is reported with its
real line number (datasets#6315 reports block-relative rows).
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError, DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Row:
    """One source record and where it came from, for error messages."""

    fields: dict[str, Any]
    origin: str
    error: str | None = None  # a row that could not be parsed; raised (or skipped) when it is formatted


def read_file(path: Path) -> list[Row]:
    """Every record of one local file, with `path:line` (or `path:row N`) origins."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}", hint="check dataset.source.path")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            return [Row(dict(rec), f"{path}:{reader.line_num}") for rec in reader]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        records = pq.read_table(path).to_pylist()
        return [Row(rec, f"{path}:row {i + 1}") for i, rec in enumerate(records)]
    raise DataError(f"unsupported data file type {suffix!r}: {path}", hint=f"use one of {', '.join(SUFFIXES)}")


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            origin = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                rows.append(Row({}, origin, f"{origin}: invalid JSON: {err.msg} (column {err.colno})"))
                continue
            if not isinstance(record, dict):
                rows.append(Row({}, origin, f"{origin}: expected a JSON object, got {type(record).__name__}"))
                continue
            rows.append(Row(record, origin))
    return rows


def _read_json(path: Path) -> list[Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
    if isinstance(data, Mapping) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} wrappers
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects at the top level")
    return [Row(rec, f"{path}:item {i + 1}") for i, rec in enumerate(data)]


def _split_file(folder: Path, split: str) -> Path | None:
    for suffix in SUFFIXES:
        candidate = folder / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _load_hub(path: str, subset: str | None, split: str) -> list[Row]:
    import datasets

    try:
        table = datasets.load_dataset(path, subset, split=split)
    except Exception as err:  # hub errors come in many types; all mean "could not load this id"
        raise DataError(
            f"could not load dataset {path!r} split {split!r}: {err}",
            "key dataset.source.path",
            "for a local file give an existing path; for the hub check the id and your network",
        ) from None
    return [Row(dict(rec), f"{path}[{split}]:row {i + 1}") for i, rec in enumerate(table)]


def load_splits(source: Mapping[str, Any], seed: int) -> dict[str, list[Row]]:
    """Rows for the `train`, `validation` and `test` splits of a `dataset.source` node.

    A split the source lacks is carved from train with a seeded shuffle when `val_size`/`test_size`
    is set (a fraction < 1 or a count).
    """
    if not source.get("path"):
        raise DataError("the dataset names no source", "key dataset.source.path",
                        "give a folder of <split>.jsonl|json|csv|parquet, one file, or a hub id")
    path_text = str(source["path"])
    path = Path(path_text).expanduser()
    names: Mapping[str, str | None] = source.get("splits") or {}
    wanted = {"train": names.get("train", "train"), "validation": names.get("validation"), "test": names.get("test")}
    splits: dict[str, list[Row]] = {}
    for split, name in wanted.items():
        if name is None:
            continue
        if path.is_dir():
            file = _split_file(path, name)
            if file is None:
                if split == "train":
                    raise DataError(
                        f"no {name}.jsonl/.json/.csv/.parquet in {path}", "key dataset.source.splits.train"
                    )
                continue
            splits[split] = read_file(file)
        elif path.suffix.lower() in SUFFIXES:
            if split == "train":
                splits["train"] = read_file(path)
        elif path_text.startswith((".", "/", "~")):
            raise DataError(f"data path not found: {path}", "key dataset.source.path")
        else:
            splits[split] = _load_hub(path_text, source.get("subset"), name)
    rng = random.Random(seed)
    total = len(splits.get("train", []))  # fractions are of the whole source, whichever split is carved first
    for split, size_key in (("test", "test_size"), ("validation", "val_size")):
        size = source.get(size_key)
        if split in splits or not size:
            continue
        train = splits["train"]
        count = int(round(size * total)) if size < 1 else int(size)
        if not 0 < count < len(train):
            raise ConfigError(
                f"{size_key}={size} leaves {len(train) - count} of {len(train)} rows for training",
                f"key dataset.source.{size_key}", "use a fraction in (0, 1) or a smaller count",
            )
        order = list(range(len(train)))
        rng.shuffle(order)
        held = set(order[:count])
        splits[split] = [train[i] for i in sorted(held)]
        splits["train"] = [row for i, row in enumerate(train) if i not in held]
    return splits
