"""Packing: several examples share one row without seeing each other.

Two modes (`hyperparams.packing`): `batch` bins each micro-batch's examples into as few rows as fit
(first-fit decreasing, in the collator); `dataset` bins each epoch's examples into rows of
`max_seq_len` before batching (best-fit decreasing over the whole epoch, `RowSampler`), so a
micro-batch is `batch_size` nearly full rows.

Restarting position ids alone does not isolate examples under `sdpa` or `eager` attention (measured:
logits off by 0.39 on a tiny Llama; see shared/PITFALLS.md). (transformers 5.24 does infer example
boundaries from position ids there, but only when it builds no KV cache: with the config's default
use_cache=True, in training too, it skips that and examples attend across: 1.28 off here, 8e-7 with
use_cache=False.) Each packed row therefore gets a block-diagonal causal mask, passed as a 4D additive
float mask, which both kernels honour (difference to separate forward passes ~6e-7), plus position ids
that restart per example; on the CPU it trains as fast as the position-id path (6,323 vs 6,268 real
tokens per CPU-second, identical weights after 18 steps).
FlashAttention kernels take the padding-free path instead (`flatten_rows`): the micro-batch becomes
one row of its real tokens and the example boundaries travel as `cu_seq_lens`, no mask at all.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset, Sampler

# transformers' FlashAttentionKwargs: example boundaries for the varlen kernel (DataCollatorWithFlattening's names).
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of example indices whose lengths sum to at most `capacity` (first-fit decreasing)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[index] <= free:
                bins[b].append(index)
                room[b] -= lengths[index]
                break
        else:
            bins.append([index])
            room.append(capacity - lengths[index])
    return bins


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of indices into `lengths`, each summing to at most `capacity`: longest first, each into the
    bin with the least room that still fits it (best-fit decreasing), O(n log n).

    Ties keep their order in `lengths` (a stable sort), so the bins' shape (how many, how full) depends
    only on the multiset of lengths, and which example of a given length lands where follows the order.
    """
    bins: list[list[int]] = []
    rooms: list[int] = []  # the distinct free spaces of open bins, ascending
    by_room: dict[int, list[int]] = {}  # free space -> open bins with exactly that much
    for index in sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True):  # reverse keeps ties' order
        need = lengths[index]
        if need > capacity:
            raise ValueError(f"an example of {need} tokens cannot fit a row of {capacity}")
        k = bisect.bisect_left(rooms, need)
        if k == len(rooms):
            b, free = len(bins), capacity
            bins.append([])
        else:
            free = rooms[k]
            b = by_room[free].pop()
            if not by_room[free]:
                del by_room[free]
                rooms.pop(k)
        bins[b].append(index)
        left = free - need
        if left:
            if left not in by_room:
                by_room[left] = []
                bisect.insort(rooms, left)
            by_room[left].append(b)
    return bins


class EpochOrder(Protocol):
    """What `RowSampler` packs: an epoch's example indices, from the seed and the epoch alone (EpochSampler):
    a shuffle, or with `weights` a stream of draws with replacement (`count` of them)."""

    epoch: int
    weights: Any

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def indices(self, epoch: int, count: int | None = None) -> list[int]: ...


