"""Router and expert figures of a mixture-of-experts or mixture-of-tokens model, from one forward's router logits.

Logged on training steps (through the objective, `tunelab.objectives.sft`) as `train/router/entropy`,
`train/router/share/<expert>` (each expert's share of the token assignments; 1/E each is a perfect balance),
`train/router/imbalance` (largest share × E: 1.0 balanced, E = one expert takes everything) and
`train/router/dropped_tokens`. transformers' Mixtral and tunelab's MoT are dropless (no expert capacity), so
dropped tokens are 0 by construction; the figure is kept so a capacity-limited model could report its own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def sparse_figures(router_logits: tuple[torch.Tensor, ...], top_k: int,
                   mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Token-choice top-k routing (Mixtral, Qwen-MoE): per-expert share of assignments and the entropy (nats)
    of each token's softmax over the experts, averaged over layers; `mask` (tokens,) leaves padding out."""
    shares, entropies = [], []
    for logits in router_logits:
        probs = torch.softmax(logits.detach().float(), dim=-1)
        weight = torch.ones(probs.shape[0], device=probs.device) if mask is None else mask.to(probs)
        chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, probs.shape[-1]).sum(dim=1).float()  # (tokens, E)
        counts = (chosen * weight[:, None]).sum(dim=0)
        shares.append(counts / counts.sum().clamp(min=1.0))
        entropy = -(probs * torch.log(probs.clamp(min=1e-12))).sum(dim=-1)
        entropies.append((entropy * weight).sum() / weight.sum().clamp(min=1.0))
    return {"entropy": torch.stack(entropies).mean(), "share": torch.stack(shares).mean(dim=0),
            "dropped_tokens": torch.zeros(())}


def router_figures(model: nn.Module, out: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """`train/router/*` figures of a routed model's output `out` on `batch`; {} for a dense model.

    A model with its own `router_figures(router_logits, batch_size)` (tunelab's MoT) says what its routing
    means; any other model returning `router_logits` is read as token-choice top-`num_experts_per_tok`."""
    logits = getattr(out, "router_logits", None)
    if not logits:
        return {}
    with torch.no_grad():
        own = getattr(model, "router_figures", None)
        if callable(own):
            figures = own(logits, batch["input_ids"].shape[0])
        else:
            mask = batch.get("attention_mask")
            mask = mask.reshape(-1) if mask is not None and mask.dim() == 2 and mask.numel() == len(logits[0]) else None
            figures = sparse_figures(logits, int(getattr(model.config, "num_experts_per_tok", 1)), mask)
        share = figures["share"]
        named = {f"train/router/share/{e}": value for e, value in enumerate(share)}
        return {"train/router/entropy": figures["entropy"], **named,
                "train/router/imbalance": share.max() * share.numel(),
                "train/router/dropped_tokens": figures["dropped_tokens"]}
