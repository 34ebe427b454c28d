"""`tunelab serve` under load: requests/s, p50/p95 latency and streams' time to first token for 1, 4, 8 and 32
concurrent clients with batching on and off; bfloat16 and int8 servers; `tunelab eval` answers/s per inference mode.

Starts the real server (a subprocess, as a user would) on the tiny run, sends greedy chat completions
of the bundled test prompts from client threads over plain HTTP, and reports per configuration:
requests/s, latency percentiles, completion tokens/s, and how many answers equal the baseline's. Each client
thread keeps its connection open between requests, as the OpenAI SDK's connection pool does (`--new-connections`:
one connection per request). The json rows of a server are measured `--rounds` times, the concurrencies
interleaved (1, 4, 8, 32, 1, 4, ...), so that a slow minute of a shared machine does not land on one row: a row's
requests/s is the median round's (the range is shown), its latencies pool every round's. The baseline,
in the same invocation, is the same prompts answered in-process by `model.generate` one at a time (no HTTP, no
server): the server's overhead. The inference rows add accuracy on the test labels; the eval rows run
`tunelab eval` on the whole test split (answers/s from its per-answer latency, test/accuracy).

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python bench/serve.py [--run <run dir>] [--requests 64]

Without --run it first trains the tiny model for 60 steps (logger=none) into --out. One command, one table.
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
import threading
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


_local = threading.local()  # each client thread's open connection per server (keep-alive)


def chat(host: str, port: int, body: dict, keep_alive: bool = True) -> tuple[float, int, str, float]:
    """One request: (seconds, completion tokens, answer, seconds to the first token), on the calling thread's
    open connection to this server (a new one if it has none, or with `keep_alive=False`).
    A streamed request counts its content chunks as tokens (one chunk per decoded piece: near enough)."""
    data = json.dumps(body).encode()
    start = time.perf_counter()
    conn = _local.__dict__.get((host, port)) if keep_alive else None
    if conn is None:
        conn = http.client.HTTPConnection(host, port, timeout=600)
        if keep_alive:
            _local.__dict__[(host, port)] = conn
    conn.request("POST", "/v1/chat/completions", body=data, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    if body.get("stream"):
        first, pieces = None, []
        for line in response:
            text = line.decode().strip()
            if not text.startswith("data: ") or text == "data: [DONE]":
                continue
            delta = json.loads(text[6:])["choices"][0]["delta"].get("content")
            if delta:
                first = first or time.perf_counter() - start
                pieces.append(delta)
        elapsed = time.perf_counter() - start
        return elapsed, len(pieces), "".join(pieces), first or elapsed
    payload = json.loads(response.read())
    elapsed = time.perf_counter() - start
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {payload}")
    return elapsed, payload["usage"]["completion_tokens"], payload["choices"][0]["message"]["content"], elapsed


def figures(latencies: list[float], wall: float, answers: list[str], tokens: int | None = None) -> dict[str, Any]:
    """A row's figures from its requests' latencies (seconds), the wall time they took together and their answers;
    completion tokens/s when `tokens` is known."""
    latencies = sorted(latencies)
    return {"requests_per_s": len(latencies) / wall, "p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
            "tokens_per_s": None if tokens is None else tokens / wall, "answers": answers, "latencies": latencies,
            "rounds": [len(latencies) / wall]}


def load(host: str, port: int, model: str, texts: list[str], clients: int, max_tokens: int,
         stream: bool = False, keep_alive: bool = True) -> dict[str, Any]:
    bodies = [{"model": model, "messages": [{"role": "user", "content": t}], "temperature": 0,
               "max_tokens": max_tokens, "stream": stream} for t in texts]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:  # new threads: each client opens its connection in the timed part
        results = list(pool.map(lambda b: chat(host, port, b, keep_alive), bodies))
    row = figures([r[0] for r in results], time.perf_counter() - start, [r[2] for r in results],
                  sum(r[1] for r in results))
    return {**row, "ttft_ms": 1000 * statistics.median(r[3] for r in results) if stream else None}


def pooled(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from repeated rounds: the median round's requests/s and tokens/s, every round's latencies and
    answers, the range of requests/s."""
    if len(rounds) == 1:
        return rounds[0]
    middle = sorted(rounds, key=lambda r: r["requests_per_s"])[(len(rounds) - 1) // 2]  # the lower of two middles
    every = figures([x for r in rounds for x in r["latencies"]], 1.0, [a for r in rounds for a in r["answers"]])
    return {**middle, "p50_ms": every["p50_ms"], "p95_ms": every["p95_ms"], "answers": every["answers"],
            "rounds": [r["requests_per_s"] for r in rounds]}


def in_process(run: Path, texts: list[str], max_tokens: int, threads: int) -> dict[str, Any]:
    """The baseline: the same greedy answers from tunelab's one generate loop in this process, one after the other,
    with as many torch threads as the servers get."""
    import torch

    torch.set_num_threads(threads)
    from tunelab.evaluation.evaluate import generate_tokens
    from tunelab.models.load import load_run

    model, tokenizer, _ = load_run(run)
    latencies, tokens, answers = [], 0, []
    for text in texts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_dict=True, return_tensors="pt")
        start = time.perf_counter()
        new = generate_tokens(model, tokenizer, ids["input_ids"], torch.ones_like(ids["input_ids"]),
                              {"max_new_tokens": max_tokens, "do_sample": False})[0]
        latencies.append(time.perf_counter() - start)
        tokens += len(new)
        answers.append(tokenizer.decode(new, skip_special_tokens=True))
    return figures(latencies, sum(latencies), answers, tokens)


