"""The one LightningDataModule: dataset config + tokenizer + length settings → padded batches."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Sampler

from tunelab.config.schema import DatasetSchema, Packing, dataset_spec
from tunelab.data.cache import cache_key, read_cache, write_cache
from tunelab.data.encode import IGNORE, Encoded, apply_length_policy, encode_chat, encode_pair, encode_text
from tunelab.data.formats import Example
from tunelab.data.items import build_items
from tunelab.data.packing import PackedRows, RowSampler, first_fit_decreasing
from tunelab.data.resumable import ResumableLoader
from tunelab.errors import DataError, did_you_mean

log = logging.getLogger(__name__)


class Collator:
    """Right-pads ids and labels for the loss (or packs them, see packing.py); left-pads prompts for generation.

    `pack` (hyperparams.packing): `none` pads one example per row; `batch` bins the micro-batch's examples
    into as few rows of at most `max_len` tokens as fit, so a step sees the same examples packed or padded
    and the token-mean loss is the same, only the padding (and the compute spent on it) shrinks;
    `dataset` receives rows already packed over the epoch (RowSampler): each item is a list of examples.
    """

    def __init__(self, pad_id: int, with_prompts: bool, pack: Packing | str = Packing.none, max_len: int = 0,
                 task: str | None = None, choices: list[str] | None = None) -> None:
        self.pad_id, self.with_prompts, self.max_len, self.task = pad_id, with_prompts, max_len, task
        self.choices = choices  # the task's answer options, for decoding.rank_choices
        self.pack = Packing(pack)

    def __call__(self, items: list[Encoded] | list[list[Encoded]]) -> dict[str, Any]:
        if self.pack == Packing.dataset:
            rows: list[list[Encoded]] = items  # type: ignore[assignment]
            items = [item for row in rows for item in row]
        elif self.pack == Packing.batch:
            bins = first_fit_decreasing([len(item.input_ids) for item in items], self.max_len)
            rows = [[items[i] for i in b] for b in bins]
        else:
            rows = [[item] for item in items]
        width = max(sum(len(item.input_ids) for item in row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        segments = torch.full((len(rows), width), -1, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for seg, item in enumerate(row):
                end = start + len(item.input_ids)
                ids[r, start:end] = torch.tensor(item.input_ids)
                # A packed example's first label is its own first token: never predicted from the previous one.
                labels[r, start:end] = torch.tensor([IGNORE] + item.labels[1:])
                segments[r, start:end] = seg
                positions[r, start:end] = torch.arange(end - start)
                start = end
        real = segments >= 0
        batch: dict[str, Any] = {"input_ids": ids, "labels": labels, "n_tokens": int(real.sum()),
                                 "pad_fraction": 1.0 - float(real.sum()) / real.numel()}
        if self.pack != Packing.none:
            batch.update(segment_ids=segments, position_ids=positions)  # the module builds the 4D mask
        else:
            batch["attention_mask"] = real.long()
        if self.task is not None:
            batch["task"] = self.task
        if self.choices:
            batch["choices"] = list(self.choices)
        if self.with_prompts and all(item.prompt_ids for item in items):
            pwidth = max(len(item.prompt_ids) for item in items)
            pids = torch.full((len(items), pwidth), self.pad_id, dtype=torch.long)
            pmask = torch.zeros((len(items), pwidth), dtype=torch.long)
            for row, item in enumerate(items):
                n = len(item.prompt_ids)
                pids[row, pwidth - n:] = torch.tensor(item.prompt_ids)
                pmask[row, pwidth - n:] = 1
            batch.update(prompt_ids=pids, prompt_mask=pmask, references=[item.reference for item in items])
        return batch


class EpochSampler(Sampler[int]):
    """A shuffle (or, with `weights`, a draw with replacement) that depends only on the seed and the epoch.

    Lightning calls `set_epoch` at each epoch start, so a run resumed at epoch k sees exactly the order an
    uninterrupted run sees at epoch k; a generator carried across epochs would restart from epoch 0's.
    """

    def __init__(self, size: int, seed: int, weights: torch.Tensor | None = None, samples: int | None = None) -> None:
        self.size, self.seed, self.weights = size, seed, weights
        self.samples = samples or size
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_next(self, count: int) -> None:
        """The next iteration starts `count` indices in (a resumed run's position within the epoch)."""
        self._skip = count

    def __len__(self) -> int:
        return self.samples

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        return iter(self.indices(self.epoch)[skip:])

    def indices(self, epoch: int, count: int | None = None) -> list[int]:
        """Epoch `epoch`'s example indices in training order (what dataset-level packing bins into rows); with
        weights, `count` draws (default: samples per epoch)."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        if self.weights is None:
            return torch.randperm(self.size, generator=generator).tolist()
        return torch.multinomial(self.weights, count or self.samples, replacement=True, generator=generator).tolist()


class TuneDataModule(pl.LightningDataModule):
    """Loads, formats, tokenises and masks every split once; data errors surface before the model is built.

    `dataset` is one task (a `source` and a template) or a mixture (`tasks` of such configs and
    `weights`, the probability of drawing a training example from each task). Validation and test
    keep one loader per task so metrics are reported per task and overall.
    """

    def __init__(
        self,
        dataset: Mapping[str, Any],
        tokenizer: Any,
        batch_size: int = 8,
        eval_batch_size: int = 32,
        max_seq_len: int = 1024,
        seed: int = 0,
        packing: Packing | str = Packing.none,
        num_workers: int = 0,
        max_eval_samples: int | None = None,
        cache_dir: str | None = None,
        collator: Callable[..., Callable[[list[Any]], dict[str, Any]]] = Collator,
    ) -> None:
        super().__init__()
        self.collator = collator  # the objective's (tunelab.objectives): `train` passes it, others get SFT's
        self.dataset: DatasetSchema = dataset if isinstance(dataset, DatasetSchema) else dataset_spec(dataset)
        self.tokenizer = tokenizer
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.max_seq_len, self.seed, self.packing = max_seq_len, seed, Packing(packing)
        self.num_workers, self.max_eval_samples = num_workers, max_eval_samples
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.tasks: dict[str, DatasetSchema] = self.dataset.tasks or {self.dataset.name: self.dataset}
        self.splits: dict[str, dict[str, list[Encoded]]] = {}  # task -> split -> examples
        self.stats: dict[str, Any] = {}

    @property
    def task_metrics(self) -> dict[str, dict[str, Any]]:
        """Each task's metric configs (`_target_` nodes), for the module to instantiate."""
        return {name: dict(task.metrics) for name, task in self.tasks.items()}

    @property
    def answer_tokens(self) -> dict[str, int]:
        """The tasks that set their own answer budget (`dataset.max_new_tokens`): task -> max_new_tokens."""
        return {name: int(task.max_new_tokens) for name, task in self.tasks.items() if task.max_new_tokens}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        for name, cfg in self.tasks.items():
            self.splits[name], self.stats[name] = self._load_task(cfg)
            for split in ("validation", "test"):
                if split not in self.splits[name]:
                    raise DataError(
                        f"task {name!r} has no {split} split", f"dataset {name} (source {cfg.source.path})",
                        "name it in dataset.source.splits, or carve it from train with "
                        "dataset.source.val_size/test_size",
                    )
                if self.max_eval_samples:
                    self.splits[name][split] = self.splits[name][split][: self.max_eval_samples]
        weights = self.dataset.weights
        unknown = set(weights) - set(self.tasks)
        if unknown:
            raise DataError(f"weights name unknown tasks {sorted(unknown)}", "key dataset.weights",
                            did_you_mean(sorted(unknown)[0], self.tasks))

    def _load_task(self, cfg: DatasetSchema) -> tuple[dict[str, list[Encoded]], dict[str, Any]]:
        key = cache_key(asdict(cfg), self.tokenizer, self.max_seq_len, self.seed)
        cached = read_cache(self.cache_dir, key) if self.cache_dir else None
        if cached is not None:
            return cached
        splits, stats = encode_task(cfg, self.tokenizer, self.max_seq_len, self.seed)
        if self.cache_dir:
            write_cache(self.cache_dir, key, splits, stats)
        return splits, stats

    def _train_sampler(self) -> tuple[list[Encoded], EpochSampler]:
        examples = [e for name in self.tasks for e in self.splits[name]["train"]]
        if len(self.tasks) == 1:
            return examples, EpochSampler(len(examples), self.seed)
        weights = self.dataset.weights
        total = sum(float(weights.get(name, 1.0)) for name in self.tasks)
        per_example = torch.cat([
            torch.full((len(self.splits[name]["train"]),),
                       float(weights.get(name, 1.0)) / total / len(self.splits[name]["train"]))
            for name in self.tasks
        ])
        samples = self.dataset.samples_per_epoch or len(examples)
        return examples, EpochSampler(len(examples), self.seed, per_example, samples)

    def train_dataloader(self) -> DataLoader:
        examples, sampler = self._train_sampler()
        collate = self.collator(self.tokenizer.pad_token_id, False, self.packing, self.max_seq_len)
        if self.packing == Packing.dataset:  # the loader batches rows of max_seq_len, not examples
            rows = RowSampler(sampler, [len(e.input_ids) for e in examples], self.max_seq_len, self.seed)
            first = [i for row in rows.rows(0) for i in row]
            world = self.trainer.world_size if self.trainer is not None else 1  # DDP shards the rows over ranks
            log.info("dataset packing: epoch 0 packs %d examples into %d rows of %d tokens (%.1f%% filled): %d "
                     "micro-batches of %d rows per epoch%s", len(first), len(rows), self.max_seq_len,
                     100 * sum(len(examples[i].input_ids) for i in first) / (len(rows) * self.max_seq_len),
                     math.ceil(math.ceil(len(rows) / world) / self.batch_size), self.batch_size,
                     f" on each of {world} processes" if world > 1 else "")
            return ResumableLoader(PackedRows(examples), batch_size=self.batch_size, sampler=rows, collate_fn=collate,
                                   num_workers=self.num_workers)
        return ResumableLoader(  # its position is saved in checkpoints: a mid-epoch resume continues exactly
            examples, batch_size=self.batch_size, sampler=sampler, collate_fn=collate, num_workers=self.num_workers,
        )

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        return [DataLoader(self.splits[name][split], batch_size=self.eval_batch_size,
                           collate_fn=self.collator(self.tokenizer.pad_token_id, True, task=name,
                                                    choices=self.tasks[name].choices),
                           num_workers=self.num_workers) for name in self.tasks]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("validation")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")


def encode_task(
    cfg: DatasetSchema | Mapping[str, Any], tokenizer: Any, max_seq_len: int, seed: int,
    splits: Mapping[str, Any] | None = None,
) -> tuple[dict[str, list[Encoded]], dict[str, Any]]:
    """Every split of one task as tokenised, masked examples, with counts of what was dropped and why.

    The rows are read by the one row loop (`items.build_items`: bad rows are errors unless `on_bad_row: skip`,
    bounded by `max_bad_fraction`); `splits` overrides `source.splits` (None leaves a split out).
    """
    cfg = cfg if isinstance(cfg, DatasetSchema) else dataset_spec(cfg)

    def encode(fields: dict[str, Any], example: Example) -> Encoded | None:
        if example.rejected is not None:
            return encode_pair(tokenizer, example, max_seq_len, cfg.overlength.value)
        item = (encode_text(tokenizer, example) if example.text is not None
                else encode_chat(tokenizer, example, cfg.train_on_prompt))
        return apply_length_policy(item, max_seq_len, cfg.overlength.value)

    out: dict[str, list[Encoded]] = {}
    stats: dict[str, Any] = {}
    for split, part in build_items(cfg, seed, encode, splits).items():
        encoded, dropped, bad = part.items, part.dropped, part.bad
        supervised = sum(item.supervised for item in encoded)
        if not encoded or supervised == 0:
            raise DataError(
                f"the {split} split has no supervised tokens ({part.rows} rows, {dropped} over-length dropped, "
                f"{len(bad)} bad)", part.where, "check the template/format: the loss would be computed on nothing",
            )
        if dropped:
            log.warning("%s: dropped %d over-length examples (max_seq_len=%d)", part.where, dropped, max_seq_len)
        out[split] = encoded
        stats[split] = {"examples": len(encoded), "dropped_overlength": dropped, "bad_rows": len(bad),
                        "bad_lines": [b.split(": ", 1)[0] for b in bad][:100],
                        "supervised_tokens": supervised, "tokens": sum(len(i.input_ids) for i in encoded)}
    return out, stats
