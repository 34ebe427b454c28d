"""Packing: no token attends across examples, and the packed loss equals the padded loss.

Both modes: `batch` (each micro-batch binned into rows) and `dataset` (each epoch binned into rows by
RowSampler: every example once, rows fixed by (seed, epoch), a packed run resumed mid-epoch bitwise equal
to the uninterrupted one). The padding-free FlashAttention layout (`flatten_rows`) is checked on the CPU
through sdpa's own position-id boundaries, and on a GPU with flash_attention_2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning_fabric.utilities.distributed import DistributedSamplerWrapper
from safetensors.torch import load_file

from conftest import fmt, make_cfg
from tunelab.data.datamodule import Collator, EpochSampler, TuneDataModule
from tunelab.data.encode import IGNORE, Encoded
from tunelab.data.packing import (
    PackedRows,
    RowSampler,
    best_fit_decreasing,
    block_causal_mask,
    first_fit_decreasing,
    flatten_rows,
)
from tunelab.errors import DataError
from tunelab.models.load import load_causal_lm, load_tokenizer
from tunelab.objectives.sft import summed_token_loss
from tunelab.paths import assets_dir
from tunelab.training.module import TuneModule


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


def _heavy_tailed(count: int, seed: int = 0, top: int = 64) -> list[int]:
    """Lengths 4..top, mostly short (a Pareto-like tail), as the benchmark's data."""
    gen = torch.Generator().manual_seed(seed)
    return [min(top, 4 + int(4 / max(u, 1e-3) ** 0.7)) for u in torch.rand(count, generator=gen).tolist()]


def _packed_forward(model, batch):
    mask = block_causal_mask(batch["segment_ids"], torch.float32)
    return model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"]).logits


def test_first_fit_decreasing_respects_capacity_and_uses_every_example():
    lengths = [5, 9, 3, 7, 2, 8, 1]
    bins = first_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4  # 9+1, 8+2, 7+3, 5 — the optimum here


def test_best_fit_decreasing_fills_the_tightest_bin_and_refuses_an_example_too_long():
    lengths = [6, 5, 4, 3, 2]
    bins = best_fit_decreasing(lengths, 10)
    assert [[lengths[i] for i in b] for b in bins] == [[6, 4], [5, 3, 2]]  # 4 goes to 6's bin (room 4), not 5's
    many = _heavy_tailed(500)
    bins = best_fit_decreasing(many, 64)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(many[i] for i in b) <= 64 for b in bins)
    assert len(bins) <= len(first_fit_decreasing(many, 64))
    assert sum(many) / (64 * len(bins)) > 0.97  # rows 97.7% full (113 rows; sum/capacity bounds it at 111)
    with pytest.raises(ValueError, match="cannot fit a row of 64"):
        best_fit_decreasing([65], 64)


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
    batch = Collator(pad_id=3, with_prompts=False, pack="batch", max_len=16)(_examples([6, 5, 4]))
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
    packed = Collator(pad_id=3, with_prompts=False, pack="batch", max_len=32)(items)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    assert packed["pad_fraction"] < padded["pad_fraction"]
    with torch.no_grad():
        loss_pad, n_pad = summed_token_loss(model(input_ids=padded["input_ids"],
                                                  attention_mask=padded["attention_mask"]).logits, padded["labels"])
        loss_pack, n_pack = summed_token_loss(_packed_forward(model, packed), packed["labels"])
    assert int(n_pad) == int(n_pack)
    assert abs(loss_pad.item() / int(n_pad) - loss_pack.item() / int(n_pack)) < 1e-5
    model.config._attn_implementation = "sdpa"


def test_packed_logits_match_separate_forward_passes(tiny):
    _, model = tiny
    items = _examples([10, 6])
    packed = Collator(pad_id=3, with_prompts=False, pack="batch", max_len=16)(items)
    with torch.no_grad():
        joint = _packed_forward(model, packed)
        first = model(input_ids=torch.tensor([items[0].input_ids])).logits
        second = model(input_ids=torch.tensor([items[1].input_ids])).logits
    assert (joint[:, :10] - first).abs().max() < 1e-4
    assert (joint[:, 10:16] - second).abs().max() < 1e-4


