"""TRL as the oracle for objective=grpo: on the same model, the same sampled completions and the same fixed
rewards, tunelab's advantages, reference log-probs, loss and gradients equal TRL's GRPOTrainer's (fp32, CPU).

A real GRPOTrainer is built on the instruction-tuned tiny model; its own `_generate_and_score_completions`
samples the completions and normalises the (fixed) rewards, and its own `_compute_loss` gives the loss."""

from __future__ import annotations

import pytest
import torch

from tunelab import paths
from tunelab.models.load import load_causal_lm, load_tokenizer
from tunelab.objectives.grpo import (
    completion_mask,
    group_advantages,
    grpo_token_loss,
    reference_token_logps,
    summed_loss,
    token_logps,
)

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

MODEL = paths.assets_dir() / "tiny-instruct"
GROUP, MAX_NEW, TEMPERATURE, BETA = 4, 6, 0.7, 0.04
# One fixed reward per completion (3 prompts × 4 answers): a mixed group, a tied group (std 0), a graded one.
REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.0, 1.5, 0.25]


def fixed_reward(prompts: list, completions: list, **kwargs: object) -> list[float]:
    assert len(completions) == len(REWARDS)
    return list(REWARDS)


def _prompts(tokenizer: object) -> list[str]:
    """Three questions of one token length: TRL scores them without position ids, so no left padding."""
    by_length: dict[int, list[str]] = {}
    for a, b in [(12, 57), (31, 8), (64, 29), (45, 90), (7, 3), (88, 61), (23, 45), (50, 14), (71, 36)]:
        text = f"Which number is larger, {a} or {b}?"
        by_length.setdefault(len(tokenizer(text)["input_ids"]), []).append(text)
    return next(group for group in by_length.values() if len(group) >= 3)[:3]


def _perturbed_policy() -> torch.nn.Module:
    """The starting model moved a little, so the policy and the reference (TRL reloads it) differ: a real KL."""
    model = load_causal_lm(str(MODEL), dtype="float32")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=gen))
    return model


# TRL's defaults (dapo, group) in the fast tier; the other loss types and scalings with the slow tests.
@pytest.mark.parametrize(("loss_type", "scale"), [
    ("dapo", "group"),
    pytest.param("grpo", "batch", marks=pytest.mark.slow),
    pytest.param("dr_grpo", "none", marks=pytest.mark.slow),
])
def test_advantages_reference_loss_and_gradients_equal_trls(tmp_path, loss_type, scale):
    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(MODEL))
    prompts = _prompts(tokenizer)
    policy = _perturbed_policy()
    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=len(REWARDS), num_generations=GROUP,
                          max_completion_length=MAX_NEW, temperature=TEMPERATURE, beta=BETA, loss_type=loss_type,
                          scale_rewards=scale, use_cpu=True, report_to="none", bf16=False, logging_steps=1)
    # The reference TRL reloads from the policy's path takes the policy's dtype (fp32).
    trainer = trl.GRPOTrainer(model=policy, reward_funcs=fixed_reward, args=args, processing_class=tokenizer,
                              train_dataset=datasets.Dataset.from_dict({"prompt": prompts}))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    out = trainer._generate_and_score_completions([{"prompt": p} for p in prompts for _ in range(GROUP)])

    # Advantages: rewards minus the group mean, over TRL's std + 1e-4 (or none).
    ours = group_advantages(torch.tensor(REWARDS), GROUP, scale)
    torch.testing.assert_close(ours, out["advantages"].float(), rtol=0, atol=1e-5)
    assert ours[4:8].abs().max() == 0  # the tied group teaches nothing

    completions, cmask = out["completion_ids"], out["completion_mask"]
    assert torch.equal(completion_mask(completions, tokenizer.eos_token_id), cmask.long())
    ids = torch.cat([out["prompt_ids"], completions], dim=1)
    mask = torch.cat([out["prompt_mask"], cmask], dim=1)
    width = completions.shape[1]

    # Reference log-probs: full fine-tuning's frozen starting model equals TRL's reloaded reference.
    reference = load_causal_lm(str(MODEL), dtype="float32").eval()
    ref = reference_token_logps(policy, reference, ids, mask, width, TEMPERATURE)
    real = cmask.bool()
    torch.testing.assert_close(ref[real], out["ref_per_token_logps"][real], rtol=0, atol=1e-5)

    # Loss: TRL's own _compute_loss against ours on the same inputs, and the gradients it gives.
    trl_loss = trainer._compute_loss(trainer.model, out)
    trl_grads = torch.autograd.grad(trl_loss, [p for p in policy.parameters() if p.requires_grad])
    logps = token_logps(policy, ids, mask, width, TEMPERATURE)
    per_token, kl, _ = grpo_token_loss(logps, logps.detach(), ref, ours, BETA, 0.2, 0.2)
    total, units = summed_loss(per_token, cmask, loss_type, MAX_NEW)
    our_loss = total / units
    assert kl is not None and float((kl.detach() * cmask).sum()) > 0  # the KL term is exercised
    torch.testing.assert_close(our_loss, trl_loss, rtol=0, atol=1e-5)
    our_grads = torch.autograd.grad(our_loss, [p for p in policy.parameters() if p.requires_grad])
    for ours_g, trl_g in zip(our_grads, trl_grads, strict=True):
        torch.testing.assert_close(ours_g, trl_g, rtol=1e-4, atol=1e-6)
