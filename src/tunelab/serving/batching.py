"""Dynamic batching: requests that arrive within a short window share one left-padded call of tunelab's one
generation loop (`evaluation.evaluate.generate_tokens`), so concurrent clients share forward passes.

One worker thread generates; requests wait in a queue. When the worker is free it takes the oldest request,
waits for the others it expects (up to `window_s` after the latest arrival, `MAX_WINDOWS` windows in all), and
generates the requests that can share its settings in one batch:

- greedy requests share a batch whatever their `max_tokens`: the batch runs to the largest, and a per-row
  stopping criterion ends each row at its own limit, its end-of-turn token, or when its client went away, so a
  row's answer is the answer it gets alone (left padding and the attention mask keep rows apart; a test
  checks the answers equal the sequential ones);
- sampled requests with the same settings share a batch; a request with a `seed` runs alone, seeded, so the
  same seed gives the same answer whatever else is being served;
- streams get their own tokens through a per-row streamer, and each row's answer is handed back as soon as
  that row is done, not when the whole batch is;
- a prompt prefix the rows share is prefilled once and cached (`prefix_cache`), unless the batch is seeded: a
  seed promises one answer whatever was served before, and the cache's contents depend on that.

Why not transformers' own continuous batching (`generate_batch`, `ContinuousBatchingManager`): it takes one
generation config for all requests (no per-request seed; per-request sampling only through its logits processor
kwargs), needs its paged cache, and was measured slower than this on the tiny models on CPU (BENCHMARKS.md,
"Serving: batched"). A request joins a batch only between batches here; continuous batching would let it join
at any decode step, which matters for long answers on a GPU, where `serve.engine=vllm` is the path.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from tunelab.evaluation.evaluate import generate_tokens
from tunelab.serving.generation import Cancelled, finish_reason, seeded
from tunelab.serving.logprobs import Logprobs, with_logprobs
from tunelab.serving.prefix_cache import PrefixCache, generation_inputs
from tunelab.serving.requests import Served

MAX_WINDOWS = 4  # a batch waits at most this many windows for the clients it expects, however they trickle in


@dataclass
class Job:
    """One request waiting for, or in, a batch."""

    ids: list[int]
    settings: dict[str, Any]
    streamer: Any = None
    cancelled: Cancelled | None = None
    logprobs: Logprobs | None = None  # filled as the batch generates; logprobs do not split batches
    future: Future = field(default_factory=Future)

    def key(self) -> Any:
        """Requests with equal keys may share a batch: equal settings but max_new_tokens; a seed: none."""
        if "seed" in self.settings:
            return id(self)
        return tuple(sorted((k, repr(v)) for k, v in self.settings.items() if k != "max_new_tokens"))


class _Rows:
    """A batch's per-row bookkeeping: a stopping criterion that ends each row at its own limit, end of turn or
    cancellation and hands that row's answer back at once, and a streamer that passes each row its own tokens."""

    def __init__(self, jobs: list[Job], width: int, eos: int) -> None:
        self.jobs, self.width, self.eos = jobs, width, eos
        self.done = [False] * len(jobs)  # the row's answer was handed back
        self.ended = [False] * len(jobs)  # the row's streamer was ended
        self.prompt_seen = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        stop = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        for row, job in enumerate(self.jobs):
            if self.done[row]:
                stop[row] = True
                continue
            new = input_ids[row, self.width:].tolist()
            cancelled = job.future.cancelled() or (job.cancelled is not None and job.cancelled.event.is_set())
            if cancelled or new[-1] == self.eos or len(new) >= int(job.settings["max_new_tokens"]):
                self.finish(row, new)
                stop[row] = True
        return stop.to(input_ids.device)

    def finish(self, row: int, new: list[int]) -> None:
        self.done[row] = True
        job = self.jobs[row]
        if not job.future.done():
            job.future.set_result((new, finish_reason(new, self.eos, int(job.settings["max_new_tokens"]))))

    # the streamer side (transformers calls put() with the prompts first, then each step's tokens, then end())
    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the left-padded prompts: each row streamer skips its first put (skip_prompt)
            self.prompt_seen = True
            for row, job in enumerate(self.jobs):
                if job.streamer is not None:
                    job.streamer.put(value[row:row + 1])
            return
        for row, job in enumerate(self.jobs):
            if job.streamer is None or self.ended[row]:
                continue
            job.streamer.put(value[row:row + 1])
            if self.done[row]:  # the criterion saw this row's last token before the streamer did
                self.ended[row] = True
                job.streamer.end()

    def end(self) -> None:
        for row, job in enumerate(self.jobs):
            if job.streamer is not None and not self.ended[row]:
                self.ended[row] = True
                job.streamer.end()

    @property
    def streaming(self) -> bool:
        return any(job.streamer is not None for job in self.jobs)


