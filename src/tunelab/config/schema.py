"""Schemas of tunelab's own value nodes (`hyperparams`, `dataset`, `eval`): types, enums and, beside each
type, the range a number accepts (field metadata `range`, read by `config.checks.check_ranges`).

`config/validate.py` checks a composed config against these (unknown keys, types, enum values); keys of
library `_target_` nodes are checked against the target's signature instead (`config/targets.py`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from tunelab.config.ranges import AT_LEAST_ONE, FRACTION, NON_NEGATIVE, POSITIVE, SEED, SPLIT_SIZE, Range


class OnNonFinite(str, Enum):
    stop = "stop"
    skip = "skip"


class OnBadRow(str, Enum):
    error = "error"
    skip = "skip"


class Overlength(str, Enum):
    error = "error"
    truncate = "truncate"
    drop = "drop"


class Packing(str, Enum):
    """How training examples share rows of `max_seq_len` tokens (README "Packing")."""

    none = "none"  # one example per row, padded to the longest in the micro-batch
    batch = "batch"  # each micro-batch of `batch_size` examples binned into as few rows as fit
    dataset = "dataset"  # each epoch's examples binned into rows; `batch_size` counts rows


def _ranged(default: Any, allowed: Range) -> Any:
    """A field with a default and the range its numbers must lie in."""
    return field(default=default, metadata={"range": allowed})


# Metadata `ranges`: the range of each named key inside a node the schema leaves untyped (a `_target_` node's
# arguments, a dict's values under "*"). Metadata `each_like_parent`: each value is a node of this same schema.
@dataclass
class HyperparamsSchema:
    lr: float = _ranged(MISSING, POSITIVE)
    batch_size: int = _ranged(MISSING, AT_LEAST_ONE)
    eval_batch_size: int = _ranged(MISSING, AT_LEAST_ONE)
    epochs: int = _ranged(MISSING, Range(low=1, integer=True, also=(-1,),
                                         note="-1: no epoch limit, stop at max_steps"))
    max_steps: int = _ranged(-1, Range(low=1, integer=True, also=(-1,), note="-1: no step limit"))
    weight_decay: float = _ranged(0.0, NON_NEGATIVE)
    warmup_ratio: float = _ranged(0.0, FRACTION)
    accumulate_grad_batches: int = _ranged(1, AT_LEAST_ONE)
    max_seq_len: int = _ranged(MISSING, Range(low=8, integer=True, note="a chat template alone takes a few tokens"))
    packing: Packing = Packing.none
    gradient_clip_val: Optional[float] = _ranged(None, Range(low=0, low_open=True, nullable=True,
                                                             note="null: no clipping"))
    seed: int = _ranged(0, SEED)
    on_nonfinite: OnNonFinite = OnNonFinite.stop
    optimizer: Any = field(default=MISSING, metadata={"ranges": {
        "lr": POSITIVE, "weight_decay": NON_NEGATIVE, "eps": POSITIVE, "momentum": NON_NEGATIVE}})
    scheduler: Any = None


@dataclass
class SourceSchema:
    path: Optional[str] = None  # required for a single task; a mixture's own node has none
    subset: Optional[str] = None
    splits: dict[str, Optional[str]] = field(default_factory=dict)
    val_size: Optional[float] = _ranged(None, SPLIT_SIZE)
    test_size: Optional[float] = _ranged(None, SPLIT_SIZE)
    train_size: Optional[float] = None  # keep a seeded subset of train (sample-efficiency curves)


@dataclass
class DatasetSchema:
    name: str = MISSING
    source: SourceSchema = field(default_factory=SourceSchema)
    # A `_target_` node naming the format function (conf/dataset/format/), called per row.
    format: Any = field(default_factory=lambda: {"_target_": "tunelab.data.formats.prompt_completion",
                                                 "_partial_": True})
    column_map: dict[str, str] = field(default_factory=dict)
    templates: list[Any] = field(default_factory=list)
    # A name of conf/chat_template/ (chatml, alpaca, plain), inline Jinja, or null for the tokenizer's own.
    chat_template: Optional[str] = None
    system_prompt: Optional[str] = None
    train_on_prompt: bool = False
    overlength: Overlength = Overlength.error
    on_bad_row: OnBadRow = OnBadRow.error
    max_bad_fraction: float = _ranged(0.05, FRACTION)
    metrics: dict[str, Any] = field(default_factory=dict)
    corpus_metrics: dict[str, Any] = field(default_factory=dict)  # (answers, references) -> float, e.g. macro-F1
    # The answer options of a classification task, for rank classification (decoding=choices).
    choices: Optional[list[str]] = None
    # The longest answer generated when this task is scored (null: decoding.max_new_tokens); a task whose
    # references run past the decoding default sets it, so its answers are not cut short (brand_replies: 96).
    max_new_tokens: Optional[int] = _ranged(None, Range(low=1, integer=True, nullable=True,
                                                        note="null: decoding.max_new_tokens"))
    # A mixture names tasks (each a dataset config like this one) and their sampling weights.
    tasks: dict[str, Any] = field(default_factory=dict, metadata={"each_like_parent": True})
    weights: dict[str, float] = field(default_factory=dict, metadata={"ranges": {"*": NON_NEGATIVE}})
    samples_per_epoch: Optional[int] = _ranged(None, Range(low=1, integer=True, nullable=True))


@dataclass
class EvalSchema:
    baseline: bool = True
    test: bool = True
    generate_on_val: bool = True
    max_eval_samples: Optional[int] = _ranged(None, Range(low=1, integer=True, nullable=True, note="null: all"))


def dataset_spec(node: Any) -> DatasetSchema:
    """A dataset config (a mixture's tasks too) as the typed, validated object, defaults applied once."""
    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    spec: DatasetSchema = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DatasetSchema), plain))
    spec.tasks = {name: dataset_spec(task) for name, task in spec.tasks.items()}
    return spec


SCHEMAS: dict[str, type] = {"hyperparams": HyperparamsSchema, "dataset": DatasetSchema, "eval": EvalSchema}


def schema_ranges(schema: type, prefix: str, nested: bool = True) -> Iterator[tuple[str, Range]]:
    """(key pattern, range) of every ranged field of `schema` under `prefix`, in field order: nested schemas,
    the keys inside untyped nodes, and (one level deep) the nodes of the same schema a field holds."""
    for item in fields(schema):
        key = f"{prefix}.{item.name}"
        if "range" in item.metadata:
            yield key, item.metadata["range"]
        for sub, allowed in item.metadata.get("ranges", {}).items():
            yield f"{key}.{sub}", allowed
        if item.metadata.get("each_like_parent") and nested:  # `*` spans dots: deeper nodes match too
            yield from schema_ranges(schema, f"{key}.*", nested=False)
        default = item.default_factory() if callable(item.default_factory) else None
        if is_dataclass(default):
            yield from schema_ranges(type(default), key, nested)