def in_process_batcher(run: Path, texts: list[str], max_tokens: int, threads: int, sizes: list[int],
                       rounds: int) -> dict[int, dict[str, Any]]:
    """The server without HTTP: the same prompts submitted to the server's batcher (prefix cache on, as served) from
    1 or 8 threads in this process. Its 8-vs-1 ratio is what batching can give on this model and machine; the
    server's ratio can only be lower (every request also passes one event loop)."""
    import torch

    torch.set_num_threads(threads)
    from tunelab.data.encode import prompt_ids
    from tunelab.models.load import load_run
    from tunelab.serving.batching import Batcher
    from tunelab.serving.prefix_cache import PrefixCache
    from tunelab.serving.requests import Served

    model, tokenizer, _ = load_run(run)
    served = Served(model=model.eval(), tokenizer=tokenizer, model_id=run.name)
    batcher = Batcher(served, max_batch_size=32, window_s=0.005, prefixes=PrefixCache(served.model))
    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": t}]) for t in texts]
    settings = {"max_new_tokens": max_tokens, "do_sample": False}

    def one(ids: list[int]) -> tuple[float, str]:
        start = time.perf_counter()
        new, _ = batcher.submit(ids, settings).result()
        return time.perf_counter() - start, tokenizer.decode(new, skip_special_tokens=True)

    def measure(clients: int) -> dict[str, Any]:
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(one, prompts))
        return figures([r[0] for r in results], time.perf_counter() - start, [r[1] for r in results])

    measure(1)  # warm-up: learns the prefix, as the servers' warm-up does
    collected: dict[int, list[dict[str, Any]]] = {clients: [] for clients in sizes}
    for _ in range(rounds):
        for clients in sizes:
            collected[clients].append(measure(clients))
    return {clients: pooled(collected[clients]) for clients in sizes}


def accuracy(answers: list[str], labels: list[str]) -> float:
    return sum(a.strip().lower() == b for a, b in zip(answers, labels, strict=True)) / len(labels)


