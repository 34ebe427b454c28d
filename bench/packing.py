"""Padded vs batch-packed vs dataset-packed: real tokens per second and padding, side by side, on two datasets.

Datasets: the bundled reviews (short, similar lengths) and a heavy-tailed set generated into a temporary
directory by data/make_heavy_tail.py (most examples short, a few at max_seq_len). For each, the same
`--examples` training examples (epoch 0's seeded order) go through forward + backward + AdamW three ways;
only the collation differs:

- padded (`hyperparams.packing=none`): micro-batches of `--batch-size` examples, each padded to its longest;
- batch (`packing=batch`): the same micro-batches, each binned into rows of max_seq_len (first-fit decreasing);
- dataset (`packing=dataset`): all the examples binned into rows of max_seq_len (RowSampler: best-fit
  decreasing over the epoch, rows shuffled), `rows` rows per micro-batch, rows = ceil(batch_size x mean
  length / max_seq_len) so a step holds about as many real tokens as a padded step.

Packed rows get the 4D block-diagonal mask the module builds (sdpa). Two untimed warm-up steps on other
examples precede the timed ones; the three collations' steps interleave, and real tokens/s counts the
process's CPU time (the machine is shared: wall clock is printed beside it). A second table compares
packing algorithms on padding alone (no model).

    .venv/bin/python bench/packing.py [--examples 512] [--batch-size 32] [--max-seq-len 256]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tunelab.config.compose import compose
from tunelab.data.datamodule import Collator, EpochSampler, TuneDataModule
from tunelab.data.encode import Encoded
from tunelab.data.packing import RowSampler, best_fit_decreasing, block_causal_mask, first_fit_decreasing
from tunelab.models.load import load_causal_lm, load_tokenizer
from tunelab.objectives.sft import summed_token_loss

REPO = Path(__file__).resolve().parents[1]
MODES = ("none", "batch", "dataset")  # hyperparams.packing


def heavy_tail(out: Path) -> Path:
    """data/make_heavy_tail.py's default set, written under `out`."""
    spec = importlib.util.spec_from_file_location("make_heavy_tail", REPO / "data" / "make_heavy_tail.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write(out / "heavy_tail")


def train_examples(overrides: list[str], max_seq_len: int) -> tuple[list[Encoded], int]:
    """A dataset's training examples in epoch 0's order (seed 0), and the tokenizer's pad id."""
    cfg = compose(overrides, return_hydra_config=False)
    tokenizer = load_tokenizer(str(cfg.model.name_or_path))
    dm = TuneDataModule(cfg.dataset, tokenizer, max_seq_len=max_seq_len, seed=0)
    dm.setup()
    examples = dm.splits[cfg.dataset.name]["train"]
    return [examples[i] for i in EpochSampler(len(examples), 0).indices(0)], tokenizer.pad_token_id


def micro_batches(mode: str, examples: list[Encoded], pad_id: int, batch_size: int, rows: int,
                  max_seq_len: int) -> list[dict]:
    collate = Collator(pad_id, False, mode, max_seq_len)
    if mode != "dataset":
        return [collate(examples[i: i + batch_size]) for i in range(0, len(examples), batch_size)]
    sampler = RowSampler(EpochSampler(len(examples), 0), [len(e.input_ids) for e in examples], max_seq_len, 0)
    packed = [[examples[i] for i in row] for row in sampler.rows(0)]
    return [collate(packed[i: i + rows]) for i in range(0, len(packed), rows)]


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> None:
    if "segment_ids" in batch:
        mask = block_causal_mask(batch["segment_ids"], torch.float32)
        out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"])
    else:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss, n = summed_token_loss(out.logits, batch["labels"])
    (loss / n).backward()
    optimizer.step()
    optimizer.zero_grad()


def run(examples: list[Encoded], warmup: list[Encoded], pad_id: int, model_path: str, batch_size: int, rows: int,
        max_seq_len: int) -> dict[str, dict[str, float]]:
    """The three collations on the same examples, each with its own copy of the same initial model. Their steps
    interleave (one of each in turn) so load from other processes falls on all three alike; the time of a
    step is the process's CPU time (one thread), which other processes' load does not inflate."""
    batches, models = {}, {}
    for mode in MODES:
        torch.manual_seed(0)
        model = load_causal_lm(model_path, random_init=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for batch in micro_batches(mode, warmup, pad_id, batch_size, rows, max_seq_len)[:2]:
            step(model, optimizer, batch)
        models[mode] = (model, optimizer)
        batches[mode] = micro_batches(mode, examples, pad_id, batch_size, rows, max_seq_len)
    seconds = dict.fromkeys(MODES, 0.0)
    wall = dict.fromkeys(MODES, 0.0)
    for index in range(max(len(b) for b in batches.values())):
        for mode in MODES:
            if index < len(batches[mode]):
                start, start_wall = time.process_time(), time.perf_counter()
                step(*models[mode], batches[mode][index])
                seconds[mode] += time.process_time() - start
                wall[mode] += time.perf_counter() - start_wall
    out = {}
    for mode in MODES:
        tokens = sum(b["n_tokens"] for b in batches[mode])
        cells = sum(b["input_ids"].numel() for b in batches[mode])
        out[mode] = {"tokens_per_s": tokens / seconds[mode], "wall_tokens_per_s": tokens / wall[mode],
                     "pad_fraction": 1 - tokens / cells, "steps": len(batches[mode])}
    return out


def row_mates(rows: list[list[int]]) -> set[tuple[int, int]]:
    return {(a, b) for row in rows for a in row for b in row if a < b}


def algorithms(examples: list[Encoded], max_seq_len: int) -> list[tuple[str, str, str, str]]:
    """Padding of packing algorithms over one dataset's epochs (no model): fill of the rows, rows per epoch over
    three epochs, and the share of epoch 0's row-mate pairs that share a row again in epoch 1."""
    lengths = [len(e.input_ids) for e in examples]
    total = sum(lengths)

    def epoch_order(epoch: int) -> list[int]:
        return EpochSampler(len(examples), 0).indices(epoch)

    def whole(pack: Callable[[list[int], int], list[list[int]]]) -> Callable[[list[int]], list[list[int]]]:
        return lambda order: [[order[j] for j in b] for b in pack([lengths[i] for i in order], max_seq_len)]

    def windows(size: int):
        def pack(order: list[int]) -> list[list[int]]:
            out = []
            for start in range(0, len(order), size):
                chunk = order[start: start + size]
                out += [[chunk[j] for j in b] for b in best_fit_decreasing([lengths[i] for i in chunk], max_seq_len)]
            return out
        return pack

    table = []
    for name, pack in (("first-fit decreasing, whole epoch", whole(first_fit_decreasing)),
                       ("best-fit decreasing, whole epoch (tunelab)", whole(best_fit_decreasing)),
                       ("best-fit decreasing, windows of 1024", windows(1024)),
                       ("best-fit decreasing, windows of 256", windows(256))):
        epochs = [pack(epoch_order(e)) for e in range(3)]
        counts = sorted(len(r) for r in epochs)
        fill = total / (len(epochs[0]) * max_seq_len)
        first = row_mates(epochs[0])
        again = len(first & row_mates(epochs[1])) / max(len(first), 1)
        table.append((name, f"{100 * fill:.1f}%", f"{counts[0]}" if counts[0] == counts[-1]
                      else f"{counts[0]}-{counts[-1]}", f"{100 * again:.1f}%"))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=512, help="timed training examples per dataset")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per padded micro-batch")
    parser.add_argument("--max-seq-len", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        datasets = {
            "reviews": ["dataset=reviews_sentiment"],
            "heavy-tailed": ["dataset=instructions_general", f"dataset.source.path={heavy_tail(Path(tmp))}",
                             "dataset.overlength=truncate"],
        }
        model_path = str(compose([], return_hydra_config=False).model.name_or_path)
        results, packers = {}, {}
        for name, overrides in datasets.items():
            examples, pad_id = train_examples(overrides, args.max_seq_len)
            timed, warmup = examples[: args.examples], examples[args.examples: args.examples + 4 * args.batch_size]
            mean = sum(len(e.input_ids) for e in timed) / len(timed)
            rows = math.ceil(args.batch_size * mean / args.max_seq_len)
            results[name] = (rows, mean, run(timed, warmup, pad_id, model_path, args.batch_size, rows,
                                             args.max_seq_len))
            packers[name] = algorithms(examples, args.max_seq_len)
    print(f"{args.examples} examples per dataset, max_seq_len {args.max_seq_len}, torch threads "
          f"{torch.get_num_threads()}\n")
    print("| dataset | collation | micro-batch | steps | real tokens/s | (wall clock) | padding | ratio vs padded |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (rows, mean, by_mode) in results.items():
        base = by_mode["none"]["tokens_per_s"]
        for mode, label, unit in (("none", "padded", f"{args.batch_size} examples"),
                                  ("batch", "batch-packed", f"{args.batch_size} examples"),
                                  ("dataset", "dataset-packed", f"{rows} rows")):
            r = by_mode[mode]
            print(f"| {name} (mean {mean:.0f} tokens) | {label} | {unit} | {r['steps']} | {r['tokens_per_s']:.0f} | "
                  f"{r['wall_tokens_per_s']:.0f} | {100 * r['pad_fraction']:.1f}% | {r['tokens_per_s'] / base:.2f} |")
    print("\n| dataset | packing algorithm | rows filled | rows per epoch (3 epochs) | row-mates again next epoch |")
    print("|---|---|---|---|---|")
    for name, table in packers.items():
        for row in table:
            print(f"| {name} | " + " | ".join(row) + " |")
    lengths = [len(e.input_ids) for e in examples]
    many = random.Random(0).choices(lengths, k=1_000_000)
    start = time.perf_counter()
    best_fit_decreasing(many, args.max_seq_len)
    print(f"\nbest_fit_decreasing on 1,000,000 {name} lengths: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
