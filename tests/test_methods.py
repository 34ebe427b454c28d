"""Fine-tuning methods: each trains only what it should, with a trainable count computed by hand;
LoRA's identities (zero init, merge); QLoRA and bad combinations refused; MoE aux loss; LoRA resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import peft
import pytest
import torch
from omegaconf import OmegaConf

import tunelab.verbs.train as train_mod
from conftest import REPO, make_cfg
from tunelab.config.build import build
from tunelab.config.compose import compose
from tunelab.errors import ConfigError
from tunelab.models.load import load_causal_lm
from tunelab.models.method import apply_method, build_method

TINY = json.loads((REPO / "src/tunelab/assets/tiny-llama/config.json").read_text())
MOE = json.loads((REPO / "src/tunelab/assets/tiny-moe/config.json").read_text())
FAST = ["hyperparams.max_steps=2", "eval.baseline=false", "eval.test=false", "eval.generate_on_val=false",
        "eval.max_eval_samples=16", "logger=none"]
METHODS = sorted(p.stem for p in (REPO / "conf/method").glob("*.yaml"))


def _linears(cfg: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of every linear layer of one Llama block, from config.json numbers."""
    h, i, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def _block_params(cfg: dict) -> int:
    return sum(a * b for a, b in _linears(cfg).values()) + 2 * cfg["hidden_size"]  # + two RMSNorm gains


def expected_trainable(method: str, cfg: dict = TINY) -> int:
    """Trainable parameters of a method on the tiny Llama, by hand from config.json and the method's own values
    (rank, virtual tokens, frozen layers). Keyed by the PEFT class the YAML builds, so a new variant of a known
    kind (a LoRA with another rank, say) is covered without editing this test."""
    node = compose([f"method={method}"], return_hydra_config=False).method
    layers, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
    lin = _linears(cfg)
    kv_dim = cfg["num_key_value_heads"] * cfg["head_dim"]
    if node.peft is None:
        if node.get("freeze") is not None:  # the last N blocks (plus any pattern matches)
            assert not node.freeze.patterns, f"add pattern matches of method {method} to expected_trainable"
            return node.freeze.last_n_layers * _block_params(cfg)
        return sum(_block_params(cfg) for _ in range(layers)) + cfg["vocab_size"] * hidden + hidden  # tied head
    kind, peft = node.peft._target_, node.peft
    if kind == "peft.LoraConfig":
        assert peft.target_modules == "all-linear", f"add {method}'s target modules to expected_trainable"
        lora = sum(peft.r * (a + b) for a, b in lin.values()) * layers  # r·(in+out), every linear but lm_head
        if peft.get("use_dora"):
            lora += sum(b for _, b in lin.values()) * layers  # + one magnitude per output row
        return lora
    if kind == "peft.IA3Config":  # a vector per target: its output, or its input for feed-forward modules
        return sum(lin[m][0] if m in peft.feedforward_modules else lin[m][1] for m in peft.target_modules) * layers
    if kind == "peft.PromptTuningConfig":
        return peft.num_virtual_tokens * hidden
    if kind == "peft.PrefixTuningConfig" and not peft.prefix_projection:
        # PEFT's prefix (no projection): virtual tokens × layers × 2 (key, value) × kv heads·head dim
        return peft.num_virtual_tokens * layers * 2 * kv_dim
    pytest.fail(f"method {method} builds {kind}: add its expected trainable count to expected_trainable")


@pytest.fixture(scope="module")
def fast(tmp_path_factory) -> list[str]:
    """FAST with one tokenised-data cache for the module: each run then skips re-tokenising the dataset."""
    return [*FAST, f"paths.cache_dir={tmp_path_factory.mktemp('cache')}"]


@pytest.fixture
def spy(monkeypatch):
    """Captures the model `train` builds, and a copy of its weights before training."""
    seen: dict = {}
    real = train_mod.apply_method

    def capture(*args, **kwargs):
        model = real(*args, **kwargs)
        seen["model"] = model
        seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return model

    monkeypatch.setattr(train_mod, "apply_method", capture)
    return seen