def eval_rows(run: Path, out: Path) -> list[tuple[str, dict[str, Any]]]:
    """`tunelab eval` on the whole test split per inference mode: answers/s (1 / mean latency per answer, batched
    by 32) and test/accuracy, from its metrics.json."""
    rows = []
    for name, extra in (("float32", []), ("bfloat16", ["inference.dtype=bfloat16"]),
                        ("int8", ["inference.quantize=int8"])):
        target = out / f"eval-{name}"
        subprocess.run([sys.executable, "-m", "tunelab.cli", "eval", f"run={run}", "logger=none", *extra,
                        f"hydra.run.dir={target}"], check=True, env=ENV, stdout=subprocess.DEVNULL)
        metrics = json.loads((target / "metrics.json").read_text())
        rows.append((name, {"answers_per_s": 1 / metrics["test/latency_s"], "accuracy": metrics["test/accuracy"],
                            "n": metrics["test/n"]}))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None, help="a run directory (default: train a tiny one)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-serve"))
    parser.add_argument("--requests", type=int, default=64, help="requests per configuration")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 32])
    parser.add_argument("--stream-concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--no-eval", action="store_true", help="skip the `tunelab eval` rows")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each server's json rows (median shown)")
    parser.add_argument("--new-connections", action="store_true",
                        help="one connection per request instead of one per client thread")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch threads of each server and of the in-process baseline (serve's threads=); "
                             "default: every core")
    args = parser.parse_args()
    run = args.run or train_run(args.out / "run")
    texts = prompts(args.requests)
    rows_data = [json.loads(x) for x in (REPO / "data/reviews/test.jsonl").read_text().splitlines()]
    labels = [r["sentiment"] for r in (rows_data * (args.requests // len(rows_data) + 1))[:args.requests]]
    began = time.strftime("%Y-%m-%d %H:%M:%S")
    load_before = os.getloadavg()
    rows = [("in-process generate (baseline)", "-", 1, "float32",
             in_process(run, texts, args.max_tokens, args.threads))]
    batched = in_process_batcher(run, texts, args.max_tokens, args.threads, [1, 8], args.rounds)
    rows.extend(("in-process batcher, no HTTP", "-", clients, "float32", r) for clients, r in batched.items())
    on = ["batching=true", "max_concurrent=32", "max_batch_size=32"]
    servers = [("batching on", on, "float32", True),
               ("batching on, prefix_cache off", [*on, "prefix_cache=false"], "float32", True),
               ("batching off (2 threads)", ["batching=false", "max_concurrent=2"], "float32", True),
               ("batching on", [*on, "inference.dtype=bfloat16"], "bfloat16", False),
               ("batching on", [*on, "inference.quantize=int8"], "int8", False)]
    for name, extra, dtype, sweep in servers:
        proc, host, port, model = start_server(run, [*extra, "max_waiting=64", f"threads={args.threads}"])
        keep = not args.new_connections
        try:
            load(host, port, model, texts[:4], 1, args.max_tokens)  # warm-up, not counted
            sizes = args.concurrency if sweep else [8]
            rounds: dict[int, list[dict[str, Any]]] = {clients: [] for clients in sizes}
            for _ in range(args.rounds if sweep else 1):
                for clients in sizes:
                    rounds[clients].append(load(host, port, model, texts, clients, args.max_tokens, keep_alive=keep))
            rows.extend((name, "json", clients, dtype, pooled(rounds[clients])) for clients in sizes)
            for clients in args.stream_concurrency if sweep else []:
                rows.append((name, "stream", clients, dtype,
                             load(host, port, model, texts, clients, args.max_tokens, stream=True, keep_alive=keep)))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    evals = [] if args.no_eval else eval_rows(run, args.out)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    connections = "one per request" if args.new_connections else "kept open by each client thread"
    print(f"\n{args.requests} greedy chat completions per row and round ({args.rounds} rounds of the json rows of "
          f"the float32 servers, interleaved), connections {connections}, max_tokens {args.max_tokens}, "
          f"OMP_NUM_THREADS={threads}, torch threads {args.threads}, {os.cpu_count()} CPUs, nice {os.nice(0)}, "
          f"run {run}; started {began}, "
          f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after\n")
    print("| path | response | clients | weights | requests/s | range over rounds | p50 latency (ms) "
          "| p95 latency (ms) | first token p50 (ms) | completion tokens/s | accuracy | answers = baseline |")
    print("|---|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|")
    expected = rows[0][4]["answers"]  # concurrent generations must not change a greedy answer
    for name, kind, clients, dtype, r in rows:
        wanted = expected * (len(r["answers"]) // len(expected))
        same = sum(a == b for a, b in zip(r["answers"], wanted, strict=True))
        ttft = "-" if r.get("ttft_ms") is None else f"{r['ttft_ms']:.0f}"
        spread = "-" if len(r.get("rounds", [])) < 2 else f"{min(r['rounds']):.1f}-{max(r['rounds']):.1f}"
        tokens = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}"
        print(f"| {name} | {kind} | {clients} | {dtype} | {r['requests_per_s']:.1f} | {spread} | {r['p50_ms']:.0f} "
              f"| {r['p95_ms']:.0f} | {ttft} | {tokens} "
              f"| {accuracy(r['answers'], labels * (len(r['answers']) // len(labels))):.3f} | {same}/{len(wanted)} |")
    json_rows = {(name, clients): r for name, kind, clients, dtype, r in rows
                 if kind in ("json", "-") and dtype == "float32"}
    for name in dict.fromkeys(name for name, _ in json_rows):
        if (name, 1) in json_rows and (name, 8) in json_rows:
            one, eight = json_rows[(name, 1)], json_rows[(name, 8)]
            print(f"\n{name}: 8 clients / 1 client = {eight['requests_per_s']:.1f} / {one['requests_per_s']:.1f} "
                  f"= {eight['requests_per_s'] / one['requests_per_s']:.2f}x", end="")
    print()
    if evals:
        print("\n| `tunelab eval` (test split, batch 32) | weights | answers/s | test/accuracy | examples |")
        print("|---|---|---:|---:|---:|")
        for name, r in evals:
            print(f"| run={run.name} | {name} | {r['answers_per_s']:.1f} | {r['accuracy']:.4f} | {r['n']:.0f} |")


if __name__ == "__main__":
    main()
