"""The objective seam: SFT behind it gives the same loss bit for bit, and a new objective is a test-local
`_target_` plus one YAML in a user config dir, trained by the real `train` without editing src/."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict
from torchmetrics import MeanMetric

from tunelab import paths
from tunelab.config.compose import compose
from tunelab.config.validate import validate
from tunelab.data.encode import IGNORE, Encoded
from tunelab.models.load import load_causal_lm
from tunelab.objectives import Forward, Loss
from tunelab.objectives.sft import SFT
from tunelab.training.module import TuneModule
from tunelab.verbs.train import train

OBJECTIVES = sorted(p.stem for p in (paths.conf_dir() / "objective").glob("*.yaml"))


def old_summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The body of `tunelab.training.module.summed_token_loss` before the seam, kept as the reference."""
    logits = logits[:, logits.shape[1] - labels.shape[1]:]
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE).flatten()
    total = F.cross_entropy(logits.float().flatten(0, 1), targets, ignore_index=IGNORE, reduction="sum")
    return total, (targets != IGNORE).sum()


def _examples(lengths: list[int]) -> list[Encoded]:
    """Random token ids, the first three of each example a prompt (not supervised)."""
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(4, 2000, (n,), generator=gen).tolist() for n in lengths]
    return [Encoded(ids, [IGNORE] * 3 + ids[3:], None, None, "test") for ids in rows]


@pytest.fixture(scope="module")
def module() -> TuneModule:
    torch.manual_seed(0)
    model = load_causal_lm(str(paths.assets_dir() / "tiny-llama"), random_init=True).eval()
    return TuneModule(model, tokenizer=None, optimizer=torch.optim.SGD)


def test_objective_group_is_discovered():
    assert "sft" in OBJECTIVES
    cfg = compose([], return_hydra_config=True)
    assert cfg.hydra.runtime.choices.objective == "sft"
    assert cfg.objective._target_ == "tunelab.objectives.sft.SFT"


@pytest.mark.parametrize("pack", ["none", "batch"])
def test_sft_behind_the_seam_is_bitwise_the_old_loss(module, pack):
    sft = SFT()
    batch = sft.collator(3, False, pack, 32)(_examples([12, 7, 20, 5, 9, 15]))
    assert ("segment_ids" in batch) == (pack != "none")  # the packed batch takes forward_batch's block-mask path
    assert isinstance(module.objective, SFT)  # the module's default
    with torch.no_grad():
        ref_total, ref_tokens = old_summed_token_loss(module.forward_batch(batch).logits, batch["labels"])
        train_loss, eval_loss = sft.train_loss(module, batch), sft.eval_loss(module, batch)
        stepped = module.training_step(batch, 0)  # no Trainer: the summed loss backward would see
        module._eval_step("val", batch, score=False)
    assert int(ref_tokens) > 0
    for loss in (train_loss, eval_loss):
        assert torch.equal(loss.total, ref_total) and torch.equal(loss.units, ref_tokens)
        assert loss.regulariser is None and not loss.figures  # a dense model: no router loss
    assert torch.equal(stepped, ref_total)
    reference = MeanMetric()
    reference.update(ref_total / ref_tokens.clamp(min=1), weight=ref_tokens)
    running = module.running["val"]["overall"]["loss"]
    assert torch.equal(running.compute(), reference.compute())
    running.reset()


class ScaledSFT:
    """A test-local objective: SFT's collation and loss, the loss × `scale`; each call is recorded."""

    calls: ClassVar[list[str]] = []

    def __init__(self, scale: float = 1.0) -> None:
        self.scale, self.sft = scale, SFT()

    def collator(self, *args: Any, **kwargs: Any) -> Any:
        ScaledSFT.calls.append("collator")
        return self.sft.collator(*args, **kwargs)

    def train_loss(self, module: Forward, batch: dict[str, Any]) -> Loss:
        ScaledSFT.calls.append("train_loss")
        loss = self.sft.train_loss(module, batch)
        return Loss(loss.total * self.scale, loss.units, figures={"train/objective_scale": torch.tensor(self.scale)})

    def eval_loss(self, module: Forward, batch: dict[str, Any]) -> Loss:
        ScaledSFT.calls.append("eval_loss")
        loss = self.sft.eval_loss(module, batch)
        return Loss(loss.total * self.scale, loss.units)


FAST = ["hyperparams.max_steps=1", "hyperparams.batch_size=4", "hyperparams.eval_batch_size=8",
        "eval.max_eval_samples=8", "eval.baseline=false", "eval.test=false", "eval.generate_on_val=false",
        "logger=none"]


def _train(run_dir: Path, overrides: list[str], config_dir: Path | str | None = None) -> dict[str, float]:
    config_dir = str(config_dir) if config_dir else None
    cfg = compose([*FAST, *overrides, f"paths.output_dir={run_dir}"], config_dir=config_dir)
    with open_dict(cfg):
        cfg.paths.run_dir = str(run_dir)
    validate(cfg)
    return train(cfg)


def test_a_new_objective_is_one_class_and_one_yaml(tmp_path):
    conf = tmp_path / "conf"
    (conf / "objective").mkdir(parents=True)
    (conf / "objective" / "scaled.yaml").write_text(
        "# A test-local objective: SFT's loss halved.\n_target_: test_objectives.ScaledSFT\nscale: 0.5\n")
    cache = [f"paths.cache_dir={tmp_path / 'cache'}"]
    ScaledSFT.calls = []
    scaled = _train(tmp_path / "scaled", ["objective=scaled", *cache], conf)
    assert {"collator", "train_loss", "eval_loss"} <= set(ScaledSFT.calls)
    plain = _train(tmp_path / "sft", cache)
    # One step from the same seed: the first step's loss is the same forward, halved (0.5 scales exactly).
    assert scaled["train/loss"] == pytest.approx(0.5 * plain["train/loss"], rel=1e-6)
    # Validation after an AdamW step (invariant to the gradient's scale up to its eps): halved too.
    assert scaled["val/loss"] == pytest.approx(0.5 * plain["val/loss"], rel=1e-3)


def test_an_unknown_objective_key_is_refused():
    from tunelab.errors import ConfigError

    cfg = compose(["+objective.scale=2"])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert info.value.message().startswith("tunelab: config error: unknown key 'scale' for tunelab.objectives.sft.SFT")
