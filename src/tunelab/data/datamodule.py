"""The one LightningDataModule: dataset config + tokenizer + length settings → padded batches."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from tunelab.data.encode import IGNORE, Encoded, apply_length_policy, encode_chat, encode_text
from tunelab.data.formats import compile_templates, to_example
from tunelab.data.sources import load_splits
from tunelab.errors import DataError

log = logging.getLogger(__name__)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


class Collator:
    """Right-pads ids and labels for the loss; left-pads prompts for batched generation."""

    def __init__(self, pad_id: int, with_prompts: bool) -> None:
        self.pad_id, self.with_prompts = pad_id, with_prompts

    def __call__(self, items: list[Encoded]) -> dict[str, Any]:
        width = max(len(item.input_ids) for item in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item.input_ids)
            ids[row, :n] = torch.tensor(item.input_ids)
            labels[row, :n] = torch.tensor(item.labels)
            mask[row, :n] = 1
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
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


class TuneDataModule(pl.LightningDataModule):
    """Loads, formats, tokenises and masks every split once; data errors surface before the model is built."""

    def __init__(
        self,
        dataset: Mapping[str, Any],
        tokenizer: Any,
        batch_size: int = 8,
        eval_batch_size: int = 32,
        max_seq_len: int = 1024,
        seed: int = 0,
        num_workers: int = 0,
        max_eval_samples: int | None = None,
    ) -> None:
        super().__init__()
        self.dataset_cfg: dict[str, Any] = _plain(dataset)
        self.tokenizer = tokenizer
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.max_seq_len, self.seed, self.num_workers = max_seq_len, seed, num_workers
        self.max_eval_samples = max_eval_samples
        self.splits: dict[str, list[Encoded]] = {}
        self.stats: dict[str, dict[str, int]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        cfg = self.dataset_cfg
        templates = compile_templates(cfg.get("templates") or [])
        fmt = cfg.get("format", "prompt_completion")
        for split, rows in load_splits(cfg["source"], self.seed).items():
            encoded, dropped = [], 0
            for index, row in enumerate(rows):
                example = to_example(row, index, fmt, cfg.get("column_map") or {}, templates,
                                     cfg.get("system_prompt"), self.seed)
                item = (encode_text(self.tokenizer, example) if fmt == "text"
                        else encode_chat(self.tokenizer, example, bool(cfg.get("train_on_prompt", False))))
                item = apply_length_policy(item, self.max_seq_len, cfg.get("overlength", "error"))
                if item is None:
                    dropped += 1
                    continue
                encoded.append(item)
            supervised = sum(item.supervised for item in encoded)
            if not encoded or supervised == 0:
                where = rows[0].origin.rsplit(":", 1)[0] if rows else str(cfg["source"].get("path"))
                raise DataError(
                    f"the {split} split has no supervised tokens ({len(rows)} rows, {dropped} dropped)", where,
                    "check the template/format: the loss would be computed on nothing",
                )
            if split != "train" and self.max_eval_samples:
                encoded = encoded[: self.max_eval_samples]
            self.splits[split] = encoded
            self.stats[split] = {
                "examples": len(encoded), "dropped_overlength": dropped, "supervised_tokens": supervised,
                "tokens": sum(len(item.input_ids) for item in encoded),
            }
            if dropped:
                log.warning("%s: dropped %d over-length examples (max_seq_len=%d)", split, dropped, self.max_seq_len)
        for required in ("validation", "test"):
            if required not in self.splits:
                raise DataError(
                    f"the dataset has no {required} split", f"dataset {cfg.get('name')}",
                    "name it in dataset.source.splits, or carve it from train with dataset.source.val_size/test_size",
                )

    def _loader(self, split: str, train: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.splits[split],  # a list of Encoded is a map-style dataset
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            generator=generator if train else None,
            collate_fn=Collator(self.tokenizer.pad_token_id, with_prompts=not train),
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
