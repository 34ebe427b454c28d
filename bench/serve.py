"""`tunelab serve` under load: requests/s and p50/p95 latency for 1 and 8 concurrent clients.

Starts the real server (a subprocess, as a user would) on the tiny run, sends greedy chat completions
of the bundled test prompts from client threads over plain HTTP, and reports per configuration:
requests/s, latency percentiles and completion tokens/s. The baseline, in the same invocation, is the
same prompts answered in-process by `model.generate` (no HTTP, no server): the server's overhead.

    .venv/bin/python bench/serve.py [--run <run dir>] [--requests 48] [--max-tokens 16] [--concurrency 1 8]

Without --run it first trains the tiny model for 60 steps (logger=none) into --out.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


def prompts(n: int) -> list[str]:
    rows = [json.loads(x) for x in (REPO / "data/reviews/test.jsonl").read_text().splitlines()]
    return [f"Is the following review positive or negative?\n\nTitle: {r['title']}\nReview: {r['text']}"
            for r in (rows * (n // len(rows) + 1))[:n]]


def train_run(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "tunelab.cli", "train", "hyperparams.max_steps=60", "logger=none",
           "eval.baseline=false", "eval.test=false", "eval.generate_on_val=false", f"hydra.run.dir={out}"]
    subprocess.run(cmd, check=True, env=ENV, stdout=subprocess.DEVNULL)
    return out


def start_server(run: Path, extra: list[str]) -> tuple[subprocess.Popen, str, int, str]:
    proc = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "serve", f"run={run}", "port=0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
    line = proc.stdout.readline()
    match = re.search(r"serving '([^']+)' on http://([\d.]+):(\d+)/v1", line)
    if not match:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    host, port = match.group(2), int(match.group(3))
    for _ in range(600):
        try:
            conn = http.client.HTTPConnection(host, port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                break
        except OSError:
            time.sleep(0.1)
    return proc, host, port, match.group(1)


def chat(host: str, port: int, body: dict) -> tuple[float, int, str]:
    """One request on its own connection: (seconds, completion tokens, answer)."""
    data = json.dumps(body).encode()
    start = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body=data, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = json.loads(response.read())
    elapsed = time.perf_counter() - start
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {payload}")
    return elapsed, payload["usage"]["completion_tokens"], payload["choices"][0]["message"]["content"]


def load(host: str, port: int, model: str, texts: list[str], clients: int, max_tokens: int) -> dict[str, Any]:
    bodies = [{"model": model, "messages": [{"role": "user", "content": t}], "temperature": 0,
               "max_tokens": max_tokens} for t in texts]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda b: chat(host, port, b), bodies))
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {"requests_per_s": len(results) / wall, "p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
            "tokens_per_s": tokens / wall, "mean_tokens": tokens / len(results), "answers": [r[2] for r in results]}


def in_process(run: Path, texts: list[str], max_tokens: int) -> dict[str, Any]:
    """The baseline: the same greedy answers from `model.generate` in this process, one after the other."""
    import torch

    from tunelab.models.load import load_run

    model, tokenizer, _ = load_run(run)
    latencies, tokens, answers = [], 0, []
    for text in texts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_dict=True, return_tensors="pt")
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        latencies.append(time.perf_counter() - start)
        tokens += out.shape[1] - ids["input_ids"].shape[1]
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    wall = sum(latencies)
    latencies.sort()
    return {"requests_per_s": len(texts) / wall, "p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
            "tokens_per_s": tokens / wall, "mean_tokens": tokens / len(texts), "answers": answers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None, help="a run directory (default: train a tiny one)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-serve"))
    parser.add_argument("--requests", type=int, default=48, help="requests per configuration")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-concurrent", type=int, nargs="+", default=[1, 2],
                        help="server settings to compare (generations at once)")
    args = parser.parse_args()
    run = args.run or train_run(args.out / "run")
    texts = prompts(args.requests)
    rows = [("in-process generate (baseline)", "-", 1, in_process(run, texts, args.max_tokens))]
    for max_concurrent in args.max_concurrent:
        proc, host, port, model = start_server(run, [f"max_concurrent={max_concurrent}", "max_waiting=64"])
        try:
            load(host, port, model, texts[:4], 1, args.max_tokens)  # warm-up, not counted
            for clients in args.concurrency:
                rows.append(("tunelab serve", str(max_concurrent), clients,
                             load(host, port, model, texts, clients, args.max_tokens)))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"\n{args.requests} greedy chat completions per row, max_tokens {args.max_tokens}, "
          f"OMP_NUM_THREADS={threads}, {os.cpu_count()} CPUs, run {run}\n")
    print("| path | server max_concurrent | clients | requests/s | p50 latency (ms) | p95 latency (ms) "
          "| completion tokens/s | mean tokens | answers = baseline |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    expected = rows[0][3]["answers"]  # concurrent generations must not change a greedy answer
    for name, setting, clients, r in rows:
        same = sum(a == b for a, b in zip(r["answers"], expected, strict=True))
        print(f"| {name} | {setting} | {clients} | {r['requests_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} "
              f"| {r['tokens_per_s']:.0f} | {r['mean_tokens']:.1f} | {same}/{len(expected)} |")


if __name__ == "__main__":
    main()
