"""Packing vs padding on the bundled reviews: real tokens per second and padding fraction, side by side.

Same model, same examples, same order; only the collation differs. Each configuration runs the same
number of optimizer steps (forward + backward + AdamW) after warm-up steps that are not timed.

    .venv/bin/python bench/packing.py [--steps 30] [--batch-size 32] [--max-seq-len 256]
"""

from __future__ import annotations

import argparse
import time

import torch

from tunelab.config import compose
from tunelab.data.datamodule import Collator, TuneDataModule
from tunelab.data.packing import block_causal_mask
from tunelab.models import load_causal_lm, load_tokenizer
from tunelab.module import summed_token_loss


def run(packing: bool, steps: int, batch_size: int, max_seq_len: int, warmup: int = 3) -> dict[str, float]:
    cfg = compose(return_hydra_config=False)
    tokenizer = load_tokenizer(str(cfg.model.name_or_path))
    dm = TuneDataModule(cfg.dataset, tokenizer, batch_size=batch_size, max_seq_len=max_seq_len, seed=0)
    dm.setup()
    examples = dm.splits["reviews_sentiment"]["train"]
    collate = Collator(tokenizer.pad_token_id, False, packing, max_seq_len)
    batches = [collate(examples[i * batch_size: (i + 1) * batch_size]) for i in range(steps + warmup)]
    torch.manual_seed(0)
    model = load_causal_lm(str(cfg.model.name_or_path), random_init=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = cells = 0
    start = 0.0
    for step, batch in enumerate(batches):
        if step == warmup:
            start = time.perf_counter()
        if packing:
            mask = block_causal_mask(batch["segment_ids"], torch.float32)
            out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"])
        else:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss, n = summed_token_loss(out.logits, batch["labels"])
        (loss / n).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= warmup:
            tokens += batch["n_tokens"]
            cells += batch["input_ids"].numel()
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": tokens / elapsed, "pad_fraction": 1 - tokens / cells, "rows_per_step": cells / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    padded = run(False, args.steps, args.batch_size, args.max_seq_len)
    packed = run(True, args.steps, args.batch_size, args.max_seq_len)
    print("| collation | real tokens/s | padding | ratio vs padded |")
    print("|---|---|---|---|")
    for name, result in (("padded", padded), ("packed", packed)):
        print(f"| {name} | {result['tokens_per_s']:.0f} | {100 * result['pad_fraction']:.1f}% | "
              f"{result['tokens_per_s'] / padded['tokens_per_s']:.2f} |")


if __name__ == "__main__":
    main()
