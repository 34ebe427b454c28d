"""What a number a user sets accepts (`Range`), and the ranges of keys no schema dataclass types.

The libraries raise deep inside building on values like `AdamW(lr=-1)`, `DataLoader(batch_size=0)` (a
traceback minutes into a run, or worse, a run that "succeeds" on nothing: `epochs=0`, `lr=0`). The keys of
tunelab's own value nodes carry their range beside their type, as field metadata in `config/schema.py`; the
arguments of library `_target_`s (trainer, callbacks, PEFT, decoding) and the verbs' own options have no
dataclass, so their ranges are listed here by key pattern. `check_ranges` reads both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """What a numeric key accepts: bounds (inclusive unless `open`), whole numbers only, null, extra values."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    nullable: bool = False
    also: tuple[Any, ...] = ()  # special values outside the bounds (-1 for "no limit")
    words: tuple[str, ...] = ()  # strings the key also takes (trainer.devices=auto)
    whole_above_one: bool = False  # a fraction in the bounds, or above 1 a whole count
    booleans: bool = False  # true/false also accepted (trainer.fast_dev_run)
    lists: bool = False  # a list also accepted (trainer.devices=[0, 1])
    note: str = ""  # what the special values mean, for the hint

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, bool):
            return self.booleans
        if isinstance(value, (list, tuple)):
            return self.lists
        if isinstance(value, str):
            return value in self.words
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if value in self.also:
            return True
        if not math.isfinite(value) or (self.integer and not isinstance(value, int)):
            return False
        if self.whole_above_one and value > 1:
            return isinstance(value, int)
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.whole_above_one:
            text = f"a fraction in {'(' if self.low_open else '['}{_num(self.low or 0)}, 1] or a whole count >= 1"
        elif self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"{kind} in {left}{_num(self.low)}, {_num(self.high)}{right}"
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {_num(self.low)}"
        elif self.high is not None:
            text = f"{kind} {'<' if self.high_open else '<='} {_num(self.high)}"
        else:
            text = kind
        extras = [repr(a) for a in self.also] + list(self.words) + (["true/false"] if self.booleans else []) + (
            ["a list"] if self.lists else []) + (["null"] if self.nullable else [])
        return text + (f", or {' or '.join(extras)}" if extras else "") + (f" ({self.note})" if self.note else "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


POSITIVE = Range(low=0, low_open=True)
NON_NEGATIVE = Range(low=0)
AT_LEAST_ONE = Range(low=1, integer=True)
FRACTION = Range(low=0, high=1)
SEED = Range(low=0, high=2**32 - 1, integer=True)  # numpy's seed range; Lightning seeds numpy with it
SPLIT_SIZE = Range(low=0, low_open=True, whole_above_one=True, nullable=True)  # a fraction, or a count of rows
DECODING = ("decoding",)  # the one decoding group (train, generate, eval, serve)

# key pattern (fnmatch over dotted paths; `*` spans dots) -> what it accepts, for keys without a schema
# dataclass. Checked after the schemas' ranges: a bad hyperparams.epochs is reported under its own name,
# not as the trainer.max_epochs it is interpolated into.
RANGES_WITHOUT_SCHEMA: dict[str, Range] = {
    "trainer.max_epochs": Range(low=1, integer=True, also=(-1,), nullable=True),
    "trainer.max_steps": Range(low=1, integer=True, also=(-1,)),
    "trainer.accumulate_grad_batches": AT_LEAST_ONE,
    "trainer.gradient_clip_val": Range(low=0, low_open=True, nullable=True),
    "trainer.val_check_interval": Range(low=0, low_open=True, whole_above_one=True, nullable=True,
                                        note="a fraction of an epoch, or every N training batches"),
    "trainer.check_val_every_n_epoch": Range(low=1, integer=True, nullable=True),
    "trainer.log_every_n_steps": AT_LEAST_ONE,
    "trainer.num_sanity_val_steps": Range(low=0, integer=True, also=(-1,), note="-1: all"),
    "trainer.devices": Range(low=1, integer=True, also=(-1,), words=("auto", "-1"), lists=True,
                           note="-1 or auto: all"),
    "trainer.num_nodes": AT_LEAST_ONE,
    "trainer.overfit_batches": Range(low=0, whole_above_one=True),
    "trainer.limit_*_batches": Range(low=0, whole_above_one=True, nullable=True),
    "trainer.fast_dev_run": Range(low=0, integer=True, booleans=True),
    "callbacks.*.every_n_train_steps": Range(low=0, integer=True, nullable=True),
    "callbacks.*.every_n_epochs": Range(low=0, integer=True, nullable=True),
    "callbacks.*.save_top_k": Range(low=0, integer=True, also=(-1,), note="-1: keep all"),
    "callbacks.*.every_n_steps": Range(low=1, integer=True, nullable=True, note="null: no step interval"),
    "callbacks.*.every_minutes": Range(low=0, low_open=True, nullable=True, note="null: no time interval"),
    "callbacks.*.keep_last": AT_LEAST_ONE,
    "callbacks.*.refresh_rate": Range(low=0, integer=True),
    "callbacks.*.terminal_refresh_s": Range(low=0),
    "callbacks.*.window": AT_LEAST_ONE,
    "callbacks.*.peak_tflops": Range(low=0, low_open=True, nullable=True, note="null: from the GPU's name"),
    "method.peft.r": AT_LEAST_ONE,
    "method.peft.lora_alpha": POSITIVE,
    "method.peft.lora_dropout": Range(low=0, high=1, high_open=True),
    "method.peft.num_virtual_tokens": AT_LEAST_ONE,
    "method.freeze.last_n_layers": Range(low=0, integer=True),
    **{f"{group}.max_new_tokens": AT_LEAST_ONE for group in DECODING},
    **{f"{group}.temperature": POSITIVE for group in DECODING},
    **{f"{group}.top_p": Range(low=0, high=1, low_open=True) for group in DECODING},
    **{f"{group}.top_k": Range(low=0, integer=True, note="0: no top-k cut") for group in DECODING},
    **{f"{group}.repetition_penalty": POSITIVE for group in DECODING},
    **{f"{group}.num_beams": AT_LEAST_ONE for group in DECODING},
    "seed": SEED,  # `tunelab generate seed=...`
    "template": Range(low=0, integer=True),  # `tunelab generate template=...`
    # `tunelab eval` (and each arm of `tunelab compare`)
    "max_samples": Range(low=1, integer=True, nullable=True),
    "batch_size": Range(low=1, integer=True, nullable=True),
    "max_prompt_tokens": Range(low=1, integer=True, nullable=True),
    "prompting.k": Range(low=0, integer=True),
    "prompting.depth": AT_LEAST_ONE,  # passages ranked per question for recall@k and MRR
    # `tunelab train-retriever`
    "max_pairs": Range(low=1, integer=True, nullable=True),
    "max_eval_samples": Range(low=1, integer=True, nullable=True),
    "depth": AT_LEAST_ONE,
    "bootstrap.resamples": AT_LEAST_ONE,
    "bootstrap.confidence": Range(low=0, high=1, low_open=True, high_open=True),
    # `tunelab serve ...`
    "port": Range(low=0, high=65535, integer=True, note="0: any free port"),
    "max_tokens": AT_LEAST_ONE,
    "max_concurrent": AT_LEAST_ONE,
    "max_waiting": Range(low=0, integer=True),
    "max_request_bytes": AT_LEAST_ONE,
    "max_batch_size": Range(low=1, high=256, integer=True),
    "batch_window_ms": Range(low=0, high=1000),
    "threads": Range(low=1, high=1024, integer=True, nullable=True, note="null: torch's own"),
    "graceful_timeout_s": NON_NEGATIVE,
}
