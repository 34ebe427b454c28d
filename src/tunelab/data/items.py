"""The one row loop: a dataset config's rows → examples, with the bad-row policy, for every consumer.

Training (`datamodule.encode_task`: examples tokenised and masked), eval and compare
(`evaluation.prompting.load_samples`: examples as prompts) and pipelines (both) all read a dataset here, so
a row is formatted the same way everywhere (the same column map, the same format function, the same
sandboxed templates, the same row index drawing the same template) and a bad row is treated the same way:
an error (exit 3, `file:line: field: problem`) unless `on_bad_row: skip`, which drops it, reports how many
and which lines, and still fails past `max_bad_fraction`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Generic, TypeVar

from tunelab.config.build import build
from tunelab.config.schema import DatasetSchema, OnBadRow, dataset_spec
from tunelab.data.formats import Example, Format, RowContext, compile_templates
from tunelab.data.sources import load_splits
from tunelab.errors import DataError

log = logging.getLogger(__name__)

T = TypeVar("T")
# (row fields after the column map, the formatted example) -> the item, or None to drop it (counted, not bad)
MakeItem = Callable[[dict[str, Any], Example], "T | None"]


@dataclass
class SplitItems(Generic[T]):
    """One split's items and what was left out of it: dropped by `make` (e.g. over-length) or bad rows."""

    items: list[T]
    rows: int
    where: str  # the split's file, for messages
    dropped: int = 0
    bad: list[str] = field(default_factory=list)  # `file:line: problem` of each skipped bad row


def build_items(dataset: DatasetSchema | Mapping[str, Any], seed: int, make: MakeItem[T],
                splits: Mapping[str, Any] | None = None) -> dict[str, SplitItems[T]]:
    """Every split of one dataset config (or those `splits` keeps) as items made by `make` from each row.

    `splits` overrides `source.splits` (a split named with None is not loaded: scoring never needs train).
    """
    spec = dataset if isinstance(dataset, DatasetSchema) else dataset_spec(dataset)
    templates = compile_templates(spec.templates)
    to_example: Format = build(spec.format)
    skip_bad = spec.on_bad_row == OnBadRow.skip
    source = asdict(spec.source)
    if splits:
        source["splits"] = {**(source.get("splits") or {}), **splits}
    out: dict[str, SplitItems[T]] = {}
    for split, rows in load_splits(source, seed).items():
        where = rows[0].origin.rsplit(":", 1)[0] if rows else spec.source.path
        part: SplitItems[T] = SplitItems([], len(rows), where)
        for index, row in enumerate(rows):
            try:
                if row.error:
                    raise DataError(row.error)
                fields = {spec.column_map.get(k, k): v for k, v in row.fields.items()}
                example = to_example(fields, RowContext(row.origin, index, seed, templates, spec.system_prompt))
                item = make(fields, example)
            except DataError as err:
                if not skip_bad:
                    raise
                part.bad.append(err.what)
                continue
            if item is None:
                part.dropped += 1
            else:
                part.items.append(item)
        _check_bad(part, spec.max_bad_fraction)
        out[split] = part
    return out


def _check_bad(part: SplitItems[Any], bound: float) -> None:
    """Warn about skipped rows; fail when more than `bound` of the split was bad."""
    bad = part.bad
    if not bad:
        return
    log.warning("%s: skipped %d bad rows of %d (on_bad_row=skip): %s", part.where, len(bad), part.rows,
                "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""))
    if len(bad) / max(part.rows, 1) > bound:
        raise DataError(
            f"{len(bad)} of {part.rows} rows are bad ({len(bad) / part.rows:.1%} > "
            f"max_bad_fraction={bound}); first: {bad[0]}", part.where,
            "fix the data, or raise dataset.max_bad_fraction if dropping them is intended",
        )