@pytest.mark.parametrize(("value", "hint"), [("datset", "did you mean 'dataset'?"),
                                             ("true", "names a mode now: batch is what true meant")])
def test_a_wrong_packing_mode_is_a_config_error_with_a_hint(value, hint):
    from tunelab.config.compose import compose
    from tunelab.config.validate import validate
    from tunelab.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        validate(compose([f"hyperparams.packing={value}"]), deep=False)
    assert err.value.exit_code == 2 and "key hyperparams.packing" in err.value.message() and hint in err.value.message()


# ---- dataset-level packing ------------------------------------------------------------------------
def _rows(lengths: list[int], capacity: int, seed: int = 0) -> RowSampler:
    return RowSampler(EpochSampler(len(lengths), seed), lengths, capacity, seed)


def test_dataset_packed_batch_loss_equals_unpacked_and_no_example_sees_another(tiny):
    """Rows of several examples each (RowSampler), micro-batch of 2 rows: the token-mean loss equals that of
    the same examples padded, and every example's logits equal its own separate forward pass."""
    _, model = tiny
    lengths = [12, 7, 20, 5, 9, 15, 3, 11]
    items = _examples(lengths)
    rows = [[items[i] for i in row] for row in _rows(lengths, 32).rows(0)]
    assert len(rows) == 3 and max(len(r) for r in rows) >= 3  # 82 tokens in 3 rows of 32
    batch = Collator(pad_id=3, with_prompts=False, pack="dataset", max_len=32)(rows[:2])
    inside = [item for row in rows[:2] for item in row]
    padded = Collator(pad_id=3, with_prompts=False)(inside)
    with torch.no_grad():
        joint = _packed_forward(model, batch)
        loss_pack, n_pack = summed_token_loss(joint, batch["labels"])
        loss_pad, n_pad = summed_token_loss(model(input_ids=padded["input_ids"],
                                                  attention_mask=padded["attention_mask"]).logits, padded["labels"])
        assert int(n_pack) == int(n_pad) == sum(item.supervised for item in inside)
        assert abs(loss_pack.item() / int(n_pack) - loss_pad.item() / int(n_pad)) < 1e-5
        for r, row in enumerate(rows[:2]):
            start = 0
            for item in row:
                alone = model(input_ids=torch.tensor([item.input_ids])).logits[0]
                assert (joint[r, start:start + len(item.input_ids)] - alone).abs().max() < 1e-4
                start += len(item.input_ids)


def test_dataset_rows_hold_every_example_once_per_epoch_and_depend_only_on_seed_and_epoch():
    lengths = _heavy_tailed(300)
    sampler = _rows(lengths, 64, seed=3)
    epochs = [sampler.rows(e) for e in range(3)]
    for rows in epochs:
        assert sorted(i for row in rows for i in row) == list(range(300))  # each example exactly once
        assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
        assert len(rows) == len(sampler)  # a shuffle of the same examples packs into as many rows every epoch
    assert epochs[0] != epochs[1] != epochs[2]
    assert _rows(lengths, 64, seed=3).rows(1) == epochs[1]  # a fresh sampler (a resumed run) rebuilds them
    assert _rows(lengths, 64, seed=4).rows(1) != epochs[1]
    sampler.set_epoch(2)
    assert list(sampler) == epochs[2]
    sampler.skip_next(5)
    assert list(sampler) == epochs[2][5:] and list(sampler) == epochs[2]  # a skip applies once
    # Row-mates change between epochs, not only the order of rows (the bench measures ~4% pairs kept).
    mates = [{frozenset(row) for row in rows if len(row) > 1} for rows in epochs[:2]]
    assert len(mates[0] & mates[1]) < 0.2 * len(mates[0])


