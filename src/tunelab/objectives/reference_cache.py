"""Reference log-probs computed once before training and kept in the run directory (DPO's `reference: cached`).

Instead of a frozen copy of the starting model (full fine-tuning) or a second forward with the adapter disabled
(adapter methods) on every step, one pass before training scores every preference pair of the task (train,
validation and test splits) under the starting model and stores the summed log-probs of the chosen and rejected
replies in `<run>/reference_logps.safetensors`: data, not code (never a pickle). Each pair is found by a digest of
its tokens (`pair_key`), so a batch needs no index into the split.

The file is read back only when it is exactly what this run would compute: the same format, the same fingerprint
(the pairs' digests and the starting model's weights), the same shapes and the same set of pairs. Anything else
(another train split, another model, a truncated or foreign file) is recomputed with a warning. A resumed run reads
the file its first process wrote (or, killed before that, computes it again from the starting weights: the pass
runs before Lightning restores the checkpoint), so the resumed run sees the same numbers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from tunelab.data.encode import Encoded

log = logging.getLogger(__name__)

CACHE_FILE = "reference_logps.safetensors"
FORMAT = "tunelab-reference-logps-1"
KEY_BYTES = 16


def pair_key(item: Encoded) -> bytes:
    """A digest of one pair's tokens and labels (chosen, then rejected): the same pair, the same key."""
    digest = hashlib.blake2b(digest_size=KEY_BYTES)
    for part in (item.input_ids, item.labels, item.rejected_ids or [], item.rejected_labels or []):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(np.asarray(part, dtype=np.int64).tobytes())
    return digest.digest()


def model_fingerprint(model: nn.Module) -> str:
    """A digest of every parameter and buffer: reference log-probs of one starting model are no use to another.
    It reads every weight once, before training."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        data = tensor.detach().cpu().contiguous()
        digest.update(str(data.dtype).encode())
        try:
            raw = data.flatten().view(torch.uint8).numpy().tobytes() if data.numel() else b""
        except (RuntimeError, TypeError):  # a dtype with no byte view: its values
            raw = data.to(torch.float64).numpy().tobytes()
        digest.update(raw)
    return digest.hexdigest()


class CachedReference:
    """Reference log-probs of a fixed set of pairs, looked up by `pair_key`."""

    def __init__(self, keys: Sequence[bytes], chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        self.keys = list(keys)
        self.chosen, self.rejected = chosen.float(), rejected.float()
        self.index = {key.hex(): i for i, key in enumerate(self.keys)}  # a batch carries hex keys (PairCollator)

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, keys: Sequence[str], device: torch.device) -> torch.Tensor:
        """[2B] summed reference log-probs, the chosen replies of the pairs `keys` (hex `pair_key`s) name, then the
        rejected ones (a batch's layout)."""
        missing = [k for k in keys if k not in self.index]
        if missing:
            raise RuntimeError(f"{len(missing)} pair(s) of this batch are not in the cached reference log-probs "
                               f"({len(self)} pairs); the cache covers the train, validation and test splits")
        rows = torch.tensor([self.index[k] for k in keys], dtype=torch.long)
        return torch.cat([self.chosen[rows], self.rejected[rows]]).to(device)

    def save(self, path: Path, fingerprint: str) -> None:
        """Written atomically (a temporary file renamed): a kill mid-write leaves no half file behind."""
        keys = torch.frombuffer(bytearray(b"".join(self.keys)), dtype=torch.uint8).view(len(self.keys), KEY_BYTES)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"keys": keys, "chosen": self.chosen.contiguous(), "rejected": self.rejected.contiguous()}, tmp,
                  metadata={"format": FORMAT, "fingerprint": fingerprint, "pairs": str(len(self.keys))})
        os.replace(tmp, path)


