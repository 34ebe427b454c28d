"""A cache of tokenised tasks, keyed by everything that changes the tokens.

The key hashes the task config (source, format, templates, column map, policies), the content of
every local data file (never its name or mtime: axolotl#1265 reused a stale cache), the tokenizer's
vocabulary and chat template, the length limit and the seed. Entries are JSON (nothing is
unpickled) written to a temporary file and renamed into place, so parallel jobs sharing the cache
never see a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from tunelab.checkpoint.io import atomic_write
from tunelab.data.encode import Encoded
from tunelab.data.sources import SUFFIXES

log = logging.getLogger(__name__)
# Bump when the encoding logic changes what a cached entry holds (2: preference pairs' rejected_ids/labels).
FORMAT_VERSION = 2


def _file_digests(source: dict[str, Any]) -> dict[str, str]:
    path = Path(str(source.get("path", ""))).expanduser()
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES) if path.is_dir() else [path]
    digests = {}
    for file in files:
        if file.is_file():
            digest = hashlib.sha256()
            with file.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            digests[file.name] = digest.hexdigest()
    return digests


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the tokenizer's full definition and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    text = definition + str(tokenizer.chat_template) + str(tokenizer.eos_token) + str(tokenizer.pad_token)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_key(task: dict[str, Any], tokenizer: Any, max_seq_len: int, seed: int) -> str:
    payload = {
        "task": {k: v for k, v in task.items() if k != "metrics"},
        "files": _file_digests(task.get("source") or {}),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_seq_len": max_seq_len, "seed": seed, "version": FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def read_cache(cache_dir: Path, key: str) -> tuple[dict[str, list[Encoded]], dict[str, Any]] | None:
    file = cache_dir / f"{key}.json"
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, OSError) as err:  # a damaged entry is rebuilt, not trusted
        log.warning("ignoring unreadable cache entry %s: %s", file, err)
        return None
    splits = {split: [Encoded(**item) for item in items] for split, items in data["splits"].items()}
    log.info("tokenised data from cache %s", file)
    return splits, data["stats"]


def write_cache(cache_dir: Path, key: str, splits: dict[str, list[Encoded]], stats: dict[str, Any]) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    data = {"splits": {split: [vars(item) for item in items] for split, items in splits.items()}, "stats": stats}
    # Readers see the old entry or the whole new one; a lost entry is only rebuilt, so no fsync.
    atomic_write(cache_dir / f"{key}.json", json.dumps(data), durable=False)
