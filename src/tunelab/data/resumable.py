"""A DataLoader whose position is part of the checkpoint, so a run resumed mid-epoch sees the next batch.

Lightning stores `state_dict()` of every stateful training loader in the checkpoint and calls
`load_state_dict()` on resume (without it Lightning only warns "your dataloader is not resumable",
and the resumed run replays batches: 3e-2 max-abs off the uninterrupted run here). The state is
(epoch, batches consumed); the skip happens in the sampler's index stream, so no skipped batch is
collated. The training order itself depends only on (seed, epoch): see `EpochSampler`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader


# Ours, not torchdata's StatefulDataLoader, which also counts batches and fast-forwards the sampler: torchdata is a new
# dependency not installed here (its last release, 0.11.0, predates this torch 2.13), and its state has no epoch,
# which this one checks; 16 interruptions, epoch boundaries included, resume bitwise equal (tests/test_kill.py).
class ResumableLoader(DataLoader):
    """`DataLoader` + `state_dict`/`load_state_dict` of its position within the current epoch."""

    _epoch = 0
    _consumed = 0
    _pending: tuple[int, int] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = (int(state["epoch"]), int(state["batches"]))

    def __iter__(self) -> Iterator[Any]:
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        # A generator: this body runs at the first next(), after Lightning's set_epoch for this epoch.
        epoch = int(getattr(self.sampler, "epoch", 0))
        skip = 0
        if self._pending is not None:
            if self._pending[0] == epoch:
                skip = self._pending[1]
            self._pending = None
        sampler_skips = skip and hasattr(self.sampler, "skip_next") and self.batch_size is not None
        if sampler_skips:
            self.sampler.skip_next(skip * self.batch_size)
        iterator = DataLoader.__iter__(self)
        self._epoch, self._consumed = epoch, 0
        for index, batch in enumerate(iterator):
            if not sampler_skips and index < skip:  # a wrapped sampler (DDP): skip by drawing, slower but exact
                continue
            self._consumed = index + 1 + (skip if sampler_skips else 0)
            yield batch
