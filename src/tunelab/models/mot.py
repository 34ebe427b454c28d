"""Mixture of tokens (Antoniak et al. 2023, "Mixture of Tokens: Continuous MoE through Cross-Example Aggregation"):
a Mixtral whose feed-forward block mixes tokens across the examples of a batch instead of routing them.

The block, in training (`routing: mix`): the batch's rows are cut into groups of `group_size` consecutive rows,
and the tokens at one position of a group's rows form a token group. A controller (a linear layer, one logit per
expert and token) gives each expert a softmax over the tokens of the group; each expert runs once on its own
weighted mixture of them; each token gets back the sum of the experts' outputs weighted by its own mixing
weights. Nothing is discrete, every expert sees every group (balanced by construction, no auxiliary loss, no
dropped tokens), and a token group of G tokens costs E expert calls: E/G per token. With 4 experts and group
size 2, a token costs as much as Mixtral's top-2 of the same 4 experts (`model=tiny_moe`).

Decoding. Mixing crosses examples: in a group, a sequence's output depends on the other sequences' tokens at
the same position (never on later positions of its own, so causal training holds). The paper notes that mixing
can be switched off at inference and, for unbatched autoregressive decoding, proposes *transition tuning*: turn
the trained MoT into a sparse MoE, the controller becoming the router, and train briefly that way. tunelab does
the same: outside training (`model.eval()`: validation, test, `eval`, `generate`, `serve`), and in training with
`routing: sparse` (the transition-tuning stage), the block routes each token alone: softmax of the controller's
logits over the experts, top `num_experts_per_tok` (= experts / group size: the training compute per token),
Mixtral's own sparse experts. So in eval mode a sequence's logits do not depend on the rest of the batch
(tests/test_mot.py); a model trained only with mixing meets the sparse form for the first time there, which is
why its perplexity is worse in eval mode until it is transition-tuned (README, "Choosing the architecture").

`register()` makes `model_type: tunelab_mot` known to transformers' Auto classes; tunelab's loader calls it,
so save, load, resume, export, eval and serve need no `trust_remote_code`. Outside tunelab, call
`tunelab.models.mot.register()` before `AutoModelForCausalLM.from_pretrained` on such a directory.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, MixtralConfig
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.mixtral import modeling_mixtral as mixtral

ROUTINGS = ("mix", "sparse")


@strict
class MoTConfig(MixtralConfig):
    """Mixtral's settings plus the token-group size and how the block routes in training."""

    model_type = "tunelab_mot"
    group_size: int = 2  # rows of a batch mixed together; a token costs num_local_experts / group_size experts
    routing: str = "mix"  # "mix" (mixture of tokens) or "sparse" (transition tuning: top-k routing in training too)

    def validate_mixing(self) -> None:  # huggingface_hub's strict dataclasses run every validate_* method
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, not {self.routing!r}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be at least 1, not {self.group_size}")


def mix_tokens(hidden: torch.Tensor, logits: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
               group_size: int, act: Any) -> torch.Tensor:
    """The mixture-of-tokens feed-forward of `hidden` (batch, length, hidden): groups of `group_size` rows,
    controller `logits` (batch, length, experts), expert weights `gate_up` (E, 2I, H) and `down` (E, H, I)."""
    batch, length, width = hidden.shape
    pad = -batch % group_size  # a last, short group: rows that take no weight (logit -inf) fill it
    if pad:
        hidden = F.pad(hidden, (0, 0, 0, 0, 0, pad))
        logits = F.pad(logits, (0, 0, 0, 0, 0, pad), value=float("-inf"))
    groups = hidden.shape[0] // group_size
    tokens = hidden.view(groups, group_size, length, width)
    # softmax over the group's tokens, one distribution per expert (float32, as Mixtral's router)
    weights = torch.softmax(logits.float().view(groups, group_size, length, -1), dim=1).to(hidden.dtype)
    mixed = torch.einsum("ngte,ngth->nteh", weights, tokens)  # one mixed token per expert and group
    gate, up = torch.einsum("nteh,eih->ntei", mixed, gate_up).chunk(2, dim=-1)
    outputs = torch.einsum("ntei,ehi->nteh", act(gate) * up, down)
    redistributed = torch.einsum("ngte,nteh->ngth", weights, outputs)  # each token takes back its own shares
    return redistributed.reshape(groups * group_size, length, width)[:batch]


