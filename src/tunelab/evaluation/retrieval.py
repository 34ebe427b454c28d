"""Document sources and retrievers for `prompting=retrieval` (RAG): passages in, top-k passages per query out.

The retriever is the `retriever` group: `bm25` (here, the default), `dense` (evaluation/dense.py: sentence
embeddings) and `hybrid` (here: reciprocal-rank fusion of the two). Each is a partial called with `passages=` and
`cache_dir=`, and answers `search(query, k)` with (passage, score) pairs, best first.

A document source is dataset-like: a local file (`.jsonl/.json/.csv/.parquet`, read by the same reader as
datasets, so a bad row is reported as `file:line`) or a hub id, with the columns holding each passage's id,
text and optional title; or, with `path: null`, the dataset's own train split, each row rendered by a
template (retrieval of similar training examples). Never the test split.

The BM25 index (`bm25s`: numpy/scipy sparse scores, saved as .npy + JSON, loaded with allow_pickle=False)
is cached under `<cache_dir>/retrieval/<key>/`, keyed by the passages' content, the retriever's settings
and the bm25s version, like tokenised data (data/cache.py): changed documents build a new index, unchanged
ones load the saved one. Writes go to a temporary directory renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.checkpoint.io import atomic_directory
from tunelab.errors import ConfigError, DataError, did_you_mean

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Passage:
    """One retrievable passage: its id (what a dataset's gold column names), text and origin."""

    id: str
    text: str
    origin: str
    title: str | None = None


def load_documents(source: Mapping[str, Any], train_texts: Sequence[tuple[str, str, str]] = ()) -> list[Passage]:
    """The passages of a `documents` node; with `path: null`, `train_texts` ((id, text, origin) of the train
    split's rendered examples) are the passages."""
    if source.get("path") is None:
        if not train_texts:
            raise ConfigError("documents.path is null and there is no train split to retrieve from",
                              "key documents.path", "give a document file, e.g. documents=knowledge")
        return [Passage(pid, text, origin) for pid, text, origin in train_texts]
    from tunelab.data.sources import SUFFIXES, load_hub, read_file

    path_text = str(source["path"])
    path = Path(path_text).expanduser()
    if path.suffix.lower() in SUFFIXES or path_text.startswith((".", "/", "~")):
        if not path.is_file():
            raise DataError(f"document file not found: {path}", "key documents.path",
                            "give a .jsonl/.json/.csv/.parquet file of passages")
        rows = read_file(path)
    else:
        rows = load_hub(path_text, source.get("subset"), source.get("split") or "train")
    text_col, id_col, title_col = source.get("text_column", "text"), source.get("id_column"), source.get("title_column")
    passages = []
    for number, row in enumerate(rows):
        if row.error:
            raise DataError(row.error, "key documents.path")
        for key, column in (("text_column", text_col), ("id_column", id_col), ("title_column", title_col)):
            if column is not None and column not in row.fields:
                raise DataError(f"{row.origin}: the document source has no column {column!r}",
                                f"key documents.{key}", did_you_mean(str(column), row.fields))
        text = row.fields[text_col]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{row.origin}: {text_col}: expected a non-empty string", f"key documents.{text_col}")
        pid = str(row.fields[id_col]) if id_col else str(number)
        title = str(row.fields[title_col]) if title_col else None
        passages.append(Passage(pid, text, row.origin, title))
    if not passages:
        raise DataError(f"the document source {path_text} holds no passages", "key documents.path")
    return passages


class Bm25Retriever:
    """BM25 over the passages with `bm25s` (Lucene's scoring by default), the index cached by content hash."""

    def __init__(self, passages: Sequence[Passage], cache_dir: str | Path | None = None, method: str = "lucene",
                 k1: float = 1.5, b: float = 0.75, stopwords: str | None = "en", with_titles: bool = True) -> None:
        import bm25s

        self.passages = list(passages)
        self.stopwords = stopwords
        self.texts = [passage_text(p, with_titles) for p in self.passages]
        settings = {"method": method, "k1": k1, "b": b, "stopwords": stopwords, "version": bm25s.__version__}
        self.key = index_key(self.texts, [p.id for p in self.passages], settings)
        self.cache_hit = False
        folder = Path(cache_dir) / "retrieval" / self.key if cache_dir else None
        if folder is not None and (folder / "params.index.json").is_file():
            try:
                self.index = bm25s.BM25.load(str(folder), load_corpus=False, allow_pickle=False)
                self.cache_hit = True
                log.info("BM25 index from cache %s", folder)
                return
            except Exception as err:  # noqa: BLE001 - any failure to read a cache entry means: build it again
                log.warning("rebuilding the damaged BM25 index %s (%s: %s)", folder, type(err).__name__, err)
                shutil.rmtree(folder, ignore_errors=True)
        self.index = bm25s.BM25(method=method, k1=k1, b=b)
        self.index.index(bm25s.tokenize(self.texts, stopwords=stopwords, show_progress=False), show_progress=False)
        if folder is not None:  # readers see no index or a whole one; a parallel job may have renamed its own first
            atomic_directory(folder, lambda staging: self.index.save(str(staging), allow_pickle=False))

    def search(self, query: str, k: int) -> list[tuple[Passage, float]]:
        """The `k` best passages for `query` with their BM25 scores, best first."""
        import bm25s

        k = min(k, len(self.passages))
        tokens = bm25s.tokenize([query], stopwords=self.stopwords, return_ids=False, show_progress=False)
        indices, scores = self.index.retrieve(tokens, k=k, show_progress=False)
        return [(self.passages[int(i)], float(s)) for i, s in zip(indices[0], scores[0], strict=True)]


class HybridRetriever:
    """Reciprocal-rank fusion of two retrievers' rankings (BM25 and dense by default): each passage scores
    sum(1 / (rrf_k + rank)) over the rankings of the `pool` best of each, so lexical and semantic matches both count
    without calibrating one score against the other (Cormack, Clarke & Buettcher, SIGIR 2009; rrf_k=60 is theirs)."""

    def __init__(self, passages: Sequence[Passage], cache_dir: str | Path | None = None,
                 bm25: Callable[..., Any] | None = None, dense: Callable[..., Any] | None = None,
                 rrf_k: float = 60.0, pool: int = 100) -> None:
        if bm25 is None or dense is None:
            raise ConfigError("retriever=hybrid fuses two retrievers and is missing one", "keys retriever.bm25 and "
                              "retriever.dense", "keep both nodes of conf/retriever/hybrid.yaml")
        self.passages = list(passages)
        self.parts = [bm25(passages=self.passages, cache_dir=cache_dir), dense(passages=self.passages,
                                                                               cache_dir=cache_dir)]
        self.rrf_k, self.pool = rrf_k, pool

    def search(self, query: str, k: int) -> list[tuple[Passage, float]]:
        """The `k` best passages of the fused ranking with their fused scores, best first."""
        depth = min(max(k, self.pool), len(self.passages))
        rankings = [[p for p, _ in part.search(query, depth)] for part in self.parts]
        return reciprocal_rank_fusion(rankings, self.rrf_k)[:k]


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Passage]], rrf_k: float = 60.0
                           ) -> list[tuple[Passage, float]]:
    """Passages of all `rankings` (each best first) by their summed 1 / (rrf_k + rank); ties keep the order in
    which the passages first appear (the first ranking's first)."""
    scores: dict[Passage, float] = {}
    for ranking in rankings:
        for rank, passage in enumerate(ranking, start=1):
            scores[passage] = scores.get(passage, 0.0) + 1.0 / (rrf_k + rank)
    return sorted(scores.items(), key=lambda item: -item[1])  # sorted() is stable: ties stay in first-seen order


def passage_text(passage: Passage, with_titles: bool = True) -> str:
    """What a retriever indexes for a passage: `title. text` when it has a title (and titles are wanted)."""
    return f"{passage.title}. {passage.text}" if with_titles and passage.title else passage.text


def index_key(texts: Sequence[str], ids: Sequence[str], settings: Mapping[str, Any]) -> str:
    """Hash of everything the index depends on: the passages' text and ids, and the retriever's settings."""
    payload = json.dumps({"texts": list(texts), "ids": list(ids), "settings": dict(settings)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]