def test_weighted_mixture_epochs_fill_one_count_of_rows_with_draws():
    """A mixture draws with replacement: epochs' draws pack into different numbers of rows, but the run keeps
    one count (Lightning reads len() once). Each epoch takes as many draws of its stream as fill that count:
    every draw taken is trained on once, none is left out, and the number of draws varies."""
    lengths = _heavy_tailed(120) + _heavy_tailed(40, seed=1)
    weights = torch.tensor([0.5 / 120] * 120 + [0.5 / 40] * 40)
    order = EpochSampler(160, 0, weights, samples=200)
    sampler = RowSampler(order, lengths, 64, 0)
    raw = [len(best_fit_decreasing([lengths[i] for i in order.indices(e)], 64)) for e in range(8)]
    assert min(raw) < len(sampler) < max(raw)  # 200 draws of each epoch would not fill the same number of rows
    taken = []
    for epoch in range(8):
        rows = sampler.rows(epoch)
        assert len(rows) == len(sampler)
        assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
        used = [i for row in rows for i in row]
        stream = order.indices(epoch, 2 * 200 + 16)
        assert sorted(used) == sorted(stream[: len(used)])  # a prefix of the epoch's draws, each once
        taken.append(len(used))
    assert len(set(taken)) > 1 and all(150 < n < 250 for n in taken), taken
    assert RowSampler(order, lengths, 64, 0).rows(5) == sampler.rows(5)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(assets_dir() / "tiny-llama"))


def _task(tmp_path: Path, answers: list[str], **extra) -> dict:
    folder = tmp_path / "qa"
    folder.mkdir(exist_ok=True)
    for split, rows in {"train": answers, "validation": answers[:2], "test": answers[:2]}.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"q": f"q{i}", "a": a}) + "\n"
                                                       for i, a in enumerate(rows)))
    return {"name": "qa", "source": {"path": str(folder), "splits": {"train": "train", "validation": "validation",
                                                                    "test": "test"}},
            "format": fmt("prompt_completion"), "templates": [{"prompt": "Q: {{ q }}", "completion": "{{ a }}"}],
            **extra}