class RowSampler(Sampler[tuple[int, ...]]):
    """Dataset-level packing: each epoch's examples (in `order`'s seeded order) binned into rows of at most
    `capacity` tokens by best-fit decreasing over the whole epoch; yields the rows, shuffled, one at a time.

    Rows depend only on (seed, epoch), so a run resumed mid-epoch rebuilds them and skips those already
    trained on (`skip_next`, as EpochSampler). The number of rows is fixed for the run: Lightning reads
    `len()` once (the epoch's length, when validation runs, DDP's shards). A shuffle of the same examples
    packs into the same number every epoch (the bins' shape depends only on the lengths). A weighted
    mixture's draws differ in length from epoch to epoch, so its epoch is as many draws of the epoch's
    stream as fill that number of rows (the rows `len(order)` draws fill in epoch 0): every draw taken
    is trained on once, and the count of draws varies around samples_per_epoch (README "Packing").
    """

    def __init__(self, order: EpochOrder, lengths: Sequence[int], capacity: int, seed: int) -> None:
        self.order, self.lengths, self.capacity, self.seed = order, list(lengths), capacity, seed
        self._skip = 0
        self._cached: tuple[int, list[tuple[int, ...]]] | None = None
        self.weighted = getattr(order, "weights", None) is not None
        self.num_rows = len(self._pack(self._stream(0)[: len(order)] if self.weighted else order.indices(0)))

    @property
    def epoch(self) -> int:
        return self.order.epoch

    def set_epoch(self, epoch: int) -> None:
        self.order.set_epoch(epoch)

    def skip_next(self, count: int) -> None:
        """The next iteration starts `count` rows in (a resumed run's position within the epoch)."""
        self._skip = count

    def __len__(self) -> int:
        return self.num_rows

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        skip, self._skip = self._skip, 0
        return iter(self.rows(self.epoch)[skip:])

    def _stream(self, epoch: int) -> list[int]:
        """A weighted order's draws for `epoch`, more than an epoch takes (twice samples_per_epoch)."""
        return self.order.indices(epoch, 2 * len(self.order) + 16)

    def _pack(self, indices: list[int]) -> list[tuple[int, ...]]:
        return [tuple(indices[j] for j in b)
                for b in best_fit_decreasing([self.lengths[i] for i in indices], self.capacity)]

    def rows(self, epoch: int) -> list[tuple[int, ...]]:
        """The epoch's rows in training order (tuples of example indices), `len(self)` of them."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        if self.weighted:  # the longest prefix of the draws that fits the run's rows (binary search)
            stream = self._stream(epoch)
            low, high = 1, len(stream)
            while low < high:
                mid = (low + high + 1) // 2
                low, high = (mid, high) if len(self._pack(stream[:mid])) <= self.num_rows else (low, mid - 1)
            rows = self._pack(stream[:low])
        else:
            rows = self._pack(self.order.indices(epoch))
        assert sum(map(len, rows)) >= self.num_rows, "an epoch has fewer examples than rows to fill"
        at = 0
        while len(rows) < self.num_rows:  # fewer rows than the run's count: split rows of several examples
            if len(rows[at]) > 1:
                rows.append(rows[at][-1:])
                rows[at] = rows[at][:-1]
            at = (at + 1) % len(rows)
        # A stream apart from the order's (seed * 100_003 + epoch), so the two shuffles are not the same draw.
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch + 50_000_017)
        rows = [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]
        self._cached = (epoch, rows)
        return rows


class PackedRows(Dataset):
    """The training examples, indexed by a row (a tuple of example indices, from `RowSampler`)."""

    def __init__(self, examples: Sequence[Any]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, row: tuple[int, ...]) -> list[Any]:
        return [self.examples[i] for i in row]


def block_causal_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, L, L) additive mask from segment ids (B, L): 0 where a token may attend, dtype-min elsewhere.

    Padding has segment id -1 and attends only to itself, so no softmax row is empty (no NaN).
    """
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    allowed = (same & causal) | torch.eye(length, dtype=torch.bool, device=segments.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def uses_flash_attention(model: Any) -> bool:
    """Whether `model` runs a FlashAttention kernel (flash_attention_2/3, a hub kernel such as
    kernels-community/flash-attn2): transformers' own test (`is_flash_attention_requested`) is "flash" in the name."""
    return "flash" in str(getattr(getattr(model, "config", None), "_attn_implementation", None) or "")


def flatten_rows(batch: dict[str, Any]) -> dict[str, Any]:
    """A packed batch (rows, segment and position ids) as one row of its real tokens, padding dropped, with
    the example boundaries FlashAttention's varlen kernel reads (`cu_seq_lens_*`, `max_length_*`).

    transformers infers boundaries from position ids only for a batch of one row (`_is_packed_sequence`
    returns False for batch_size > 1, and the kernel then attends across examples); precomputed
    boundaries also spare it that check, a device sync, in every layer (its padding-free guide).
    """
    real = batch["segment_ids"] >= 0
    positions = batch["position_ids"][real]
    starts = (positions == 0).nonzero().flatten()
    cu_seq_lens = torch.cat([starts, starts.new_tensor([positions.numel()])]).to(torch.int32)
    longest = int(cu_seq_lens.diff().max())
    flat = {k: v for k, v in batch.items() if k not in ("segment_ids", "input_ids", "labels", "position_ids")}
    flat.update(input_ids=batch["input_ids"][real][None], labels=batch["labels"][real][None],
                position_ids=positions[None], pad_fraction=0.0, cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens,
                max_length_q=longest, max_length_k=longest)
    return flat
