"""DPO's `reference: cached` (tunelab.objectives.reference_cache): reference log-probs computed once before training,
kept in the run directory as safetensors, read back only when they are this run's; training with them equals
training against the frozen copy."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_cfg
from tunelab.errors import ConfigError
from tunelab.objectives.preference import DPO
from tunelab.objectives.reference_cache import CACHE_FILE, FORMAT, CachedReference, read_cache
from tunelab.verbs.train import train

# Full fine-tuning on 12 bundled pairs, 3 optimizer steps of 4 pairs; validation on 8 pairs.
RUN = ["model=tiny_instruct", "method=full", "objective=dpo", "objective.beta=0.5", "dataset=brand_replies",
       "dataset.source.train_size=12", "hyperparams.max_steps=3", "hyperparams.batch_size=4",
       "hyperparams.eval_batch_size=8", "eval.max_eval_samples=8", "eval.generate_on_val=false", "eval.test=false",
       "eval.baseline=false", "logger=none", "callbacks.progress.refresh_rate=0"]


def test_reference_choice_is_checked():
    with pytest.raises(ConfigError, match="objective.reference") as err:
        DPO(reference="cahced")
    assert "cached" in err.value.hint
    assert not DPO(reference="cached").reference.copied  # nothing copied until attach, and attach copies nothing


@pytest.mark.slow
def test_cached_reference_trains_as_the_frozen_copy_and_keeps_no_copy(tmp_path):
    runs = {kind: tmp_path / kind for kind in ("model", "cached")}
    metrics = {kind: train(make_cfg(run, [*RUN, f"objective.reference={kind}"])) for kind, run in runs.items()}
    # The cached pass scores pairs in other batches (other padding) than the training step: fp32 sums of ~-80 agree
    # to ~1e-6 relative, not bitwise.
    for name in ("val/loss", "val/rewards/margins", "val/rewards/chosen", "train/loss"):
        assert metrics["cached"][name] == pytest.approx(metrics["model"][name], rel=1e-5, abs=1e-5), name
    assert metrics["cached"]["val/rewards/margins"] != 0  # the policy moved off its reference
    weights = {kind: load_file(run / "model" / "model.safetensors") for kind, run in runs.items()}
    assert max(float((weights["cached"][k] - weights["model"][k]).abs().max()) for k in weights["model"]) < 1e-5
    assert not (runs["model"] / CACHE_FILE).exists()
    stored = load_file(runs["cached"] / CACHE_FILE)
    # 12 train pairs + 8 validation + 8 test (the test split is scored by a later `trainer.test`), unless repeated
    assert stored["keys"].shape[1] == 16 and 20 <= stored["chosen"].shape[0] <= 28
    assert stored["chosen"].shape == stored["rejected"].shape and (stored["chosen"] < 0).all()


def _cache(n: int = 3) -> CachedReference:
    keys = [bytes([i]) * 16 for i in range(n)]
    return CachedReference(keys, -torch.arange(1.0, n + 1), -torch.arange(10.0, 10 + n))


def test_cache_is_read_back_only_when_it_is_this_runs(tmp_path, caplog):
    path = tmp_path / CACHE_FILE
    cache = _cache()
    assert read_cache(path, cache.keys, "f1") is None and not caplog.records  # no file yet: computed, nothing said
    cache.save(path, "f1")
    assert not path.with_name(path.name + ".tmp").exists()
    back = read_cache(path, cache.keys, "f1")
    assert back is not None and back.keys == cache.keys
    torch.testing.assert_close(back.lookup([cache.keys[2].hex(), cache.keys[0].hex()], torch.device("cpu")),
                               torch.tensor([-3.0, -1.0, -12.0, -10.0]))
    with pytest.raises(RuntimeError, match="not in the cached"):
        back.lookup(["ff" * 16], torch.device("cpu"))

    def refused(keys: list[bytes], fingerprint: str, why: str) -> None:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tunelab.objectives.reference_cache"):
            assert read_cache(path, keys, fingerprint) is None
        assert "computing them again" in caplog.text and why in caplog.text, caplog.text

    refused(cache.keys, "f2", "fingerprint")  # another train split or starting model
    refused(cache.keys[:2], "f1", "expected 2 pairs")  # a train split of another length
    refused(list(reversed(cache.keys)), "f1", "pairs differ")
    keys = torch.frombuffer(bytearray(b"".join(cache.keys)), dtype=torch.uint8).view(3, 16)
    save_file({"keys": keys, "chosen": torch.zeros(2), "rejected": torch.zeros(3)}, path,
              metadata={"format": FORMAT, "fingerprint": "f1"})
    refused(cache.keys, "f1", "shapes")
    save_file({"keys": keys, "chosen": torch.zeros(3), "rejected": torch.zeros(3)}, path, metadata={"format": "x"})
    refused(cache.keys, "f1", "format")
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    refused(cache.keys, "f1", "")
    path.unlink()
    other = tmp_path / "elsewhere.safetensors"
    cache.save(other, "f1")
    Path(path).symlink_to(other)  # a link out of the run directory is not read
    refused(cache.keys, "f1", "not a regular file")
