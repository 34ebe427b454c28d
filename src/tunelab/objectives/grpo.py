"""Group-relative policy optimisation (GRPO, Shao et al. 2024, arXiv:2402.03300) with verifiable rewards.

Each training prompt gets a group of `num_generations` sampled answers (the one generation loop,
`tunelab.evaluation.evaluate.generate_tokens`); each answer is scored by the reward `_target_`s against the
example's reference answer; an answer's advantage is its reward minus its group's mean, divided by the group's
standard deviation; the loss is TRL's clipped policy-gradient loss plus `beta` × the k3 estimate of the KL to
the reference policy. The formulas follow TRL 1.16's `GRPOTrainer` (`_generate_and_score_completions` and
`_compute_loss`; tests/test_grpo.py checks them against it):

- advantages: `scale_rewards` group (TRL's default), batch or none; std with Bessel's correction, + 1e-4;
- `loss_type`: dapo (TRL's default: token sum over the whole effective batch / its completion tokens), grpo
  (each completion's token mean, averaged over completions) or dr_grpo (token sum / completions × max tokens);
  the module divides by the units of the whole effective batch, as TRL does over its accumulation window;
- one policy update per generation (TRL's `num_iterations=1`): the old log-probs are the current ones,
  detached, so the ratio is 1 in value and the clip bounds only matter for its gradient's sign conventions;
- the KL term carries TRL's `use_bias_correction_kl` (× the ratio), and log-probs are those of logits /
  temperature, as TRL computes them for the policy and the reference.

Sampling draws from the global torch RNG, which the checkpoint callback carries from batch to batch and saves,
so a resumed run samples what the uninterrupted one does. Answers are sampled with dropout off (eval mode).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from tunelab.config.schema import Packing
from tunelab.data.datamodule import Collator
from tunelab.errors import ConfigError, DataError
from tunelab.evaluation.evaluate import generate_tokens
from tunelab.objectives import Forward, Loss
from tunelab.objectives.reference import Reference
from tunelab.objectives.sft import SFT

LOSS_TYPES = ("dapo", "grpo", "dr_grpo")
SCALES = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL's: a group whose answers all score alike gets advantage 0, not 0/0


def group_advantages(rewards: torch.Tensor, group: int, scale: str = "group") -> torch.Tensor:
    """Each reward minus its group's mean (rows `group` at a time are one prompt's answers), divided by the
    group's (or with `scale="batch"` the whole batch's) standard deviation + 1e-4, or not divided ("none")."""
    grouped = rewards.view(-1, group)
    advantages = rewards - grouped.mean(dim=1).repeat_interleave(group)
    if scale == "none":
        return advantages
    std = rewards.std().expand_as(rewards) if scale == "batch" else grouped.std(dim=1).repeat_interleave(group)
    return advantages / (std + STD_EPS)


def completion_mask(completion_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 on each answer's tokens up to and including its first end-of-sequence token (all of them if none)."""
    is_eos = completion_ids == eos_id
    first = torch.full((completion_ids.shape[0],), completion_ids.shape[1], dtype=torch.long,
                       device=completion_ids.device)
    ended = is_eos.any(dim=1)
    first[ended] = is_eos.int().argmax(dim=1)[ended]
    return (torch.arange(completion_ids.shape[1], device=completion_ids.device)[None] <= first[:, None]).long()


def token_logps(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, completion_len: int,
                temperature: float = 1.0) -> torch.Tensor:
    """(rows, completion_len) log-probability of each completion token (the last `completion_len` of `ids`)
    under `model`, from logits / temperature, in fp32. Positions count real tokens only, as generation's do,
    so a left-padded prompt scores the tokens it was sampled with."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    # Prompt tuning prepends virtual tokens' logits: count from the end. The last position predicts nothing.
    logits = logits[:, -completion_len - 1:-1].float() / temperature
    targets = ids[:, -completion_len:, None]
    return logits.gather(-1, targets)[..., 0] - torch.logsumexp(logits, dim=-1)


def reference_token_logps(model: nn.Module, reference: nn.Module | Reference | None, ids: torch.Tensor,
                          mask: torch.Tensor, completion_len: int, temperature: float = 1.0) -> torch.Tensor:
    """Completion tokens' log-probs under the reference policy (`objectives.reference`, as DPO's): full
    fine-tuning's frozen copy of the starting model or, when there is none, `model` with its PEFT adapter
    disabled (no second copy in memory). No gradient."""
    holder = reference if isinstance(reference, Reference) else Reference(reference)
    with holder.active(model) as scorer:
        return token_logps(scorer, ids, mask, completion_len, temperature)


def grpo_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
                    advantages: torch.Tensor, beta: float, epsilon_low: float, epsilon_high: float
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """TRL's per-token GRPO loss (token-level importance sampling): -min(r·A, clip(r, 1-ε_low, 1+ε_high)·A)
    + β · r · KL_k3, with r = exp(logp - old_logp) and KL_k3 = exp(ref - logp) - (ref - logp) - 1.
    Returns (per-token loss, per-token KL or None when β = 0, the ratio r)."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages[:, None]
    loss = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta != 0.0:
        assert ref_logps is not None
        kl = (torch.exp(ref_logps - logps) - (ref_logps - logps) - 1) * ratio  # TRL's use_bias_correction_kl
        loss = loss + beta * kl
    return loss, kl, ratio


