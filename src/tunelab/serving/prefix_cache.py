"""Automatic prefix caching: the keys and values of a prompt prefix that requests share (the chat template's
header, a system prompt, a task's fixed instruction) are computed once and reused, so a batch's prefill computes
only what differs between its rows.

A batch of prompts that all start with a cached prefix P generates from the layout [P | left pads | suffixes],
attention mask [1..1 | 0..0 | 1..1] and a KV cache holding P's keys and values expanded to the batch: position
ids come from the mask's running sum, so every suffix token sits where it sits in the plain left-padded batch, and
the answers are the plain path's (on the bundled sentiment run: batch of 8 from 47.8 to 30.0 ms, alone from 11.6
to 9.3 ms, answers equal 64/64 batched and 16/16 alone; tests/test_serve_batching.py checks equality).

Prefixes are learned, never configured: a batch of two or more stores its rows' longest common prefix, a lone
request the longest prefix it shares with the previous lone request (one user with a fixed system prompt).
A bounded LRU (`ENTRIES` prefixes of at most `MAX_TOKENS` tokens) holds them; a prefix shorter than
`MIN_TOKENS` is not worth a separate forward pass. Every row keeps at least one token of its own to prefill, the
one whose logits give the first new token.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

ENTRIES = 8  # prefixes kept (least recently used goes first)
MIN_TOKENS = 8  # a shorter shared prefix saves less than its own forward pass costs on the tiny models
MAX_TOKENS = 512  # bounds memory: a 1B model's 512-token prefix is ~32 MB of float32 keys and values


def unsupported(model: Any) -> str | None:
    """Why `model` cannot generate from a cached prefix with the plain path's answers, or None when it can.

    A capability check, not a try/except: a model that cannot take a KV cache, or whose outputs depend on how the
    prompt is cut into forward passes beyond float rounding, must not get a cache at all."""
    peft = getattr(model, "peft_config", None)
    if isinstance(peft, dict) and any(getattr(c, "is_prompt_learning", False) for c in peft.values()):
        return "prompt learning prepends virtual tokens to every forward pass"
    config = getattr(model, "config", None)
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    if config is None or supports is None or not supports() or getattr(config, "use_cache", True) is False:
        return "the model does not use transformers' DynamicCache"
    if getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None):
        # top-k routing is discrete: a logit that moves by float rounding between the cut and uncut prefill can
        # send a token to another expert and change the answer (model=tiny_moe, tiny_mot)
        return "routed experts (mixture of experts or tokens)"
    if getattr(config, "sliding_window", None) or any(t != "full_attention" for t in
                                                      getattr(config, "layer_types", None) or ()):
        return "sliding-window attention layers need their own cache layers"
    if any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules()):
        # dynamic int8 quantizes activations per forward pass: the prefix alone gets other scales
        return "int8 dynamic quantization scales activations per forward pass"
    if any(p.dtype != torch.float32 for p in model.parameters()):
        return "only float32 weights keep the cut prefill's rounding below a greedy answer's margins"
    return None


def common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """The length of the longest prefix all `rows` share."""
    first, n = rows[0], min(len(r) for r in rows)
    for i in range(n):
        token = first[i]
        if any(r[i] != token for r in rows):
            return i
    return n


@dataclass
class Prefix:
    """A cached prefix: its tokens and each layer's (keys, values) for one row."""

    ids: tuple[int, ...]
    layers: list[tuple[torch.Tensor, torch.Tensor]]

    def inputs(self, prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(ids, attention mask, cache) for `generate_tokens`: [prefix | left pads | suffixes], the cache holding the
        prefix for every row (copied: generation appends to it)."""
        from transformers import DynamicCache

        from tunelab.evaluation.evaluate import left_pad

        rows, length = len(prompts), len(self.ids)
        suffix_ids, suffix_mask = left_pad([p[length:] for p in prompts], pad_id)
        ids = torch.cat([torch.tensor([self.ids], dtype=torch.long).expand(rows, -1), suffix_ids], 1)
        mask = torch.cat([torch.ones(rows, length, dtype=torch.long), suffix_mask], 1)
        cache = DynamicCache()
        for layer, (keys, values) in enumerate(self.layers):
            cache.update(keys.expand(rows, -1, -1, -1).contiguous(), values.expand(rows, -1, -1, -1).contiguous(),
                         layer)
        return ids, mask, cache


class PrefixCache:
    """The learned prefixes of one served model; `lookup` is safe from any thread (batching=false runs requests in
    threads of their own)."""

    def __init__(self, model: Any, entries: int = ENTRIES, min_tokens: int = MIN_TOKENS,
                 max_tokens: int = MAX_TOKENS) -> None:
        self.model, self.entries, self.min_tokens, self.max_tokens = model, entries, min_tokens, max_tokens
        self.store: OrderedDict[tuple[int, ...], Prefix] = OrderedDict()
        self.previous: tuple[int, ...] = ()  # the last lone prompt, to learn a prefix from the next one
        self.lock = threading.Lock()
        self.hits = self.computed = 0

    def lookup(self, prompts: Sequence[Sequence[int]]) -> Prefix | None:
        """The prefix `prompts` should generate from, or None for the plain path: the longest cached prefix all of
        them start with, unless the prefix they share (a batch's rows with each other, a lone prompt with the
        previous one) is at least `min_tokens` longer, in which case that is computed and cached."""
        usable = min(min(len(p) for p in prompts) - 1, self.max_tokens)  # a token of its own per row
        with self.lock:
            if len(prompts) > 1:
                shared = common_prefix(prompts)
            else:
                shared, self.previous = common_prefix([prompts[0], self.previous]), tuple(prompts[0])
            shared = min(shared, usable)
            best: Prefix | None = None
            for key, prefix in self.store.items():
                if len(key) <= usable and (best is None or len(key) > len(best.ids)) and all(
                        tuple(p[:len(key)]) == key for p in prompts):
                    best = prefix
            if best is not None and shared < len(best.ids) + self.min_tokens:
                self.store.move_to_end(best.ids)
                self.hits += 1
                return best
            if shared < self.min_tokens:
                return best
            key = tuple(prompts[0][:shared])
        prefix = Prefix(key, self._compute(key))  # outside the lock: other threads' lookups go on meanwhile
        with self.lock:
            self.store[key] = prefix
            self.store.move_to_end(key)
            while len(self.store) > self.entries:
                self.store.popitem(last=False)
            self.computed += 1
        return prefix

    @torch.no_grad()
    def _compute(self, ids: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        device = next(self.model.parameters()).device
        cache = self.model(input_ids=torch.tensor([ids], device=device), use_cache=True).cache  # 5.25's name
        return [(layer.keys, layer.values) for layer in cache.layers]


def generation_inputs(prefixes: PrefixCache | None, prompts: Sequence[Sequence[int]], settings: dict[str, Any],
                      pad_id: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(ids, attention mask, cache) for `generate_tokens`: from a cached prefix where there is one, else plain left
    padding and no cache. A seeded request never reads the cache: a seed promises one answer whatever was served
    before, and the cache's contents depend on that."""
    from tunelab.evaluation.evaluate import left_pad

    prefix = prefixes.lookup(prompts) if prefixes is not None and "seed" not in settings else None
    if prefix is None:
        return (*left_pad(prompts, pad_id), None)
    return prefix.inputs(prompts, pad_id)


def prefix_cache_for(model: Any, enabled: bool) -> tuple[PrefixCache | None, str | None]:
    """The server's prefix cache and, when it has none though asked for one, why (the server logs it once)."""
    if not enabled:
        return None, None
    why = unsupported(model)
    return (None, why) if why else (PrefixCache(model), None)
