"""`model=tiny_mot`, mixture of tokens: the block's arithmetic against a plain loop, batch independence in eval
mode (and the cross-example mixing in training, which the paper describes), and a real run that trains, logs its
router figures, reloads with identical logits and exports, all without trust_remote_code."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import REPO, make_cfg
from tunelab.models.load import load_causal_lm, load_run
from tunelab.models.mot import MoTForCausalLM, mix_tokens, register
from tunelab.verbs.train import train

MOT = REPO / "src/tunelab/assets/tiny-mot"
FAST = ["model=tiny_mot", "hyperparams.max_steps=3", "eval.baseline=false", "eval.test=false",
        "eval.generate_on_val=false", "eval.max_eval_samples=16", "logger=csv", "trainer.log_every_n_steps=1"]


@pytest.fixture(scope="module")
def model() -> MoTForCausalLM:
    torch.manual_seed(0)
    return load_causal_lm(str(MOT), random_init=True)


def test_mix_tokens_is_the_papers_mixture():
    """Each expert runs once per token group on Σ_i w_ei x_i (w_e = softmax over the group's tokens); token i
    gets Σ_e w_ei expert_e(mixture_e). A short last group (5 rows, groups of 2) mixes its one row alone."""
    torch.manual_seed(0)
    batch, length, width, inner, experts, group = 5, 3, 8, 6, 4, 2
    hidden, logits = torch.randn(batch, length, width), torch.randn(batch, length, experts)
    gate_up, down = torch.randn(experts, 2 * inner, width), torch.randn(experts, width, inner)
    act = torch.nn.functional.silu
    expected = torch.zeros_like(hidden)
    for start in range(0, batch, group):
        rows = range(start, min(start + group, batch))
        for t in range(length):
            w = torch.softmax(torch.stack([logits[r, t] for r in rows]), dim=0)  # (tokens, experts)
            for e in range(experts):
                mixture = sum(w[i, e] * hidden[r, t] for i, r in enumerate(rows))
                g, u = (gate_up[e] @ mixture).chunk(2)
                out = down[e] @ (act(g) * u)
                for i, r in enumerate(rows):
                    expected[r, t] += w[i, e] * out
    got = mix_tokens(hidden, logits, gate_up, down, group, act)
    assert torch.allclose(got, expected, atol=1e-4)


def test_eval_logits_do_not_depend_on_the_rest_of_the_batch(model):
    """The decoding mode (module docstring): in eval mode each token is routed alone, so a sequence's logits are
    the same alone, beside other sequences, or in another position of the batch. In training mode they are not:
    that is the mixing across examples."""
    torch.manual_seed(1)
    ids = torch.randint(4, model.config.vocab_size, (4, 12))
    others = torch.randint(4, model.config.vocab_size, (4, 12))
    model.eval()
    with torch.no_grad():
        alone = model(input_ids=ids[:1]).logits[0]
        batched = model(input_ids=ids).logits[0]
        elsewhere = model(input_ids=torch.cat([others[:3], ids[:1]])).logits[3]
        mixed = [model.train()(input_ids=torch.cat([ids[:1], rows[:1]]), use_cache=False).logits[0]
                 for rows in (ids[1:], others)]
    model.eval()
    assert torch.allclose(alone, batched, atol=1e-5) and torch.allclose(alone, elsewhere, atol=1e-5)
    assert (mixed[0] - mixed[1]).abs().max() > 1e-2  # training mixes row 0 with its group partner


def test_greedy_generation_is_the_same_alone_and_in_a_batch(model):
    torch.manual_seed(2)
    prompts = torch.randint(4, model.config.vocab_size, (3, 6))
    model.eval()
    alone = model.generate(prompts[:1], max_new_tokens=6, do_sample=False, pad_token_id=3)
    batched = model.generate(prompts, max_new_tokens=6, do_sample=False, pad_token_id=3)
    assert torch.equal(alone[0], batched[0])


def test_tiny_mot_trains_logs_router_figures_reloads_and_exports(tmp_path, monkeypatch):
    from hydra.core.global_hydra import GlobalHydra

    from tunelab.config.compose import compose
    from tunelab.verbs.export import export

    run = tmp_path / "run"
    metrics = train(make_cfg(run, FAST))
    assert metrics["params/total"] == sum(p.numel() for p in load_causal_lm(str(MOT), random_init=True).parameters())
    rows = list(csv.DictReader((run / "csv/metrics.csv").open()))
    logged = {k for row in rows for k, v in row.items() if v}
    assert {"train/router/entropy", "train/router/imbalance", "train/router/dropped_tokens"} <= logged
    assert {f"train/router/share/{e}" for e in range(4)} <= logged and "train/aux_loss" not in logged
    entropy = [float(r["train/router/entropy"]) for r in rows if r.get("train/router/entropy")]
    assert all(0 < e <= torch.log(torch.tensor(2.0)) + 1e-6 for e in entropy)  # an entropy over groups of 2
    assert all(float(r["train/router/dropped_tokens"]) == 0 for r in rows if r.get("train/router/dropped_tokens"))

    assert json.loads((run / "model/config.json").read_text())["model_type"] == "tunelab_mot"
    reloaded, _, _ = load_run(run)  # trust_remote_code stays False
    assert type(reloaded).__name__ == "MoTForCausalLM"
    ids = torch.randint(4, 2048, (2, 9))
    with torch.no_grad():
        first = reloaded(input_ids=ids).logits
        again = load_run(run)[0](input_ids=ids).logits
    assert torch.equal(first, again)

    out = tmp_path / "export"
    cfg = compose([f"run={run}", f"out={out}"], config_name="export", return_hydra_config=False)
    GlobalHydra.instance().clear()
    export(cfg)
    register()  # what a user outside tunelab calls first (README)
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(exported(input_ids=ids).logits, first)
    assert "tunelab.models.mot.register()" in (out / "README.md").read_text()  # the card says how to load it


@pytest.mark.slow  # three real processes
def test_tiny_mot_killed_then_resumed_ends_bitwise_equal(tmp_path):
    """As tests/test_kill.py for the dense model: a SIGKILL mid-accumulation (after the step-2 checkpoint), then
    `resume=auto`, ends with the uninterrupted run's weights exactly. The mixing draws nothing at random, so the
    data position and RNG states the checkpoint restores are all it needs."""
    import signal

    from safetensors.torch import load_file

    from forkrun import fork_tunelab

    common = ["model=tiny_mot", "eval.baseline=false", "eval.test=false", "eval.generate_on_val=false", "logger=none",
              "+trainer.limit_train_batches=6", "+trainer.limit_val_batches=1", "hyperparams.batch_size=4",
              "hyperparams.eval_batch_size=8", "eval.max_eval_samples=8", "hyperparams.accumulate_grad_batches=2",
              "hyperparams.epochs=1", "callbacks.checkpoint.every_n_steps=2", "callbacks.checkpoint.every_minutes=null",
              "callbacks.progress.refresh_rate=0", f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path}/cache"]
    assert fork_tunelab([*common, "run_id=reference"], tmp_path / "reference.log") == 0
    kill = ["+callbacks.kill._target_=killpoints.KillAt", "+callbacks.kill.where=batch_start", "+callbacks.kill.step=2",
            "+callbacks.kill.micro=1", f"+callbacks.kill.record={tmp_path / 'killed.txt'}"]
    log = tmp_path / "chain.log"
    assert fork_tunelab([*common, "run_id=chain", *kill], log) == -signal.SIGKILL, log.read_text()[-3000:]
    assert fork_tunelab([*common, "run_id=chain", "resume=auto"], log) == 0, log.read_text()[-3000:]
    reference = load_file(tmp_path / "runs/reference/model/model.safetensors")
    resumed = load_file(tmp_path / "runs/chain/model/model.safetensors")
    assert reference.keys() == resumed.keys() and all(torch.equal(reference[k], resumed[k]) for k in reference)


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-mot"])
def test_the_one_generate_loop_decodes_routed_models_in_batches(name):
    """Their configs ask for router logits (the training loss needs them); Mixtral then computes the auxiliary loss
    in every decode step over the whole mask but one token, which failed for any batch of more than one prompt."""
    from tunelab.evaluation.evaluate import generate_tokens, left_pad

    torch.manual_seed(0)
    routed = load_causal_lm(str(REPO / "src/tunelab/assets" / name), random_init=True).eval()
    assert routed.config.output_router_logits
    tokenizer = type("Tok", (), {"pad_token_id": 3, "eos_token_id": 2})()
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10]], pad_id=3)
    new = generate_tokens(routed, tokenizer, ids, mask, {"max_new_tokens": 4, "do_sample": False})
    assert new.shape == (2, 4)


def test_a_pretrained_model_trains_in_train_mode():
    """from_pretrained hands back eval mode and Lightning keeps it: a MoT fine-tuned from a saved model routed
    sparsely instead of mixing (bench/architectures.py: mix and transition-tuned runs ended bitwise alike)."""
    from tunelab.training.module import TuneModule

    saved = load_causal_lm(str(MOT), random_init=True).eval()
    TuneModule(saved, tokenizer=None, optimizer=torch.optim.AdamW)
    assert all(m.training for m in saved.modules())
    assert all(layer.mlp.mixes() for layer in saved.model.layers)