class Batcher:
    """The queue and the one worker thread that generates its batches. `submit` is safe from any thread."""

    def __init__(self, served: Served, max_batch_size: int, window_s: float,
                 prefixes: PrefixCache | None = None) -> None:
        self.served, self.max_batch_size, self.window_s = served, max_batch_size, window_s
        self.prefixes = prefixes
        self.pending: list[Job] = []
        self.ready = threading.Condition()
        self.largest = 0  # the largest batch generated so far (/health reports it)
        # the most requests in the server (waiting, or generating and not yet answered) during each of the last two
        # batches: how many clients there are, so how many the next batch waits for (see `_take`)
        self.peaks = [1, 1]
        self.current: list[Job] = []  # the batch generating now
        threading.Thread(target=self._loop, name="tunelab-batcher", daemon=True).start()

    def submit(self, ids: list[int], settings: Mapping[str, Any], streamer: Any = None,
               cancelled: Cancelled | None = None, logprobs: Logprobs | None = None) -> Future:
        """Queue one request; the future's result is (new token ids, finish reason); `logprobs` fills meanwhile."""
        job = Job(list(ids), dict(settings), streamer, cancelled, logprobs)
        with self.ready:
            self.pending.append(job)
            busy = sum(not other.future.done() for other in self.current)  # answered rows' clients may be back
            self.peaks[-1] = max(self.peaks[-1], len(self.pending) + busy)
            self.ready.notify_all()
        return job.future

    def _take(self) -> list[Job]:
        """The next batch: the oldest request and those that may share its batch, after waiting up to the window
        for as many requests as were in the server at once during the last two batches (clients that were answered
        tend to come back).

        A lone client is not kept waiting for company that is not coming (one request at a time: no wait; the
        window cost a single client 5 ms of its 17 ms), and a batch starts as soon as the clients are back instead
        of waiting out the window for `max_batch_size` requests that are not there. The window runs from the
        latest arrival, not the first: 8 HTTP clients come back over ~6 ms (the event loop answers and reads them
        one by one), and a window from the first cut 16 of 68 batches into a batch and a straggler. Counting the
        clients, not the last batch's size, keeps 8 clients from settling into two alternating batches of 4 (each
        batch's clients come back while the other generates): on the sentiment run that steady state served 150
        requests/s with batches of 4-5, where batches of 8 take 34 ms.
        """
        with self.ready:
            while not self.pending:
                self.ready.wait()
            wanted = min(max(self.peaks), self.max_batch_size)
            started, seen = time.monotonic(), len(self.pending)
            deadline = started + self.window_s
            while len(self.pending) < wanted and (left := deadline - time.monotonic()) > 0:
                self.ready.wait(left)
                if len(self.pending) > seen:  # still arriving: the window runs from the latest arrival
                    seen = len(self.pending)
                    deadline = min(time.monotonic() + self.window_s, started + MAX_WINDOWS * self.window_s)
            key = self.pending[0].key()
            batch = [job for job in self.pending if job.key() == key][:self.max_batch_size]
            self.pending = [job for job in self.pending if job not in batch]
            self.peaks, self.current = [self.peaks[-1], len(batch) + len(self.pending)], batch
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            try:
                self._generate(batch)
            except BaseException as err:  # noqa: BLE001 - every request of the batch gets the error
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(err)
                    if job.streamer is not None:
                        job.streamer.end()

    def _generate(self, batch: list[Job]) -> None:
        from transformers import StoppingCriteriaList

        tokenizer = self.served.tokenizer
        self.largest = max(self.largest, len(batch))
        settings = dict(batch[0].settings)
        ids, mask, cache = generation_inputs(self.prefixes, [job.ids for job in batch], settings,
                                             tokenizer.pad_token_id)
        rows = _Rows(batch, ids.shape[1], tokenizer.eos_token_id)
        settings["max_new_tokens"] = max(int(job.settings["max_new_tokens"]) for job in batch)
        criteria = with_logprobs(self.served.model, settings, [job.logprobs for job in batch], [rows])
        with seeded(settings):
            new = generate_tokens(self.served.model, tokenizer, ids, mask, settings,
                                  rows if rows.streaming else None, StoppingCriteriaList(criteria), cache)
        for row in range(len(batch)):  # rows the criterion did not see end (none, unless generate stopped early)
            if not rows.done[row]:
                rows.finish(row, new[row].tolist())
        rows.end()
