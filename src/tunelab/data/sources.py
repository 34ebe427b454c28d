"""Read a dataset's rows, each with its origin (`file:line`), from local files or the Hugging Face hub.

Local JSONL is read line by line here (not through Arrow) so a malformed row is reported with its
real line number (datasets#6315 reports block-relative rows).
"""

from __future__ import annotations

import csv
import io
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
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a data file", hint="check dataset.source.path and splits")
    if not path.is_file():
        raise DataError(f"data file not found: {path}", hint="check dataset.source.path")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            return _read_json(path)
        if suffix == ".csv":
            return _read_csv(path)
        if suffix == ".parquet":
            return _read_parquet(path)
    except OSError as err:  # permissions, a file that vanished, an I/O error
        raise DataError(f"cannot read {path}: {err.strerror or err}", hint="check the file's permissions") from None
    raise DataError(f"unsupported data file type {suffix!r}: {path}", hint=f"use one of {', '.join(SUFFIXES)}")


def _not_utf8(data: bytes, err: UnicodeDecodeError, base: int = 0) -> str:
    """`line:N: not UTF-8 text (...)` for a decode error at `err.start` of `data` (a file, or one line of it)."""
    line = data.count(b"\n", 0, err.start) + 1
    column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
    return (f"{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at byte offset {base + err.start}, "
            f"column {column})")


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}:{_not_utf8(data, err)}",
                        hint="save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    offset = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            origin = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                where = _not_utf8(raw, err, offset).split(": ", 1)[1]
                rows.append(Row({}, origin, f"{origin}: {where}"))
                offset += len(raw)
                continue
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                rows.append(Row({}, origin, f"{origin}: invalid JSON: {err.msg} (column {err.colno})"))
                continue
            except (ValueError, RecursionError) as err:  # a 5000-digit number, nesting deeper than Python's stack
                rows.append(Row({}, origin, f"{origin}: invalid JSON: {str(err).splitlines()[0][:80] or 'too deep'}"))
                continue
            if not isinstance(record, dict):
                rows.append(Row({}, origin, f"{origin}: expected a JSON object, got {type(record).__name__}"))
                continue
            rows.append(Row(record, origin))
    return rows


def _read_json(path: Path) -> list[Row]:
    try:
        data = json.loads(_decode(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
    except (ValueError, RecursionError) as err:
        raise DataError(f"{path}: invalid JSON: {str(err).splitlines()[0][:80] or 'nested too deep'}") from None
    if isinstance(data, Mapping) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} wrappers
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects at the top level")
    return [Row(rec, f"{path}:item {i + 1}") if isinstance(rec, dict) else
            Row({}, f"{path}:item {i + 1}", f"{path}:item {i + 1}: expected a JSON object, got {type(rec).__name__}")
            for i, rec in enumerate(data)]


def _read_csv(path: Path) -> list[Row]:
    reader = csv.DictReader(io.StringIO(_decode(path), newline=""))
    rows = []
    try:
        for rec in reader:
            origin = f"{path}:{reader.line_num}"
            if None in rec or None in rec.values():  # more, or fewer, values than the header has columns
                count = sum(v is not None for k, v in rec.items() if k is not None) + len(rec.get(None) or [])
                rows.append(Row({}, origin, f"{origin}: {count} values but the header has "
                                f"{len(reader.fieldnames or [])} columns"))
                continue
            rows.append(Row(dict(rec), origin))
    except csv.Error as err:  # a NUL byte, a field over csv's size limit, a broken quote at the end
        # the reader counts a line once it parsed it: the failing line is the next one
        raise DataError(f"{path}:{reader.line_num + 1}: invalid CSV: {err}") from None
    return rows


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow's ArrowInvalid/ArrowIOError/OSError for a damaged or foreign file
        raise DataError(f"{path}: not a readable Parquet file: {str(err).splitlines()[0][:200]}",
                        hint="rewrite it with pyarrow or pandas (to_parquet), or convert it to JSONL") from None
    return [Row(rec, f"{path}:row {i + 1}") for i, rec in enumerate(records)]


def _split_file(folder: Path, split: str) -> Path | None:
    for suffix in SUFFIXES:
        candidate = folder / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def load_hub(path: str, subset: str | None, split: str) -> list[Row]:
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
    is set (a fraction < 1 or a count); `train_size` then keeps a seeded subset of what train is left
    (a fraction < 1 or a count, in file order), for learning curves over the amount of training data.
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
            splits[split] = load_hub(path_text, source.get("subset"), name)
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
    return _subset_train(splits, source.get("train_size"), rng)


def _subset_train(splits: dict[str, list[Row]], size: float | None, rng: random.Random) -> dict[str, list[Row]]:
    if not size or "train" not in splits:
        return splits
    train = splits["train"]
    count = int(round(size * len(train))) if size < 1 else int(size)
    if not 0 < count <= len(train):
        raise ConfigError(f"train_size={size} asks for {count} of {len(train)} training rows",
                          "key dataset.source.train_size", f"use a fraction in (0, 1) or a count up to {len(train)}")
    keep = set(rng.sample(range(len(train)), count))
    splits["train"] = [row for i, row in enumerate(train) if i in keep]
    return splits