class MoTBlock(nn.Module):
    """Mixture of tokens in training (`routing: mix`), Mixtral's sparse top-k routing otherwise (module docstring).

    The controller is a Mixtral router and the experts are Mixtral's experts, under the same parameter names,
    so both forms share weights and the router's logits are recorded as `router_logits` like Mixtral's."""

    def __init__(self, config: MoTConfig) -> None:
        super().__init__()
        self.group_size, self.routing = config.group_size, config.routing
        self.gate = mixtral.MixtralTopKRouter(config)
        self.experts = mixtral.MixtralExperts(config)
        self.act = ACT2FN[config.hidden_act]

    def mixes(self) -> bool:
        return self.training and self.routing == "mix"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden_states.shape
        flat = hidden_states.reshape(-1, width)
        logits, top_k_weights, top_k_index = self.gate(flat)
        if self.mixes():
            return mix_tokens(hidden_states, logits.view(batch, length, -1), self.experts.gate_up_proj,
                              self.experts.down_proj, self.group_size, self.act)
        return self.experts(flat, top_k_index, top_k_weights).reshape(batch, length, width)


class MoTDecoderLayer(mixtral.MixtralDecoderLayer):
    def __init__(self, config: MoTConfig, layer_idx: int) -> None:
        GradientCheckpointingLayer.__init__(self)  # Mixtral's own __init__ would build a sparse block to throw away
        self.hidden_size = config.hidden_size
        self.self_attn = mixtral.MixtralAttention(config, layer_idx)
        self.mlp = MoTBlock(config)
        self.input_layernorm = mixtral.MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = mixtral.MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class MoTPreTrainedModel(mixtral.MixtralPreTrainedModel):
    config: MoTConfig
    config_class = MoTConfig
    _no_split_modules = ["MoTDecoderLayer"]


class MoTModel(MoTPreTrainedModel, mixtral.MixtralModel):
    def __init__(self, config: MoTConfig) -> None:
        MoTPreTrainedModel.__init__(self, config)
        self.padding_idx, self.vocab_size = config.pad_token_id, config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([MoTDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = mixtral.MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = mixtral.MixtralRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class MoTForCausalLM(MoTPreTrainedModel, mixtral.MixtralForCausalLM):
    """A causal LM with mixture-of-tokens feed-forward blocks (module docstring); Mixtral otherwise."""

    def __init__(self, config: MoTConfig) -> None:
        MoTPreTrainedModel.__init__(self, config)
        self.model = MoTModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts, self.num_experts_per_tok = config.num_local_experts, config.num_experts_per_tok
        self.post_init()

    def router_figures(self, router_logits: tuple[torch.Tensor, ...], batch_size: int) -> dict[str, torch.Tensor]:
        """Figures of the mixing, one value per name averaged over layers (what `tunelab.objectives.routing` logs).

        In mixing mode every expert takes exactly one mixed token per group: the token share is 1/E by
        construction and nothing is dropped; the entropy is that of each expert's weights over its group (nats,
        at most ln group_size: 0 = the expert picks one token, ln G = an even blend). In sparse mode (eval,
        transition tuning) the figures are a sparse MoE's, which `routing.router_figures` computes."""
        from tunelab.objectives.routing import sparse_figures

        if not (self.training and self.config.routing == "mix"):
            return sparse_figures(router_logits, self.config.num_experts_per_tok)
        group, experts = self.config.group_size, self.config.num_local_experts
        entropies = []
        for logits in router_logits:
            per_row = logits.detach().float().view(batch_size, -1, experts)
            per_row = F.pad(per_row, (0, 0, 0, 0, 0, -batch_size % group), value=float("-inf"))
            probs = torch.softmax(per_row.view(-1, group, per_row.shape[1], experts), dim=1)
            entropies.append(-(probs * torch.log(probs.clamp(min=1e-12))).sum(dim=1).mean())
        share = torch.full((experts,), 1.0 / experts, device=router_logits[0].device)
        return {"entropy": torch.stack(entropies).mean(), "share": share, "dropped_tokens": torch.zeros(())}


def register() -> None:
    """Make `model_type: tunelab_mot` known to AutoConfig and AutoModelForCausalLM (idempotent)."""
    AutoConfig.register(MoTConfig.model_type, MoTConfig, exist_ok=True)
    AutoModelForCausalLM.register(MoTConfig, MoTForCausalLM, exist_ok=True)
