"""Preference tuning: the `preference` dataset format (TRL's shapes, bad rows with file:line), the pair collator,
the reference (adapter disabled, or a frozen copy), the bundled brand-voice task and its judge, and short real
DPO/SimPO runs that log TRL's figure names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import REPO, fmt, make_cfg
from tunelab import paths
from tunelab.data.datamodule import encode_task
from tunelab.data.encode import IGNORE
from tunelab.errors import ConfigError, DataError
from tunelab.evaluation.judges import RULES, BrandVoice
from tunelab.models.load import load_causal_lm, load_tokenizer
from tunelab.objectives.preference import DPO, SimPO
from tunelab.objectives.reference import Reference, reference_logprobs, sequence_logprobs, token_logprobs
from tunelab.training.module import TuneModule
from tunelab.verbs.train import train

INSTRUCT = str(paths.assets_dir() / "tiny-instruct")
PLAIN = {"prompt": "Reply to: great kettle", "chosen": "Thank you!", "rejected": "Whatever."}
CONVERSATIONAL = {"prompt": [{"role": "user", "content": "Reply to: great kettle"}],
                  "chosen": [{"role": "assistant", "content": "Thank you!"}],
                  "rejected": [{"role": "assistant", "content": "Whatever."}]}
IMPLICIT = {"chosen": [{"role": "user", "content": "Reply to: great kettle"},
                       {"role": "assistant", "content": "Thank you!"}],
            "rejected": [{"role": "user", "content": "Reply to: great kettle"},
                         {"role": "assistant", "content": "Whatever."}]}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(INSTRUCT)


def _task(folder: Path, rows: list[dict | str], **extra) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    for split in ("validation", "test"):
        (folder / f"{split}.jsonl").write_text(json.dumps(PLAIN) + "\n")
    return {"name": "pref", "source": {"path": str(folder)}, "format": fmt("preference"), **extra}


@pytest.mark.parametrize("shape", [PLAIN, CONVERSATIONAL, IMPLICIT], ids=["plain", "conversational", "implicit"])
def test_trl_shapes_encode_to_the_same_pair(tmp_path, tokenizer, shape):
    splits, _ = encode_task(_task(tmp_path / "d", [shape]), tokenizer, 128, 0)
    plain, _ = encode_task(_task(tmp_path / "p", [PLAIN]), tokenizer, 128, 0)
    item, want = splits["train"][0], plain["train"][0]
    assert (item.input_ids, item.rejected_ids, item.prompt_ids) == (want.input_ids, want.rejected_ids,
                                                                    want.prompt_ids)
    assert item.reference == "Thank you!"
    # The prompt is unsupervised in both; each reply's tokens (and its end-of-turn token) are supervised.
    n = len(item.prompt_ids)
    assert item.input_ids[:n] == item.rejected_ids[:n] == item.prompt_ids
    assert set(item.labels[:n]) == set(item.rejected_labels[:n]) == {IGNORE}
    assert tokenizer.decode([t for t in item.labels if t != IGNORE]).startswith("Thank you!")
    assert tokenizer.decode([t for t in item.rejected_labels if t != IGNORE]).startswith("Whatever.")


BAD = {
    "missing": ({"prompt": "p", "chosen": "yes"}, r"train.jsonl:2: rejected: missing"),
    "identical": ({"prompt": "p", "chosen": "same", "rejected": "same"},
                  r"train.jsonl:2: chosen and rejected: identical"),
    "not_text": ({"prompt": "p", "chosen": 3, "rejected": "no"}, r"train.jsonl:2: chosen: expected a string"),
    "empty": ({"prompt": "p", "chosen": " ", "rejected": "no"}, r"train.jsonl:2: chosen: empty"),
    "implicit_mismatch": ({**IMPLICIT, "rejected": [{"role": "user", "content": "other"},
                                                    {"role": "assistant", "content": "x"}]},
                          r"train.jsonl:2: chosen and rejected: without a prompt column"),
    "too_long": ({"prompt": "p", "chosen": "word " * 200, "rejected": "no"}, r"train.jsonl:2: example has \d+ tokens"),
    "rejected_too_long": ({"prompt": "p", "chosen": "ok", "rejected": "word " * 200},
                          r"train.jsonl:2: rejected: example has \d+ tokens"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_pairs_are_refused_with_file_and_line(tmp_path, tokenizer, case):
    row, expected = BAD[case]
    task = _task(tmp_path / "d", [PLAIN, row, PLAIN])
    with pytest.raises(DataError, match=expected):
        encode_task(task, tokenizer, 64, 0)
    # The same rows under the one bad-row policy: skipped, counted and named.
    _, stats = encode_task({**task, "on_bad_row": "skip", "max_bad_fraction": 0.5}, tokenizer, 64, 0)
    assert stats["train"]["bad_rows"] == 1 and stats["train"]["bad_lines"][0].endswith("train.jsonl:2")


def test_bad_pair_through_the_command_line_exits_3(tmp_path):
    folder = tmp_path / "data"
    _task(folder, [PLAIN, BAD["identical"][0]])
    out = subprocess.run([sys.executable, "-m", "tunelab.cli", "train", "dataset=brand_replies", "objective=dpo",
                          f"dataset.source.path={folder}", "logger=none", f"paths.output_dir={tmp_path / 'o'}"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    text = out.stdout + out.stderr
    assert out.returncode == 3, text[-2000:]
    assert f"tunelab: data error: {folder}/train.jsonl:2: chosen and rejected: identical" in text
    assert "Traceback" not in text


def test_pair_collator_rows_and_prompts(tmp_path, tokenizer):
    rows = [PLAIN, CONVERSATIONAL, {**PLAIN, "chosen": "Thanks a lot, really."}]
    splits, _ = encode_task(_task(tmp_path / "d", rows), tokenizer, 128, 0)
    items = splits["train"]
    batch = DPO().collator(tokenizer.pad_token_id, True)(items)
    assert batch["input_ids"].shape[0] == 6 and batch["prompt_ids"].shape[0] == 3
    for row, item in enumerate(items):  # chosen rows first, then the rejected ones in the same order
        assert batch["input_ids"][row, : len(item.input_ids)].tolist() == item.input_ids
        assert batch["input_ids"][3 + row, : len(item.rejected_ids)].tolist() == item.rejected_ids
    assert batch["references"] == [i.reference for i in items]
    with pytest.raises(ConfigError, match="packing"):
        DPO().collator(0, False, "batch", 64)
    sft_items, _ = encode_task({**_task(tmp_path / "s", [PLAIN]), "format": fmt("prompt_completion"),
                                "column_map": {"chosen": "completion"}}, tokenizer, 128, 0)
    with pytest.raises(DataError, match="not a preference pair"):
        DPO().collator(0, False)(sft_items["train"])


def test_objective_arguments_are_checked():
    for bad in ({"beta": 0}, {"label_smoothing": 0.5}):
        with pytest.raises(ConfigError, match="objective"):
            DPO(**bad)
        with pytest.raises(ConfigError, match="objective"):
            SimPO(**bad)


def _batch(tokenizer, tmp_path):
    rows = [PLAIN, {**PLAIN, "chosen": "Thank you for the kind words.", "rejected": "Ok."}]
    splits, _ = encode_task(_task(tmp_path / "d", rows), tokenizer, 128, 0)
    return DPO().collator(tokenizer.pad_token_id, False)(splits["train"])


def test_reference_is_the_base_with_the_adapter_disabled(tmp_path, tokenizer):
    torch.manual_seed(0)
    base = load_causal_lm(INSTRUCT)
    batch = _batch(tokenizer, tmp_path)
    with torch.no_grad():
        before = sequence_logprobs(base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                   batch["labels"])
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    module = TuneModule(model, tokenizer, torch.optim.SGD, objective=DPO())
    assert not module.objective.reference.copied  # no second copy of the model
    ref = reference_logprobs(module, batch["input_ids"], batch["attention_mask"], batch["labels"])
    torch.testing.assert_close(ref, before, rtol=0, atol=1e-5)
    module.train()
    loss = module.objective.train_loss(module, batch)  # the adapter changes the policy, not the reference
    assert module.training and float(loss.figures["train/rewards/margins"]) != 0
    per_token = reference_logprobs(module, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                   per_token=True)
    assert per_token.shape == (4, batch["input_ids"].shape[1] - 1)
    torch.testing.assert_close(per_token.sum(-1), before, rtol=0, atol=1e-5)


def test_full_fine_tuning_keeps_a_frozen_copy_out_of_the_checkpoint(tmp_path, tokenizer):
    model = load_causal_lm(INSTRUCT)
    module = TuneModule(model, tokenizer, torch.optim.SGD, objective=DPO(beta=0.5))
    assert module.objective.reference.copied
    assert sum(1 for _ in module.parameters()) == sum(1 for _ in model.parameters())  # not a submodule
    batch = _batch(tokenizer, tmp_path)
    start = module.objective.eval_loss(module, batch)
    assert float(start.total) == pytest.approx(2 * 0.6931472, abs=1e-5)  # policy = reference: log 2 per pair
    assert float(start.figures["rewards/accuracies"]) == 0.0  # ties are not wins (TRL's rule)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    moved = module.objective.eval_loss(module, batch)
    assert float(moved.figures["rewards/chosen"]) != 0.0
    with Reference().active(get_peft_model(load_causal_lm(INSTRUCT), LoraConfig(r=2))) as ref:
        assert ref is not None


def test_token_logprobs_match_log_softmax():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    labels[0, :2] = IGNORE
    logps, mask = token_logprobs(logits, labels)
    want = torch.log_softmax(logits, -1)[:, :-1].gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logps, want * mask)
    assert sequence_logprobs(logits, labels, average=True)[0] == pytest.approx(float(want[0, 1:].mean()))


def test_bundled_task_is_reproducible_and_the_judge_agrees_with_it(tmp_path):
    subprocess.run([sys.executable, str(REPO / "data" / "make_preference.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True, timeout=120)
    judge, checks = BrandVoice(), {rule: BrandVoice(rule) for rule in RULES}
    for split in ("train", "validation", "test"):
        committed = (REPO / "data" / "preference" / f"{split}.jsonl").read_text()
        assert (tmp_path / f"{split}.jsonl").read_text() == committed
        for line in committed.splitlines():
            row = json.loads(line)
            assert judge(row["chosen"], row["chosen"]) == 1.0 and judge(row["rejected"], row["chosen"]) == 0.0
            assert [r for r, c in checks.items() if not c(row["rejected"], row["chosen"])] == [row["broken"]]
    # thanks and signature kept, the product (the reference's "your kettle") not named: 2 of 3 applicable rules
    assert BrandVoice(share=True)("Thank you. Best wishes, the Larkspur team.", "Thank you for your kettle.") == \
        pytest.approx(2 / 3)
    with pytest.raises(ConfigError, match="rule"):
        BrandVoice("tone")


FAST = ["model=tiny_instruct", "method=lora", "hyperparams.max_steps=2", "hyperparams.batch_size=4",
        "hyperparams.eval_batch_size=8", "eval.max_eval_samples=8", "eval.generate_on_val=false", "logger=none",
        "dataset=brand_replies", "dataset.max_new_tokens=8"]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dpo", "simpo"])
def test_short_run_logs_trl_figure_names(tmp_path, objective):
    cfg = make_cfg(tmp_path, [*FAST, f"objective={objective}"])
    metrics = train(cfg)
    for stage in ("val", "test"):
        for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "loss"):
            assert f"{stage}/{name}" in metrics, sorted(metrics)
    assert "test/brand_voice" in metrics and "baseline/test/rewards/accuracies" in metrics
    card = (Path(cfg.paths.run_dir) / "model" / "README.md").read_text()
    assert f"Objective: **{objective}** (beta " in card


def test_beta_sweep_composes_and_a_misspelt_key_is_refused():
    from tunelab import cli

    grid = ["objective=dpo", "objective.beta=0.05,0.1,0.5", "dataset=brand_replies", "model=tiny_instruct",
            "method=lora"]
    combos = cli._expand(grid, multirun=True)
    assert sorted(c[1] for c in combos) == [f"objective.beta={b}" for b in ("0.05", "0.1", "0.5")]
    cli.preflight(["-m", *grid])
    with pytest.raises(ConfigError, match="bta"):
        cli.preflight(["-m", "objective=dpo", "objective.bta=0.1,0.2", "dataset=brand_replies"])


@pytest.mark.slow
def test_sft_then_dpo_pipeline_runs_end_to_end_and_scores_each_stage(tmp_path):
    from omegaconf import open_dict

    from tunelab.config.compose import compose
    from tunelab.job import RunContext
    from tunelab.verbs.pipeline import run_pipeline

    cfg = compose(["pipeline=sft_then_dpo", "logger=none", f"paths.output_dir={tmp_path}", "scoring.max_samples=4"],
                  "pipeline")
    assert cfg.adapter_carry._target_.endswith("merge_adapter")  # DPO's reference is then the SFT model
    with open_dict(cfg):
        cfg.stage_overrides = ["logger=none", "hyperparams.max_steps=2", "hyperparams.batch_size=4",
                               "hyperparams.eval_batch_size=8", "eval.max_eval_samples=4", "dataset.max_new_tokens=8",
                               "callbacks.progress.refresh_rate=0"]
    out = tmp_path / "p"
    summary = run_pipeline(cfg, RunContext.local(out))
    assert summary["rows"] == ["baseline", "sft", "dpo"] and summary["stages_done"] == 2
    header = (out / "matrix.csv").read_text().splitlines()[0]
    assert "brand_replies/brand_voice" in header and "brand_replies_sft/brand_voice" in header
    dpo = next(out.glob("02_dpo"))
    assert "Objective: **dpo** (beta 0.1" in (dpo / "model" / "README.md").read_text()