def test_methods_are_discovered():
    wanted = {"full", "lora", "dora", "rslora", "ia3", "prompt_tuning", "prefix_tuning", "qlora", "freeze"}
    assert wanted <= set(METHODS)


@pytest.mark.slow  # one training per method
@pytest.mark.parametrize("method", [m for m in METHODS if m != "qlora"])
def test_method_trains_only_its_parameters(method, tmp_path, spy, fast):
    metrics = train_mod.train(make_cfg(tmp_path, [f"method={method}", *fast]))
    model = spy["model"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), spy["before"][n])}
    assert metrics["params/trainable"] == expected_trainable(method)
    assert changed == trainable  # every trainable tensor moved, no frozen one did
    if method != "full":  # adapters: the checkpoint and model/ hold only what trains
        ckpt = torch.load(tmp_path / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
        assert set(ckpt["state_dict"]) == {f"model.{n}" for n in trainable}


def test_qlora_refused_on_cpu(tmp_path, fast):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: QLoRA is allowed")
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        train_mod.train(make_cfg(tmp_path, ["method=qlora", *fast]))


def test_quantized_full_finetuning_refused():
    quantization = "{_target_: transformers.BitsAndBytesConfig, load_in_4bit: true}"
    cfg = compose(["method=full", f"+method.quantization={quantization}"])
    with pytest.raises(ConfigError, match="cannot be fully fine-tuned") as err:
        build_method(cfg.method)
    assert err.value.exit_code == 2 and "method=qlora" in err.value.hint


def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    return load_causal_lm(str(REPO / "src/tunelab/assets/tiny-llama"), random_init=True).eval()


def _method(name: str, *overrides: str):
    return build_method(compose([f"method={name}", *overrides]).method)


def test_unmatched_target_modules_name_the_modules():
    with pytest.raises(ConfigError) as err:
        apply_method(_tiny(), _method("lora", "method.peft.target_modules=[qkv_proj]"))
    text = err.value.message()
    assert "Target modules {'qkv_proj'} not found in the base model" in text  # peft 0.21's own words
    assert "key method.peft.target_modules" in text
    assert "linear modules here: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in text


def test_freeze_patterns_and_bad_pattern():
    model = apply_method(_tiny(), _method("freeze", "method.freeze.last_n_layers=0",
                                          "method.freeze.patterns=[lm_head,'model\\.norm']"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"model.norm.weight", "model.embed_tokens.weight"}  # lm_head is tied to the embeddings
    with pytest.raises(ConfigError, match="'nothing_here' matches no parameter"):
        apply_method(_tiny(), _method("freeze", "method.freeze.patterns=[nothing_here]"))


def test_lora_zero_init_keeps_logits_and_merge_matches():
    ids = torch.randint(4, TINY["vocab_size"], (2, 12))
    base_logits = _tiny()(input_ids=ids).logits
    model = apply_method(_tiny(), _method("lora")).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base_logits)  # B = 0: the adapter adds exactly 0
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
        unmerged = model(input_ids=ids).logits
        assert (unmerged - base_logits).abs().max() > 1e-3  # the adapter now matters
        merged = model.merge_and_unload()(input_ids=ids).logits
    assert torch.allclose(merged, unmerged, atol=1e-5)


def test_moe_aux_loss_in_training_loss():
    """The step's loss is CE summed over tokens + coef × aux × tokens (so coef × aux after normalisation)."""
    from tunelab.objectives.sft import router_aux_loss_coef, summed_token_loss
    from tunelab.training.module import TuneModule

    torch.manual_seed(0)
    model = load_causal_lm(str(REPO / "src/tunelab/assets/tiny-moe"), random_init=True)
    module = TuneModule(model, tokenizer=None, optimizer=torch.optim.AdamW)
    ids = torch.randint(4, MOE["vocab_size"], (2, 10))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "pad_fraction": 0.0}
    loss = module.training_step(batch, 0)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    ce, tokens = summed_token_loss(out.logits, labels)
    assert router_aux_loss_coef(module.model) == MOE["router_aux_loss_coef"] == 0.02
    assert out.aux_loss > 0
    assert torch.allclose(loss, ce + 0.02 * out.aux_loss * tokens)
    assert float(module._window_loss) == pytest.approx(float(ce))  # train/loss stays the token-mean CE