def summed_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_new_tokens: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, units) such that sum / units over an optimizer step's micro-batches is TRL's `loss_type` loss."""
    mask = mask.to(per_token.dtype)
    if loss_type == "grpo":  # each completion's token mean, then the mean over completions
        per_row = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_row.sum(), torch.tensor(float(per_token.shape[0]), device=per_token.device)
    if loss_type == "dr_grpo":  # a constant normaliser: completions × the longest allowed completion
        units = torch.tensor(float(per_token.shape[0] * max_new_tokens), device=per_token.device)
        return (per_token * mask).sum(), units
    return (per_token * mask).sum(), mask.sum()  # dapo: the token mean over the whole effective batch


class GRPO:
    """Group-relative policy optimisation on a prompt/answer dataset (module docstring); `rewards` maps a name
    (logged as train/rewards/<name>/mean) to a scorer `(answer, reference) -> float`."""

    def __init__(self, rewards: Mapping[str, Callable[[str, str], float]],
                 reward_weights: Mapping[str, float] | None = None, num_generations: int = 8,
                 max_new_tokens: int = 16, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 beta: float = 0.04, epsilon: float = 0.2, epsilon_high: float | None = None,
                 loss_type: str = "dapo", scale_rewards: str = "group") -> None:
        where = "objective"
        if not rewards:
            raise ConfigError("objective=grpo needs at least one reward", f"key {where}.rewards",
                              "list reward _target_s, e.g. tunelab.evaluation.metrics.exact_match")
        unknown = set(reward_weights or {}) - set(rewards)
        if unknown:
            raise ConfigError(f"reward_weights names no reward: {sorted(unknown)}", f"key {where}.reward_weights",
                              f"weight one of {sorted(rewards)}")
        for key, value, ok, hint in (
            ("num_generations", num_generations, num_generations >= 2, "a group needs 2 or more answers (8 is TRL's)"),
            ("max_new_tokens", max_new_tokens, max_new_tokens >= 1, "allow at least one answer token"),
            ("temperature", temperature, temperature > 0, "sample with a temperature > 0 (1.0 is TRL's)"),
            ("top_p", top_p, 0 < top_p <= 1, "use a value in (0, 1]"),
            ("top_k", top_k, top_k >= 0, "use 0 (off) or a positive count"),
            ("beta", beta, beta >= 0, "use 0 (no KL term) or a positive weight"),
            ("epsilon", epsilon, epsilon > 0, "use a clip range > 0 (0.2 is TRL's)"),
            ("loss_type", loss_type, loss_type in LOSS_TYPES, f"use one of {', '.join(LOSS_TYPES)}"),
            ("scale_rewards", scale_rewards, scale_rewards in SCALES, f"use one of {', '.join(SCALES)}"),
        ):
            if not ok:
                raise ConfigError(f"{key}={value!r} is out of range", f"key {where}.{key}", hint)
        self.rewards, self.reward_weights = dict(rewards), dict(reward_weights or {})
        self.num_generations, self.max_new_tokens = num_generations, max_new_tokens
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.beta, self.epsilon_low = beta, epsilon
        self.epsilon_high = epsilon if epsilon_high is None else epsilon_high
        self.loss_type, self.scale_rewards = loss_type, scale_rewards
        self._reference = Reference()  # full fine-tuning's frozen starting model (setup); none for an adapter
        self._sft = SFT()

    # ---- the seam ---------------------------------------------------------------------------------
    def collator(self, pad_id: int, with_prompts: bool, pack: Packing | str = Packing.none, max_len: int = 0,
                 task: str | None = None, choices: list[str] | None = None) -> Collator:
        if Packing(pack) is not Packing.none:
            raise ConfigError("objective=grpo samples answers to whole prompts and cannot pack examples",
                              "keys objective and hyperparams.packing", "set hyperparams.packing=none")
        # Training batches need the prompts (to sample from) and references (to reward) too.
        return Collator(pad_id, True, pack, max_len, task, choices)

    def setup(self, module: Forward, stage: str) -> None:
        """Take full fine-tuning's reference before training: Lightning calls this (TuneModule.setup) before it
        restores a checkpoint, so a resumed run's reference is the starting model too. An adapter method needs
        no copy: its reference is the base with the adapter disabled."""
        if stage == "fit" and self.beta != 0.0:
            self._reference.attach(module.model)

    @property
    def reference(self) -> nn.Module | None:
        """The frozen copy of the starting model (full fine-tuning); None where the reference is the base itself."""
        return self._reference.module

    def sample(self, module: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """`num_generations` answers to each prompt of `batch`, group by group: the rows to score and train on."""
        if "prompt_ids" not in batch:
            raise DataError("objective=grpo needs each training example's prompt and reference answer",
                            "dataset (its format)", "use a prompt_completion or chat dataset")
        model, tokenizer, group = module.model, module.tokenizer, self.num_generations
        ids = batch["prompt_ids"].repeat_interleave(group, dim=0)
        mask = batch["prompt_mask"].repeat_interleave(group, dim=0)
        settings = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                    "max_new_tokens": self.max_new_tokens}
        was_training = model.training
        model.eval()  # no dropout while sampling
        try:
            new = generate_tokens(model, tokenizer, ids, mask, settings)
        finally:
            model.train(was_training)
        new = new.to(ids.device)
        return {"ids": torch.cat([ids, new], dim=1), "completion": new,
                "mask": torch.cat([mask, completion_mask(new, tokenizer.eos_token_id)], dim=1)}

    def score(self, answers: list[str], references: list[str]) -> torch.Tensor:
        """(answers, rewards) each reward function's value for each answer."""
        return torch.tensor([[float(reward(a, r)) for reward in self.rewards.values()]
                             for a, r in zip(answers, references, strict=True)], dtype=torch.float32)

    def train_loss(self, module: Forward, batch: dict[str, Any]) -> Loss:
        rollout = self.sample(module, batch)
        model, tokenizer = module.model, module.tokenizer  # type: ignore[attr-defined]
        completion = rollout["completion"]
        width, device = completion.shape[1], completion.device
        cmask = rollout["mask"][:, -width:]
        # generate pads each row after its end-of-sequence token: decoding without special tokens stops there
        answers = [a.strip() for a in tokenizer.batch_decode(completion, skip_special_tokens=True)]
        references = [r for r in batch["references"] for _ in range(self.num_generations)]
        per_func = self.score(answers, references).to(device)
        weights = torch.tensor([float(self.reward_weights.get(n, 1.0)) for n in self.rewards], device=device)
        rewards = (per_func * weights).sum(dim=1)
        advantages = group_advantages(rewards, self.num_generations, self.scale_rewards)

        logps = token_logps(model, rollout["ids"], rollout["mask"], width, self.temperature)
        ref = None
        if self.beta != 0.0:  # the copy follows the model's device (taken before Lightning moved it)
            ref = reference_token_logps(model, self._reference, rollout["ids"], rollout["mask"], width,
                                        self.temperature)
        per_token, kl, _ = grpo_token_loss(logps, logps.detach(), ref, advantages, self.beta, self.epsilon_low,
                                               self.epsilon_high)
        total, units = summed_loss(per_token, cmask, self.loss_type, self.max_new_tokens)
        return Loss(total, units, figures=self.figures(per_func, rewards, advantages, cmask, kl))

    def figures(self, per_func: torch.Tensor, rewards: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                kl: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """This micro-batch's figures under TRL's metric names (logged as train/<name>)."""
        lengths = mask.sum(dim=1).float()
        grouped_std = rewards.view(-1, self.num_generations).std(dim=1)
        out = {"train/reward": rewards.mean(), "train/reward_std": rewards.std(),
               "train/frac_reward_zero_std": torch.isclose(grouped_std, torch.zeros_like(grouped_std)).float().mean(),
               "train/completions/mean_length": lengths.mean(),
               "train/completions/max_length": lengths.max(),
               # an answer cut at max_new_tokens never wrote its end-of-sequence token
               "train/completions/clipped_ratio": (lengths >= mask.shape[1]).float().mean(),
               "train/advantage_abs": advantages.abs().mean()}
        for i, name in enumerate(self.rewards):
            out[f"train/rewards/{name}/mean"] = per_func[:, i].mean()
            out[f"train/rewards/{name}/std"] = per_func[:, i].std()
        if kl is not None:  # TRL's: the token mean over the completions
            m = mask.to(kl.dtype)
            out["train/kl"] = (kl.detach() * m).sum() / m.sum().clamp(min=1.0)
        return {k: v.detach() for k, v in out.items()}

    def eval_loss(self, module: Forward, batch: dict[str, Any]) -> Loss:
        """val/loss and test/loss: the reference answers' token NLL (as SFT's), a likelihood figure beside the
        rewards that the dataset's metrics score on generated answers."""
        return self._sft.eval_loss(module, batch)