def test_dataset_packing_batches_rows_and_over_length_examples_follow_the_policy(tmp_path, tokenizer):
    answers = [" ".join(["word"] * n) for n in (1, 2, 3, 1, 5, 2, 8, 1, 3, 2, 4, 1)] + [" ".join(["long"] * 80)]
    for policy in ("truncate", "drop", "error"):
        dm = TuneDataModule(_task(tmp_path, answers, overlength=policy), tokenizer, batch_size=2, max_seq_len=48,
                            packing="dataset")
        if policy == "error":
            with pytest.raises(DataError, match="over max_seq_len=48"):
                dm.setup()
            continue
        dm.setup()
        loader = dm.train_dataloader()
        batches = list(loader)
        rows = len(loader.sampler)
        assert len(loader) == -(-rows // 2) == len(batches)  # batch_size counts rows: steps per epoch follow
        assert [b["input_ids"].shape[0] for b in batches] == [2] * (rows // 2) + [1] * (rows % 2)
        assert all(b["input_ids"].shape[1] <= 48 for b in batches)
        lengths = sorted(len(e.input_ids) for e in dm.splits["qa"]["train"])
        assert lengths[-1] == 48 if policy == "truncate" else lengths[-1] < 48
        assert len(lengths) == 13 - (policy == "drop")
        assert sum(b["n_tokens"] for b in batches) == sum(lengths)  # every kept example once, nothing else
        long_rows = [b for b in batches for r in range(b["input_ids"].shape[0]) if (b["segment_ids"][r] == 0).all()]
        assert len(long_rows) == (policy == "truncate")  # the truncated example fills a row alone


def test_packed_loader_resumes_mid_epoch_and_shards_for_ddp(tmp_path, tokenizer):
    """ResumableLoader over RowSampler: a loader restored from a mid-epoch state yields exactly the batches an
    uninterrupted one yields next; under DDP Lightning wraps the sampler and each rank gets its share of rows."""
    answers = [" ".join(["word"] * (1 + i % 7)) for i in range(40)]
    dm = TuneDataModule(_task(tmp_path, answers), tokenizer, batch_size=2, max_seq_len=40, packing="dataset", seed=5)
    dm.setup()
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    straight = [b["input_ids"] for b in loader]
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches": 3}
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)
    rest = [b["input_ids"] for b in resumed]
    assert len(rest) == len(straight) - 3 and all(torch.equal(a, b) for a, b in zip(rest, straight[3:], strict=True))
    rows = loader.sampler.rows(1)
    shards = [DistributedSamplerWrapper(loader.sampler, num_replicas=2, rank=r, shuffle=False) for r in (0, 1)]
    for shard in shards:
        shard.set_epoch(1)
    seen = [list(shard) for shard in shards]
    assert len(seen[0]) == len(seen[1]) == -(-len(rows) // 2)
    assert set(seen[0]) | set(seen[1]) == set(rows)  # every row on some rank; shared only to even out an odd count
    assert len(set(seen[0]) & set(seen[1])) == len(rows) % 2
    assert isinstance(loader.dataset, PackedRows)


def test_packed_run_resumed_mid_epoch_ends_bitwise_equal(tmp_path):
    """train() with packing=dataset, 12 rows in 6 micro-batches per epoch: a run checkpointed after step 3
    (mid-epoch 0, as a killed run's newest checkpoint) and resumed from there to step 8 (into epoch 1, new rows)
    ends with exactly the weights of one uninterrupted 8-step run."""
    common = ["logger=none", "hyperparams.packing=dataset", "hyperparams.batch_size=2", "+dataset.source.train_size=48",
              "hyperparams.epochs=-1", "hyperparams.max_steps=8", "eval.baseline=false", "eval.test=false",
              "eval.generate_on_val=false", "eval.max_eval_samples=8", "+trainer.limit_val_batches=1",
              "callbacks.checkpoint.every_n_steps=3", "callbacks.checkpoint.every_minutes=null",
              "callbacks.checkpoint.keep_last=9",
              f"paths.cache_dir={tmp_path}/cache"]
    from tunelab.verbs.train import train

    train(make_cfg(tmp_path / "straight", common))
    checkpoint = tmp_path / "straight" / "checkpoints" / "step3.ckpt"
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches": 3}]
    train(make_cfg(tmp_path / "resumed", [*common, f"resume={checkpoint}"]))
    straight = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    at_step3 = {k.removeprefix("model."): v for k, v in saved["state_dict"].items()}
    assert any(not torch.equal(straight[k], at_step3[k]) for k in straight)  # steps 4-8 did change the weights
    assert max(float((straight[k] - resumed[k]).abs().max()) for k in straight) == 0.0


# ---- padding-free layout for FlashAttention kernels ------------------------------------------------
def test_flattened_rows_drop_padding_and_carry_boundaries(tiny):
    """flatten_rows: one row of real tokens, cu_seq_lens at example starts. Its loss equals the padded loss on
    the CPU too: sdpa reads the same boundaries from restarting position ids when no cache is built (transformers
    5.x, `find_packed_sequence_indices`), which makes it a stand-in for the varlen kernel."""
    _, model = tiny
    items = _examples([12, 7, 20, 5, 9, 15])
    rows = [[items[0], items[1]], [items[2], items[3], items[4]], [items[5]]]
    batch = Collator(pad_id=3, with_prompts=False, pack="dataset", max_len=40)(rows)
    assert batch["pad_fraction"] > 0.2
    flat = flatten_rows(batch)
    assert flat["input_ids"].shape == (1, 68) and flat["labels"].shape == (1, 68)
    assert flat["cu_seq_lens_q"].tolist() == [0, 12, 19, 39, 44, 53, 68] and flat["max_length_q"] == 20
    assert flat["cu_seq_lens_q"].dtype == torch.int32 and flat["pad_fraction"] == 0.0
    assert all(flat["labels"][0, s].item() == IGNORE for s in flat["cu_seq_lens_q"][:-1].tolist())
    padded = Collator(pad_id=3, with_prompts=False)(items)
    with torch.no_grad():
        out = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"], use_cache=False)
        loss_flat, n_flat = summed_token_loss(out.logits, flat["labels"])
        loss_pad, n_pad = summed_token_loss(model(input_ids=padded["input_ids"],
                                                  attention_mask=padded["attention_mask"]).logits, padded["labels"])
    assert int(n_flat) == int(n_pad)
    assert abs(loss_flat.item() / int(n_flat) - loss_pad.item() / int(n_pad)) < 1e-5


def test_module_flattens_packed_batches_only_for_flash_attention(tiny):
    tokenizer, model = tiny
    module = TuneModule(model, tokenizer, optimizer=torch.optim.SGD)
    batch = Collator(pad_id=3, with_prompts=False, pack="dataset", max_len=40)([_examples([6, 5]), _examples([9])])
    assert module.on_after_batch_transfer(batch, 0) is batch  # sdpa: the 4D mask path
    model.config._attn_implementation = "flash_attention_2"
    try:
        flat = module.on_after_batch_transfer(batch, 0)
        padded = Collator(pad_id=3, with_prompts=False)(_examples([6]))
        assert module.on_after_batch_transfer(padded, 0) is padded  # an unpacked batch keeps its 2D mask
    finally:
        model.config._attn_implementation = "sdpa"
    assert flat["input_ids"].shape == (1, 20) and "segment_ids" not in flat and "attention_mask" not in flat


@pytest.mark.gpu
def test_flash_attention_packed_rows_match_separate_forward_passes():
    """On a CUDA machine with flash-attn: a dataset-packed micro-batch of two rows, flattened by the module for
    flash_attention_2, gives each example the logits of its own forward pass and the padded batch's loss.

    last ran: never (no GPU lent)
    """
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("flash_attn")
    tokenizer = load_tokenizer(str(assets_dir() / "tiny-llama"))
    torch.manual_seed(0)
    model = load_causal_lm(str(assets_dir() / "tiny-llama"), random_init=True, dtype="bfloat16",
                           attn_implementation="flash_attention_2").cuda().eval()
    module = TuneModule(model, tokenizer, optimizer=torch.optim.SGD)
    items = _examples([40, 17, 63, 9, 30])
    rows = [[items[0], items[1]], [items[2], items[3], items[4]]]
    batch = Collator(pad_id=3, with_prompts=False, pack="dataset", max_len=128)(rows)
    flat = module.on_after_batch_transfer({k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}, 0)
    assert "cu_seq_lens_q" in flat
    with torch.no_grad():
        joint = module.forward_batch(flat).logits.float()
        loss_flat, n_flat = summed_token_loss(joint, flat["labels"])
        padded = Collator(pad_id=3, with_prompts=False)(items)
        out = model(input_ids=padded["input_ids"].cuda(), attention_mask=padded["attention_mask"].cuda())
        loss_pad, n_pad = summed_token_loss(out.logits.float(), padded["labels"].cuda())
        start = 0
        for item in [i for row in rows for i in row]:
            alone = model(input_ids=torch.tensor([item.input_ids], device="cuda")).logits.float()[0]
            assert (joint[0, start:start + len(item.input_ids)] - alone).abs().max() < 5e-2  # bf16
            start += len(item.input_ids)
    assert int(n_flat) == int(n_pad)
    assert abs(loss_flat.item() / int(n_flat) - loss_pad.item() / int(n_pad)) < 1e-2
