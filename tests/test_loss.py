"""Loss normalisation: the gradient is the token mean over the effective batch, whatever the accumulation."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from tunelab import paths
from tunelab.data.datamodule import Collator
from tunelab.data.encode import IGNORE, encode_chat
from tunelab.data.formats import Example
from tunelab.errors import NumericsError
from tunelab.models.load import load_causal_lm, load_tokenizer
from tunelab.objectives.sft import summed_token_loss
from tunelab.training.module import TuneModule

TINY = str(paths.assets_dir() / "tiny-llama")
ANSWERS = ["positive", "negative", "positive, clearly", "no", "negative: it broke after a week of use",
           "yes", "positive overall but the battery is weak", "negative"]


class RecordingSGD(torch.optim.SGD):
    """Records the gradients the step sees: after backward of every micro-batch and the module's rescale."""

    grads: list[dict[int, torch.Tensor]] = []

    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch's signature
        loss = closure() if closure is not None else None
        RecordingSGD.grads.append({id(p): p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                                   if p.grad is not None})
        return loss


@pytest.fixture(scope="module")
def setup():
    tok = load_tokenizer(TINY)
    items = [encode_chat(tok, Example(f"x:{i}", messages=[{"role": "user", "content": f"Review {i}: fine?"},
                                                          {"role": "assistant", "content": a}]))
             for i, a in enumerate(ANSWERS)]
    assert len({item.supervised for item in items}) > 3  # varied completion lengths: the point of the test
    torch.manual_seed(0)
    model = load_causal_lm(TINY, random_init=True, dtype="float32")
    return tok, items, model


def _fit(tok, items, model, batch_size: int, accumulate: int, on_nonfinite: str = "stop") -> TuneModule:
    RecordingSGD.grads = []
    module = TuneModule(model, tok, optimizer=lambda params: RecordingSGD(params, lr=0.0), on_nonfinite=on_nonfinite)
    loader = DataLoader(items, batch_size=batch_size, shuffle=False, collate_fn=Collator(tok.pad_token_id, False))
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=accumulate, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=loader)
    return module


def _by_name(module: TuneModule, grads: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: grads[id(p)] for n, p in module.model.named_parameters() if id(p) in grads}


def _reference(tok, items, model) -> dict[str, torch.Tensor]:
    """Σ token losses of all 8 examples / Σ supervised tokens, differentiated directly."""
    model = copy.deepcopy(model)
    batch = Collator(tok.pad_token_id, False)(items)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    total, tokens = summed_token_loss(out.logits, batch["labels"])
    (total / tokens).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_accumulation_gives_the_same_gradient_as_one_big_batch(setup):
    tok, items, model = setup
    one = _fit(tok, items, copy.deepcopy(model), batch_size=8, accumulate=1)
    (big,) = RecordingSGD.grads
    big = _by_name(one, big)
    four = _fit(tok, items, copy.deepcopy(model), batch_size=2, accumulate=4)
    (small,) = RecordingSGD.grads  # one optimizer step over 4 micro-batches
    small = _by_name(four, small)
    reference = _reference(tok, items, model)
    assert big.keys() == small.keys() == reference.keys()
    for name in reference:
        assert torch.allclose(big[name], reference[name], atol=1e-5, rtol=0), name
        assert torch.allclose(small[name], reference[name], atol=1e-5, rtol=0), name

    # The test can fail: Lightning's own mean of per-micro-batch means differs measurably here.
    copy_model = copy.deepcopy(model)
    for start in range(0, 8, 2):
        batch = Collator(tok.pad_token_id, False)(items[start:start + 2])
        out = copy_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        total, tokens = summed_token_loss(out.logits, batch["labels"])
        (total / tokens / 4).backward()
    diff = max((p.grad - reference[n]).abs().max().item() for n, p in copy_model.named_parameters())
    assert diff > 1e-4


def test_all_masked_micro_batch_gives_zero_gradient_not_nan(setup):
    tok, items, model = setup
    masked = [copy.deepcopy(item) for item in items[:2]]
    for item in masked:
        item.labels = [IGNORE] * len(item.labels)
    module = _fit(tok, masked, copy.deepcopy(model), batch_size=2, accumulate=1)
    (grads,) = RecordingSGD.grads
    grads = _by_name(module, grads)
    assert grads
    for name, grad in grads.items():
        assert torch.isfinite(grad).all() and not grad.any(), name


def test_nonfinite_loss_stops_with_a_numerics_error(setup):
    tok, items, model = setup
    model = copy.deepcopy(model)
    model.register_forward_hook(lambda mod, args, out: out.__setitem__("logits", out.logits * float("nan")) or out)
    with pytest.raises(NumericsError) as info:
        _fit(tok, items, model, batch_size=2, accumulate=1)
    text = info.value.message()
    assert text.startswith("tunelab: numerics error: non-finite loss (nan) at step 0, batch 0")
    assert "hyperparams.on_nonfinite=skip" in text
    assert info.value.exit_code == 5
    assert RecordingSGD.grads == []  # the bad step was never applied
