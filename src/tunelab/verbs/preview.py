"""`tunelab data preview dataset=...`: tokenised samples with supervised tokens marked, and length percentiles.

What the model is trained on is the labels, not the text; this shows them. Supervised tokens are
green (or wrapped in [[...]] without a colour terminal); prompt tokens are dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from tunelab.config.build import build
from tunelab.data.datamodule import Collator, EpochSampler
from tunelab.data.encode import IGNORE, Encoded
from tunelab.data.packing import RowSampler
from tunelab.errors import ConfigError
from tunelab.job import RunContext, verb


def marked(tokenizer: object, item: Encoded, colour: bool) -> Text:
    """The example's text, token by token, supervised spans highlighted (or bracketed)."""
    text = Text()
    supervised_prev = False
    for position, token in enumerate(item.input_ids):
        piece = tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        supervised = position > 0 and item.labels[position] != IGNORE
        if not colour and supervised != supervised_prev:
            text.append("[[" if supervised else "]]")
        text.append(piece, style=("bold green" if supervised else "dim") if colour else None)
        supervised_prev = supervised
    if not colour and supervised_prev:
        text.append("]]")
    return text


def percentiles(values: list[int]) -> dict[str, float]:
    data = torch.tensor(values, dtype=torch.float64)
    return {f"p{q}": float(torch.quantile(data, q / 100)) for q in (50, 90, 95, 99)} | {"max": float(data.max())}


@verb(validate=True)
def preview(cfg: DictConfig, run: RunContext, console: Console | None = None
            ) -> dict[str, dict[str, float]]:
    """Print samples and length statistics of every split; return the statistics."""
    console = console or Console()
    tokenizer = build(cfg.tokenizer)
    datamodule = build(cfg.datamodule, tokenizer=tokenizer, cache_dir=None, _convert_="all")
    datamodule.setup()
    task = cfg.preview.task or next(iter(datamodule.tasks))
    if task not in datamodule.splits:
        raise ConfigError(f"no task {task!r} in this dataset", "key preview.task",
                          f"tasks: {', '.join(datamodule.splits)}")
    items = datamodule.splits[task][cfg.preview.split][: cfg.preview.samples]
    for number, item in enumerate(items):
        console.rule(f"{task} / {cfg.preview.split} #{number}: {item.origin}")
        console.print(marked(tokenizer, item, console.is_terminal))
        console.print(f"[dim]{len(item.input_ids)} tokens, {item.supervised} supervised[/]")
    columns = ("split", "examples", "supervised", "p50", "p90", "p95", "p99", "max", "pad % padded", "pad % packed",
               "pad % dataset")
    cells: list[list[str]] = []
    stats = {}
    for split, examples in datamodule.splits[task].items():
        lengths = [len(e.input_ids) for e in examples]
        stats[split] = percentiles(lengths)
        max_len, size = cfg.hyperparams.max_seq_len, cfg.hyperparams.batch_size
        # What each hyperparams.packing mode would pad (dataset: epoch 0's rows, batch_size rows per micro-batch).
        rows = RowSampler(EpochSampler(len(examples), cfg.hyperparams.seed), lengths, max_len, cfg.hyperparams.seed)
        units = {"none": examples, "batch": examples, "dataset": [[examples[i] for i in row] for row in rows.rows(0)]}
        pads = []
        for pack, items in units.items():
            collate = Collator(tokenizer.pad_token_id, False, pack, max_len)
            batches = [collate(items[i: i + size]) for i in range(0, len(items), size)]
            pads.append(sum(b["pad_fraction"] * b["input_ids"].numel() for b in batches)
                        / sum(b["input_ids"].numel() for b in batches))
        stats[split].update(pad_padded=pads[0], pad_packed=pads[1], pad_dataset=pads[2])
        cells.append([split, str(len(examples)), str(sum(e.supervised for e in examples)),
                      *(f"{stats[split][k]:.0f}" for k in ("p50", "p90", "p95", "p99", "max")),
                      *(f"{100 * pad:.1f}" for pad in pads)])
    console.print(lengths_table(f"token lengths ({task})", columns, cells, console.width))
    return stats


def lengths_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], width: int) -> Table:
    """The statistics one split a row; where that does not fit `width` whole (11 columns need ~100 characters),
    one split a column and one figure a row, so no header or split name is ever cut (rich would cut them to
    `exam…`, `vali…` at 80 columns)."""
    wide = Table(title=title)
    for column in columns:
        wide.add_column(column, justify="right", no_wrap=True)
    for row in rows:
        wide.add_row(*row)
    if Measurement.get(Console(width=10_000), Console(width=10_000).options, wide).maximum <= width:
        return wide
    tall = Table(title=title)
    tall.add_column(columns[0], no_wrap=True)
    for row in rows:
        tall.add_column(row[0], justify="right", no_wrap=True)
    for i, column in enumerate(columns[1:], start=1):
        tall.add_row(column, *(row[i] for row in rows))
    return tall