@pytest.mark.parametrize("method", ["full", "lora"])
def test_moe_trains_and_logs_aux_loss(method, tmp_path, spy, fast):
    overrides = ["model=tiny_moe", f"method={method}", "logger=csv", "trainer.log_every_n_steps=1"]
    if method == "lora":
        overrides.append("method.peft.lora_dropout=0.0")  # PEFT: no dropout on expert parameters
    metrics = train_mod.train(make_cfg(tmp_path, [*fast, *overrides]))
    model = spy["model"]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), spy["before"][n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}
    assert metrics["params/total"] > 3_000_000
    if method == "full":
        assert any("experts" in n for n in changed) and any("router" in n or "gate" in n for n in changed)
    header = (tmp_path / "csv/metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/aux_loss" in header
    # router figures (tunelab.objectives.routing): top-2 of 4 experts, each step's shares sum to 1, dropless
    assert {"train/router/entropy", "train/router/imbalance", "train/router/dropped_tokens"} <= set(header)
    rows = [r for r in csv.DictReader((tmp_path / "csv/metrics.csv").open()) if r.get("train/router/entropy")]
    assert rows and all(sum(float(r[f"train/router/share/{e}"]) for e in range(4)) == pytest.approx(1.0) for r in rows)
    assert all(float(r["train/router/dropped_tokens"]) == 0 and 1 <= float(r["train/router/imbalance"]) <= 4
               for r in rows)


def test_lora_resume_restores_every_trainable_tensor(tmp_path, spy, fast):
    first = tmp_path / "first"
    train_mod.train(make_cfg(first, ["method=lora", *fast, "hyperparams.max_steps=3"]))
    ckpt_path = first / "checkpoints/last.ckpt"
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3
    assert saved["optimizer_states"][0]["state"]  # AdamW moments travel with the adapter weights
    # Resume with the same budget: nothing more to train, so the model must equal the checkpoint exactly.
    second = tmp_path / "second"
    train_mod.train(make_cfg(second, ["method=lora", *fast, "hyperparams.max_steps=3", f"resume={ckpt_path}"]))
    params = dict(spy["model"].named_parameters())
    trainable = {f"model.{n}" for n, p in params.items() if p.requires_grad}
    assert set(saved["state_dict"]) == trainable
    for key, tensor in saved["state_dict"].items():
        assert torch.equal(params[key.removeprefix("model.")].detach(), tensor), key
    # and the resumed weights are not simply a fresh init
    assert any(not torch.equal(spy["before"][k.removeprefix("model.")], v) for k, v in saved["state_dict"].items())


def test_method_configs_are_peft_objects():
    for name in METHODS:
        node = OmegaConf.load(REPO / f"conf/method/{name}.yaml")
        first = (REPO / f"conf/method/{name}.yaml").read_text().splitlines()[0]
        assert first.startswith("# "), name
        assert "peft" in node or "defaults" in node, name
        node = compose([f"method={name}"], return_hydra_config=False).method
        if node.peft is not None:  # a PEFT method is PEFT's own config object, not a copy of its fields
            built = build(node.peft)  # the node alone: method=qlora's quantization needs a GPU to build
            assert isinstance(built, peft.PeftConfig), name
            assert type(built).__module__.startswith("peft."), name


@pytest.mark.gpu
def test_qlora_trains_on_gpu(tmp_path, spy, fast):
    """On a CUDA machine: LoRA on a 4-bit NF4 base trains and only the adapter moves."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    base = tmp_path / "base"
    _tiny().save_pretrained(base, safe_serialization=True)  # QLoRA quantizes pretrained weights
    run = tmp_path / "run"
    metrics = train_mod.train(make_cfg(run, ["method=qlora", "trainer=gpu", *fast, f"model.name_or_path={base}",
                                             f"model.tokenizer_name_or_path={REPO}/src/tunelab/assets/tiny-llama",
                                             "model.random_init=false"]))
    model = spy["model"]
    assert metrics["params/trainable"] == expected_trainable("lora")
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), spy["before"][n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("Linear4bit" in type(m).__name__ for m in model.modules())
    assert Path(run / "model/adapter_model.safetensors").is_file()
