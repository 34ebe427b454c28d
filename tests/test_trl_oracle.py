"""TRL as the oracle (issue 19 item 6): on fixed batches of the bundled preference task, tunelab's DPO and SimPO
losses and reward figures equal TRL's own (DPOTrainer._compute_loss; the CPO trainer with loss_type=simpo and
cpo_alpha=0, TRL's SimPO) within 1e-5, in fp32 on the CPU, on the same tiny model object and the same tokens.

The policy is moved off its reference first (seeded noise on every weight, or a randomly initialised LoRA), so the
rewards are not all zero."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, fmt
from tunelab import paths
from tunelab.data.datamodule import encode_task
from tunelab.models.load import load_causal_lm, load_tokenizer
from tunelab.objectives.preference import DPO, SimPO
from tunelab.training.module import TuneModule

pytest.importorskip("trl")  # the dev extra's oracle; tunelab itself never imports it
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402

INSTRUCT = str(paths.assets_dir() / "tiny-instruct")
FIGURES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(INSTRUCT)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    """Six pairs of the bundled task: negative and positive reviews, every broken rule."""
    lines = (REPO / "data" / "preference" / "train.jsonl").read_text().splitlines()[:6]
    return [{k: v for k, v in json.loads(line).items() if k in ("prompt", "chosen", "rejected")} for line in lines]


@pytest.fixture(scope="module")
def batch(rows, tokenizer, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("pref")
    for split in ("train", "validation", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits, _ = encode_task({"name": "p", "source": {"path": str(folder)}, "format": fmt("preference")}, tokenizer,
                            256, 0)
    return DPO().collator(tokenizer.pad_token_id, False)(splits["train"])


def _args(tmp_path, config_class, **extra):
    return config_class(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=2,
                        bf16=False, fp16=False, seed=0, **extra)


def _perturb(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=gen))


def _compare(ours, pairs: int, loss: torch.Tensor, theirs: dict[str, float], prefix: str = "train/") -> None:
    assert float(ours.units) == pairs
    assert float(ours.total) / pairs == pytest.approx(float(loss), abs=1e-5)
    for name in FIGURES:
        # Summed log-probs are ~-450 here, where one fp32 ulp is 3e-5 and TRL's fused head sums in another order:
        # they agree to 1e-6 relative; the loss and the rewards (differences of them) to 1e-5 absolute.
        tolerance = {"rel": 1e-6} if name.startswith("logps/") and abs(theirs[name]) > 10 else {"abs": 1e-5}
        assert float(ours.figures[prefix + name]) == pytest.approx(theirs[name], **tolerance), name
    assert 0 < theirs["rewards/accuracies"] or theirs["rewards/margins"] != 0  # the check is not on zeros


@pytest.mark.parametrize("method,sft_weight", [("full", 0.0), ("lora", 0.0), ("lora", 0.7)])
def test_dpo_loss_and_rewards_equal_trl(tmp_path, rows, tokenizer, batch, method, sft_weight):
    """sft_weight > 0 is RPO: TRL's loss_type=["sigmoid", "sft"] with loss_weights=[1, sft_weight]."""
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    model = load_causal_lm(INSTRUCT)
    extra = {"ref_model": load_causal_lm(INSTRUCT)} if method == "full" else {
        "peft_config": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)}
    # Full fine-tuning: tunelab's frozen copy is taken first, from the unpatched model (TRL's forward patch closes
    # over the original model, so a deep copy of a patched model would still run the original's weights).
    objective = DPO(beta=0.2, sft_weight=sft_weight)
    module = TuneModule(model, tokenizer, torch.optim.SGD, objective=objective) if method == "full" else None
    losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, sft_weight]} if sft_weight else {}
    trainer = DPOTrainer(model=model, args=_args(tmp_path, DPOConfig, beta=0.2, **losses),
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer, **extra)
    policy = trainer.model  # the same object for both: TRL's forward patch falls back to the original without its flag
    if module is None:  # LoRA: TRL wrapped the model in its adapter; the reference is that model, adapter disabled
        module = TuneModule(policy, tokenizer, torch.optim.SGD, objective=objective)
    assert module.model is policy and module.objective.reference.copied == (method == "full")
    if method == "full":
        _perturb(policy)
    policy.train()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != -100).long()}
    with torch.no_grad():
        loss = trainer._compute_loss(policy, inputs, return_outputs=False)
        ours = module.objective.train_loss(module, batch)
    theirs = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    _compare(ours, len(rows), loss, theirs)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_loss_and_rewards_equal_trl(tmp_path, rows, tokenizer, batch, label_smoothing):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    torch.manual_seed(0)
    model = load_causal_lm(INSTRUCT)
    args = _args(tmp_path, CPOConfig, loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=0.5,
                 label_smoothing=label_smoothing)
    trainer = CPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    policy = trainer.model
    module = TuneModule(policy, tokenizer, torch.optim.SGD,
                        objective=SimPO(beta=2.0, gamma=0.5, label_smoothing=label_smoothing))
    _perturb(policy)
    policy.train()
    pairs = len(rows)
    split = {f"{side}_{key}": value[i * pairs:(i + 1) * pairs]
             for i, side in enumerate(("chosen", "rejected"))
             for key, value in (("input_ids", batch["input_ids"]), ("attention_mask", batch["attention_mask"]),
                                ("labels", batch["labels"]))}
    with torch.no_grad():
        loss, theirs = trainer.get_batch_loss_metrics(policy, split, train_eval="train")
        ours = module.objective.train_loss(module, batch)
    _compare(ours, pairs, loss, theirs)
