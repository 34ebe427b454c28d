"""Packing: no token attends across examples, and the packed loss equals the padded loss."""

from __future__ import annotations

import pytest
import torch

from tunelab.data.datamodule import Collator
from tunelab.data.encode import IGNORE, Encoded
from tunelab.data.packing import block_causal_mask, first_fit_decreasing
from tunelab.models import load_causal_lm, load_tokenizer
from tunelab.module import summed_token_loss
from tunelab.paths import assets_dir


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(assets_dir() / "tiny-llama"))
    model = load_causal_lm(str(assets_dir() / "tiny-llama"), random_init=True).eval()
    return tokenizer, model


def _examples(lengths: list[int], prompt: int = 3) -> list[Encoded]:
    gen = torch.Generator().manual_seed(1)
    items = []
    for n in lengths:
        ids = torch.randint(4, 2000, (n,), generator=gen).tolist()
        items.append(Encoded(ids, [IGNORE] * prompt + ids[prompt:], None, None, "test"))
    return items


def test_first_fit_decreasing_respects_capacity_and_uses_every_example():
    lengths = [5, 9, 3, 7, 2, 8, 1]
    bins = first_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4  # 9+1, 8+2, 7+3, 5 — the optimum here


def test_block_causal_mask_isolates_segments():
    segments = torch.tensor([[0, 0, 0, 1, 1, -1]])
    allowed = block_causal_mask(segments, torch.float32)[0, 0] == 0
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],  # the second example starts fresh: it cannot see the first
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding sees only itself, so no softmax row is empty
    ], dtype=torch.bool)
    assert torch.equal(allowed, expected)


def test_packed_batch_layout_restarts_positions_and_masks_boundaries():
    batch = Collator(pad_id=3, with_prompts=False, pack=True, max_len=16)(_examples([6, 5, 4]))
    assert batch["input_ids"].shape == (1, 15)  # all three fit one row of 16
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 0, 1, 2, 3]
    # The first token of every packed example is never a target (it would be predicted from another example).
    starts = [0, 6, 11]
    assert all(batch["labels"][0, s].item() == IGNORE for s in starts)
    assert batch["pad_fraction"] == pytest.approx(0.0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_padded_loss(tiny, attn):
    _, model = tiny
    model.config._attn_implementation = attn
    items = _examples([12, 7, 20, 5, 9, 15])
    padded = Collator(pad_id=3, with_prompts=False)(items)
    packed = Collator(pad_id=3, with_prompts=False, pack=True, max_len=32)(items)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    assert packed["pad_fraction"] < padded["pad_fraction"]
    with torch.no_grad():
        loss_pad, n_pad = summed_token_loss(model(input_ids=padded["input_ids"],
                                                  attention_mask=padded["attention_mask"]).logits, padded["labels"])
        mask = block_causal_mask(packed["segment_ids"], torch.float32)
        logits = model(input_ids=packed["input_ids"], attention_mask=mask, position_ids=packed["position_ids"]).logits
        loss_pack, n_pack = summed_token_loss(logits, packed["labels"])
    assert int(n_pad) == int(n_pack)
    assert abs(loss_pad.item() / int(n_pad) - loss_pack.item() / int(n_pack)) < 1e-5
    model.config._attn_implementation = "sdpa"


def test_packed_logits_match_separate_forward_passes(tiny):
    _, model = tiny
    items = _examples([10, 6])
    packed = Collator(pad_id=3, with_prompts=False, pack=True, max_len=16)(items)
    mask = block_causal_mask(packed["segment_ids"], torch.float32)
    with torch.no_grad():
        joint = model(input_ids=packed["input_ids"], attention_mask=mask, position_ids=packed["position_ids"]).logits
        first = model(input_ids=torch.tensor([items[0].input_ids])).logits
        second = model(input_ids=torch.tensor([items[1].input_ids])).logits
    assert (joint[:, :10] - first).abs().max() < 1e-4
    assert (joint[:, 10:16] - second).abs().max() < 1e-4