def fingerprint(keys: Sequence[bytes], model_digest: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(model_digest.encode())
    for key in keys:
        digest.update(key)
    return digest.hexdigest()


def read_cache(path: Path, keys: Sequence[bytes], expected: str) -> CachedReference | None:
    """The cached log-probs at `path` if they are exactly this run's (module docstring), else None with a warning
    saying why (nothing is said when there is no file yet)."""
    if not path.exists() and not path.is_symlink():
        return None
    problem = None
    try:
        if path.is_symlink() or not path.is_file():
            raise ValueError("not a regular file")
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 - not a dict
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("fingerprint") != expected:
            raise ValueError("made from another train split or another starting model (fingerprint differs)")
        if set(tensors) != {"keys", "chosen", "rejected"}:
            raise ValueError(f"tensors {sorted(tensors)}, expected chosen, keys, rejected")
        n = len(keys)
        shapes = {name: tuple(t.shape) for name, t in tensors.items()}
        if shapes != {"keys": (n, KEY_BYTES), "chosen": (n,), "rejected": (n,)} or tensors["keys"].dtype != torch.uint8:
            raise ValueError(f"shapes {shapes}, expected {n} pairs")
        stored = [bytes(row.tolist()) for row in tensors["keys"]]
        if stored != list(keys):
            raise ValueError("its pairs differ from this run's")
        if not (torch.isfinite(tensors["chosen"]).all() and torch.isfinite(tensors["rejected"]).all()):
            raise ValueError("non-finite log-probs")
        return CachedReference(stored, tensors["chosen"], tensors["rejected"])
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        problem = str(err).splitlines()[0] if str(err) else type(err).__name__
    log.warning("cached reference log-probs %s are not this run's (%s): computing them again", path, problem)
    return None


@torch.no_grad()
def compute(items: Sequence[Encoded], collate: Callable[[list[Encoded]], dict], score: Callable[[dict], torch.Tensor],
            batch_size: int) -> CachedReference:
    """Summed reference log-probs of `items` (unique pairs), `batch_size` pairs per forward; `score(batch)` gives
    the batch's [2B] log-probs (chosen rows, then rejected)."""
    keys = [pair_key(item) for item in items]
    chosen, rejected = [], []
    for start in range(0, len(items), batch_size):
        logps = score(collate(list(items[start:start + batch_size]))).float().cpu()
        c, r = logps.chunk(2)
        chosen.append(c)
        rejected.append(r)
    return CachedReference(keys, torch.cat(chosen) if chosen else torch.zeros(0),
                           torch.cat(rejected) if rejected else torch.zeros(0))


def unique_pairs(items: Sequence[Encoded]) -> list[Encoded]:
    """Each pair once (a duplicated row has the same reference log-probs), in first-seen order."""
    seen: dict[bytes, Encoded] = {}
    for item in items:
        seen.setdefault(pair_key(item), item)
    return list(seen.values())


def prepare(module: Any, collate: Callable[[list[Encoded]], dict], reference_pass: Callable[[dict], torch.Tensor],
            ) -> CachedReference:
    """The run's cached reference log-probs, read from its directory or computed now (and saved by rank 0).

    Called from the objective's `setup` hook, which Lightning runs before it restores a checkpoint: the model is
    still the starting model. `reference_pass(batch)` is the objective's [2B] reference log-probs of a batch on
    the model's device."""
    trainer = module.trainer
    datamodule = trainer.datamodule
    if datamodule is None or not getattr(datamodule, "splits", None):
        raise RuntimeError("reference: cached scores the pairs of a TuneDataModule: pass one to trainer.fit "
                           "(`tunelab train` does)")
    items = unique_pairs([example for splits in datamodule.splits.values()
                          for split in ("train", "validation", "test") for example in splits.get(split, [])])
    device = trainer.strategy.root_device
    if next(module.model.parameters()).device != device:
        module.to(device)  # Lightning would move it right after setup anyway; the pass runs on the run's device
    keys = [pair_key(item) for item in items]
    expected = fingerprint(keys, model_fingerprint(module.model))
    path = Path(trainer.default_root_dir) / CACHE_FILE
    cache = read_cache(path, keys, expected)
    if cache is not None:
        log.info("reference log-probs of %d pairs read from %s", len(cache), path)
        return cache
    start = time.perf_counter()
    batch_size = getattr(datamodule, "eval_batch_size", 32)
    cache = compute(items, collate, reference_pass, batch_size)
    if trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        cache.save(path, expected)
    log.info("reference log-probs of %d pairs computed in %.1f s, kept in %s", len(cache),
             time.perf_counter() - start, path)
    return cache
