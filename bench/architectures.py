"""Dense vs mixture of experts vs mixture of tokens on equal compute: pretrain each on the same tokens, then
fine-tune each on the same task, and compare.

    .venv/bin/python bench/architectures.py [--out outputs/bench-architectures] [--pretrain-steps 300]
        [--eval-samples 200] [--archs dense moe mot mot_transition] [--chart docs/architectures.png] [--parallel]

The three tiny models have the same attention, embeddings and width, and the same feed-forward compute per
token: dense `model=tiny` (one MLP of 512), `model=tiny_moe` (4 experts of 256, top 2) and `model=tiny_mot`
(the same 4 experts, token groups of 2: 4 expert calls per 2 tokens). Each is pretrained with
`experiment=pretrain_base` cut to --pretrain-steps (same seed, same documents in the same order; packing off,
since a router's batch statistics need a 2D mask), then fully fine-tuned on `reviews_sentiment` for one epoch.
`mot_transition` fine-tunes the pretrained MoT with `routing: sparse` (the paper's transition tuning: the
controller routes top-2 in training too), so it is trained in the form it decodes in.

Prints a markdown table (BENCHMARKS.md, README) and the commands; writes the chart and results.json. The MoT
rows also give the held-out perplexity with mixing on (training mode, batches of 16 documents) beside the
sparse form every eval and decode uses, from this script's own loop over the test split.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TUNELAB = Path(sys.executable).with_name("tunelab")
MODELS = {"dense": "tiny", "moe": "tiny_moe", "mot": "tiny_mot", "mot_transition": "tiny_mot"}
LABELS = {"dense": "dense (tiny)", "moe": "MoE (tiny_moe)", "mot": "MoT (tiny_mot)",
          "mot_transition": "MoT, transition-tuned"}


def tunelab_train(args: list[str], run: Path) -> tuple[dict, float]:
    start = time.perf_counter()
    done = subprocess.run([str(TUNELAB), "train", *args, "logger=csv", f"hydra.run.dir={run}"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"tunelab train {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads((run / "metrics.json").read_text()), time.perf_counter() - start


def peak_memory(run: Path) -> float | None:
    rows = list(csv.DictReader((run / "csv/metrics.csv").open())) if (run / "csv/metrics.csv").is_file() else []
    values = [float(r["perf/peak_mem_gb"]) for r in rows if r.get("perf/peak_mem_gb")]
    return max(values) if values else None


# transformers' from_pretrained is not thread-safe: loads made from two chains at once reported `lm_head.weight
# MISSING` and came back with an untied, freshly initialised head (2,410,176 parameters for the dense model); one
# load at a time gives the tied model (2,016,960). The training runs are subprocesses and were never affected.
LOAD_LOCK = threading.Lock()


def params(model_dir: Path) -> tuple[int, float]:
    """(total, active per token): experts count top-k / E of themselves (MoT: E / group size calls per token,
    which the configs make equal to top-k / E)."""
    from tunelab.models.load import load_causal_lm

    with LOAD_LOCK:
        model = load_causal_lm(str(model_dir))
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    share = getattr(config, "num_experts_per_tok", 1) / getattr(config, "num_local_experts", 1)
    return total, total - experts * (1 - share)


def heldout_ppl(model_dir: Path, mixing: bool, batch_size: int = 16) -> float:
    """Token-mean perplexity on corpus_general's test split, documents padded in batches of `batch_size`;
    `mixing` runs the model in training mode (a MoT then mixes the batch's rows; no model here has dropout)."""
    import torch
    import torch.nn.functional as F

    from tunelab.models.load import load_causal_lm, load_tokenizer

    with LOAD_LOCK:
        tokenizer, model = load_tokenizer(str(model_dir)), load_causal_lm(str(model_dir))
    model.train(mixing)
    docs = [json.loads(line)["text"] for line in (REPO / "data/corpus/general/test.jsonl").read_text().splitlines()]
    total = count = 0.0
    with torch.no_grad():
        for start in range(0, len(docs), batch_size):
            rows = [tokenizer(d)["input_ids"][:255] + [tokenizer.eos_token_id] for d in docs[start:start + batch_size]]
            width = max(map(len, rows))
            ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            total += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"))
            count += int((targets != -100).sum())
    return math.exp(total / count)


def run_arch(arch: str, out: Path, steps: int, eval_samples: int, pretrained: dict[str, Path],
             finetune_steps: int = -1, reuse: bool = False) -> dict:
    model = MODELS[arch]
    pre = out / f"pretrain-{model}"
    result: dict = {"arch": arch}
    if model not in pretrained:
        args = ["experiment=pretrain_base", f"model={model}", "hyperparams.packing=none",
                f"hyperparams.max_steps={steps}", "eval.baseline=false"]
        if reuse and (pre / "metrics.json").is_file() and (pre / "model").is_dir():  # --reuse: a finished pretraining
            metrics, wall = json.loads((pre / "metrics.json").read_text()), None
        else:
            metrics, wall = tunelab_train(args, pre)
        pretrained[model] = pre
        result.update(pretrain_command=args, pretrain_wall_s=wall, heldout_ppl=metrics.get("test/ppl"),
                      pretrain_tokens_per_s=metrics.get("perf/tokens_per_s"), pretrain_peak_gb=peak_memory(pre))
    else:  # mot_transition starts from the MoT pretrained above
        result["pretrain_of"] = "mot"
    base = pre / "model"
    if arch == "mot_transition":  # the same weights, routed sparsely in training too
        base = out / "mot-transition-base"
        shutil.copytree(pre / "model", base, dirs_exist_ok=True)
        config = json.loads((base / "config.json").read_text())
        (base / "config.json").write_text(json.dumps({**config, "routing": "sparse"}, indent=2))
    result["total_params"], result["active_params"] = params(base)
    if model == "tiny_mot" and arch == "mot":
        result["mot_ppl_mixing"], result["mot_ppl_sparse"] = heldout_ppl(base, True), heldout_ppl(base, False)
    fine = out / f"finetune-{arch}"
    args = [f"model={model}", f"model.name_or_path={base}", f"model.tokenizer_name_or_path={base}",
            "model.random_init=false", "dataset=reviews_sentiment", "hyperparams.epochs=1", "eval.baseline=false",
            "eval.generate_on_val=false", f"eval.max_eval_samples={eval_samples}",
            *([f"hyperparams.max_steps={finetune_steps}"] if finetune_steps > 0 else [])]
    metrics, wall = tunelab_train(args, fine)
    result.update(finetune_command=args, finetune_wall_s=wall, accuracy=metrics.get("test/accuracy"),
                  finetune_test_ppl=metrics.get("test/ppl"), finetune_tokens_per_s=metrics.get("perf/tokens_per_s"),
                  finetune_peak_gb=peak_memory(fine))
    return result


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: list[dict]) -> str:
    lines = ["| architecture | total params | active params / token | pretrain tokens/s | pretrain peak mem (GB) "
             "| held-out ppl | fine-tune tokens/s | sentiment test accuracy | task test ppl |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {LABELS[r['arch']]} | {r['total_params']:,} | {r['active_params']:,.0f} "
                     f"| {fmt(r.get('pretrain_tokens_per_s'), ',.0f')} | {fmt(r.get('pretrain_peak_gb'), '.2f')} "
                     f"| {fmt(r.get('heldout_ppl'), '.3f')} | {fmt(r.get('finetune_tokens_per_s'), ',.0f')} "
                     f"| {fmt(r.get('accuracy'), '.3f')} | {fmt(r.get('finetune_test_ppl'), '.3f')} |")
    return "\n".join(lines)


