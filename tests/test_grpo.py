"""objective=grpo: rewards, advantages, the config (sweepable keys, refused values), one real GRPO step on a
TuneModule (LoRA: adapter-disabled reference; full: a frozen copy), the real `train` with its figures, the
bundled verifiable task, and a resumed GRPO run ending bitwise equal to an uninterrupted one."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_cfg
from tunelab import paths
from tunelab.config.build import build
from tunelab.config.compose import compose
from tunelab.config.validate import validate
from tunelab.data.encode import encode_chat
from tunelab.data.formats import Example
from tunelab.errors import ConfigError
from tunelab.models.load import load_causal_lm, load_tokenizer
from tunelab.models.method import apply_method, build_method
from tunelab.objectives.grpo import GRPO, completion_mask, group_advantages
from tunelab.objectives.rewards import integer_format, total_reward
from tunelab.training.module import TuneModule

MODEL = paths.assets_dir() / "tiny-instruct"
GRPO_FAST = ["objective=grpo", "model=tiny_instruct", "dataset=larger_smaller", "objective.num_generations=4",
             "objective.max_new_tokens=4", "hyperparams.batch_size=2", "hyperparams.eval_batch_size=16",
             "eval.max_eval_samples=16", "eval.baseline=false", "+trainer.limit_val_batches=1"]


def test_rewards_score_an_answer_against_its_reference():
    assert integer_format("42", "7") == 1.0 and integer_format(" -3 ", "7") == 1.0
    assert integer_format("42 or 7", "7") == 0.0 and integer_format("forty", "40") == 0.0
    rewards = {"correct": lambda a, r: float(a == r), "format": integer_format}
    assert total_reward("7", "7", rewards, {"format": 0.5}) == 1.5
    assert total_reward("8", "7", rewards, {"format": 0.5}) == 0.5
    assert total_reward("seven", "7", rewards) == 0.0


def test_advantages_are_centred_per_group_and_a_tied_group_gets_none():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, 4)
    assert torch.allclose(adv.view(2, 4).sum(1), torch.zeros(2), atol=1e-6)
    assert adv[4:].abs().max() == 0
    # std of [1, 0, 0, 1] with Bessel's correction is 1/sqrt(3); + 1e-4 as TRL
    assert adv[0].item() == pytest.approx(0.5 / (3 ** -0.5 + 1e-4), rel=1e-6)
    assert torch.equal(group_advantages(rewards, 4, "none"), rewards - torch.tensor([0.5] * 4 + [2.0] * 4))
    ids = torch.tensor([[5, 2, 3, 3], [5, 6, 7, 8], [2, 3, 3, 3]])
    assert completion_mask(ids, eos_id=2).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_the_objective_composes_sweeps_and_refuses_bad_values():
    cfg = compose(["objective=grpo", "dataset=larger_smaller", "objective.beta=0.1", "objective.num_generations=4",
                   "objective.reward_weights.format=0.0", "objective.loss_type=grpo"])
    validate(cfg)
    objective = build(cfg.objective)
    assert isinstance(objective, GRPO) and objective.beta == 0.1 and objective.num_generations == 4
    assert set(objective.rewards) == {"correct", "format"} and objective.rewards["format"]("12", "3") == 1.0
    # Every key of the objective is a sweep axis: a multirun over two of them composes each job.
    for beta, group in [(0.0, 2), (0.04, 8)]:
        validate(compose(["objective=grpo", "dataset=larger_smaller", f"objective.beta={beta}",
                          f"objective.num_generations={group}"]))
    for override, key in [("objective.num_generations=1", "objective.num_generations"),
                          ("objective.loss_type=bnpo_typo", "objective.loss_type"),
                          ("objective.scale_rewards=sometimes", "objective.scale_rewards"),
                          ("+objective.reward_weights.nope=1.0", "objective.reward_weights")]:
        with pytest.raises(ConfigError) as info:
            build(compose(["objective=grpo", override]).objective)
        assert key in info.value.message(), info.value.message()
    with pytest.raises(ConfigError) as info:
        validate(compose(["objective=grpo", "+objective.gamma=1"]))
    assert "unknown key 'gamma'" in info.value.message()
    with pytest.raises(ConfigError, match="packing"):
        GRPO({"c": integer_format}).collator(3, False, "batch", 64)


def _batch(tokenizer, objective: GRPO) -> dict:
    lines = (paths.data_dir() / "larger_smaller" / "train.jsonl").read_text().splitlines()[:3]
    rows = [json.loads(line) for line in lines]
    encoded = [encode_chat(tokenizer, Example(messages=[{"role": "user", "content": r["question"]},
                                                        {"role": "assistant", "content": r["answer"]}],
                                              origin=f"train.jsonl:{i}"))
               for i, r in enumerate(rows, 1)]
    return objective.collator(tokenizer.pad_token_id, False)(encoded)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_one_grpo_step_samples_groups_rewards_them_and_keeps_the_reference(method):
    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(MODEL))
    spec = build_method(compose([f"method={method}"]).method)
    model = apply_method(load_causal_lm(str(MODEL), dtype="float32"), spec)
    # A reward that differs between different answers (a checksum of the text), so the groups carry a learning
    # signal: at the first step the KL term has no gradient (the policy is the reference).
    checksum = lambda a, r: float(sum(map(ord, a)) % 5)  # noqa: E731
    objective = GRPO({"checksum": checksum, "format": integer_format}, num_generations=4, max_new_tokens=4, beta=0.04)
    module = TuneModule(model, tokenizer=tokenizer, optimizer=torch.optim.SGD, objective=objective)
    module.setup("fit")
    assert (objective.reference is None) == (method == "lora")  # an adapter's reference is the base itself
    batch = _batch(tokenizer, objective)
    assert batch["prompt_ids"].shape[0] == 3 and batch["references"][0].isdigit()
    loss = objective.train_loss(module, batch)
    assert torch.isfinite(loss.total) and loss.total.requires_grad and 3 * 4 <= loss.units <= 3 * 4 * 4
    assert float(loss.figures["train/frac_reward_zero_std"]) < 1.0
    for name in ("train/reward", "train/reward_std", "train/kl", "train/rewards/checksum/mean",
                 "train/rewards/format/mean", "train/completions/mean_length", "train/frac_reward_zero_std"):
        assert name in loss.figures and torch.isfinite(loss.figures[name]), name
    assert 0.0 <= float(loss.figures["train/rewards/format/mean"]) <= 1.0
    loss.total.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    if objective.reference is not None:  # the frozen copy shares nothing with the policy
        assert all(not p.requires_grad for p in objective.reference.parameters())
        frozen = objective.reference.parameters()
        assert all(p.data_ptr() != q.data_ptr() for p, q in zip(frozen, trained, strict=False))
    assert float(objective.eval_loss(module, batch).units) > 0  # val/loss: the reference answers' NLL


def test_grpo_trains_with_lora_and_logs_trl_figures(tmp_path):
    from tunelab.verbs.train import train

    metrics = train(make_cfg(tmp_path, [*GRPO_FAST, "method=lora", "logger=csv", "hyperparams.max_steps=2",
                                        "trainer.log_every_n_steps=1"]))
    assert {"test/exact_match", "test/integer_format", "test/reward", "val/loss"} <= set(metrics)
    assert 0.0 <= metrics["test/reward"] <= 1.5
    with next(tmp_path.rglob("metrics.csv")).open() as handle:
        columns = set(next(csv.reader(handle)))
    assert {"train/reward", "train/reward_std", "train/kl", "train/rewards/correct/mean",
            "train/completions/mean_length", "train/loss"} <= columns


def test_the_bundled_verifiable_task_holds_out_its_pairs():
    splits = {s: [json.loads(x) for x in (paths.data_dir() / "larger_smaller" / f"{s}.jsonl").read_text().splitlines()]
              for s in ("train", "validation", "test")}
    assert [len(v) for v in splits.values()] == [2000, 100, 200]
    pairs = {s: {frozenset((r["a"], r["b"])) for r in rows} for s, rows in splits.items()}
    assert not pairs["train"] & pairs["test"] and not pairs["train"] & pairs["validation"]
    for row in splits["test"]:
        assert row["answer"] == str(max(row["a"], row["b"]) if row["relation"] == "larger" else min(row["a"], row["b"]))
        assert str(row["a"]) in row["question"] and str(row["b"]) in row["question"]


@pytest.mark.slow
def test_a_resumed_full_finetuning_grpo_run_ends_bitwise_equal(tmp_path: Path):
    """Full fine-tuning with the KL term: sampling draws from the checkpointed RNG, and the frozen reference is
    the starting model in a resumed run too (taken before the restore), so step 2 → 4 ends where 0 → 4 does."""
    from tunelab.verbs.train import train

    common = [*GRPO_FAST, "method=full", "logger=none", "hyperparams.max_steps=4", "hyperparams.lr=1e-4",
              "eval.test=false", "eval.generate_on_val=false", "callbacks.checkpoint.every_n_steps=2",
              "callbacks.checkpoint.every_minutes=null", "callbacks.checkpoint.keep_last=9",
              f"paths.cache_dir={tmp_path}/cache"]
    train(make_cfg(tmp_path / "straight", common))
    checkpoint = tmp_path / "straight" / "checkpoints" / "step2.ckpt"
    train(make_cfg(tmp_path / "resumed", [*common, f"resume={checkpoint}"]))
    straight = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    at_step2 = {k.removeprefix("model."): v for k, v in torch.load(checkpoint, weights_only=True)["state_dict"].items()}
    assert any(not torch.equal(straight[k], at_step2[k]) for k in straight)  # steps 3-4 did change the weights
    assert max(float((straight[k] - resumed[k]).abs().max()) for k in straight) == 0.0