def chart(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [LABELS[r["arch"]].replace(" (", "\n(").replace(", ", ",\n") for r in results]
    panels = [("held-out ppl after pretraining (lower is better)", "heldout_ppl"),
              ("sentiment test accuracy after 1 epoch", "accuracy"),
              ("pretraining tokens/s (loaded machine: relative)", "pretrain_tokens_per_s")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (title, key) in zip(axes, panels, strict=True):
        values = [r.get(key) or 0.0 for r in results]
        ax.bar(names, values, color=["#4c72b0", "#dd8452", "#55a868", "#8fd19e"][:len(values)])
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        for i, (r, v) in enumerate(zip(results, values, strict=True)):  # no bar: a figure this row does not have
            label = f"{v:.3g}" if r.get(key) is not None else "MoT's" if "pretrain_of" in r else "-"
            ax.annotate(label, (i, v), ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "outputs/bench-architectures")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--finetune-steps", type=int, default=-1, help="cut the epoch short (a smoke run)")
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--archs", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--parallel", action="store_true", help="run the architectures side by side")
    parser.add_argument("--chart", type=Path, default=REPO / "docs/architectures.png")
    parser.add_argument("--reuse", action="store_true", help="keep the finished pretraining runs under --out")
    args = parser.parse_args()
    # One chain per pretrained model (mot_transition after mot, from its weights); with --parallel the chains run
    # side by side, so all architectures share one machine's load at the same time (tokens/s stay comparable).
    chains: dict[str, list[str]] = {}
    for arch in args.archs:
        chains.setdefault(MODELS[arch], []).append(arch)
    results: list[dict] = []

    def chain(archs: list[str]) -> None:
        pretrained: dict[str, Path] = {}
        for arch in archs:
            results.append(run_arch(arch, args.out, args.pretrain_steps, args.eval_samples, pretrained,
                                    args.finetune_steps, args.reuse))
            print(json.dumps(results[-1], default=str), flush=True)

    # transformers' lazy imports are not thread-safe (`cannot import name 'AutoConfig'` from a second thread, seen
    # here): resolve them once before the chains start.
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    with ThreadPoolExecutor(max_workers=len(chains) if args.parallel else 1) as pool:
        for done in [pool.submit(chain, archs) for archs in chains.values()]:
            done.result()
    results.sort(key=lambda r: list(MODELS).index(r["arch"]))  # table order whatever order they ran in
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(table(results))
    for r in results:
        if "mot_ppl_mixing" in r:
            print(f"\nMoT held-out ppl, this script's loop: mixing {r['mot_ppl_mixing']:.3f}, "
                  f"sparse (eval/decoding) {r['mot_ppl_sparse']:.3f}")
        for key in ("pretrain_command", "finetune_command"):
            if key in r:
                print(f"    tunelab train {' '.join(r[key])}")
    chart(results, args.chart)


if __name__ == "__main__":
    main()
