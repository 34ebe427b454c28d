"""`tunelab generate` answers like the trained run; `tunelab export` writes a model plain transformers loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from conftest import REPO, make_cfg
from procs import budget
from tunelab.cli import literal
from tunelab.config.compose import compose
from tunelab.errors import ConfigError
from tunelab.models.load import load_run
from tunelab.verbs.export import export
from tunelab.verbs.generate import generate
from tunelab.verbs.train import train

QUIET = ["eval.baseline=false", "eval.test=false", "eval.generate_on_val=false", "eval.max_eval_samples=16",
         "logger=none"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
TEST_ROWS = [json.loads(line) for line in (REPO / "data/reviews/test.jsonl").read_text().splitlines()]
POSITIVE = next(r for r in TEST_ROWS if r["sentiment"] == "positive")
NEGATIVE = next(r for r in TEST_ROWS if r["sentiment"] == "negative")


def _prompt(row: dict) -> str:
    """The first training template of the bundled sentiment dataset, rendered for `row`."""
    return f"Is the following review positive or negative?\n\nTitle: {row['title']}\nReview: {row['text']}"



def _tunelab(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunelab.cli", *args], capture_output=True, text=True,
                          input=stdin, env=ENV, timeout=budget(300))


def _verb_cfg(verb: str, overrides: list[str]):
    cfg = compose(overrides, config_name=verb, return_hydra_config=False)
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """The tiny model fully fine-tuned long enough to learn the bundled sentiment task (once per module)."""
    run = tmp_path_factory.mktemp("full")
    # The demo's schedule (2 epochs): shorter runs sit on a loss plateau whose length depends on the data order.
    metrics = train(make_cfg(run, [*QUIET, "hyperparams.epochs=2", "eval.test=true", "eval.max_eval_samples=64"]))
    assert metrics["test/accuracy"] >= 0.9, metrics
    return run


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("lora")
    train(make_cfg(run, ["method=lora", *QUIET, "hyperparams.max_steps=4"]))
    return run


@pytest.fixture(scope="module")
def prompt_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("prompt")
    train(make_cfg(run, ["method=prompt_tuning", *QUIET, "hyperparams.max_steps=2"]))
    return run


@pytest.mark.slow  # a 2-epoch training
def test_generate_answers_the_task(full_run):
    positive = _tunelab("generate", f"run={full_run}", f"prompt={literal(_prompt(POSITIVE))}")
    assert positive.returncode == 0, positive.stderr[-3000:]
    assert positive.stdout.strip() == "positive"


@pytest.mark.slow  # a 2-epoch training
def test_generate_renders_fields_and_chats(full_run, monkeypatch, capsys):
    fields = json.dumps({"title": NEGATIVE["title"], "text": NEGATIVE["text"]})
    conversation = generate(_verb_cfg("generate", [f"run={full_run}", f"fields={literal(fields)}"]))
    assert conversation[0]["content"] == _prompt(NEGATIVE)  # the training template, rendered
    assert conversation[-1] == {"role": "assistant", "content": "negative"}
    assert capsys.readouterr().out.strip() == "negative"  # streamed
    import io

    typed = [_prompt(row).replace("\n", "\\\n") for row in (POSITIVE, NEGATIVE)]  # \ continues a line
    monkeypatch.setattr(sys, "stdin", io.StringIO(typed[0] + "\n\n" + typed[1] + "\n"))
    chat = generate(_verb_cfg("generate", [f"run={full_run}", "interactive=true"]))
    assert [m["role"] for m in chat] == ["user", "assistant", "user", "assistant"]  # history kept
    assert [chat[1]["content"], chat[3]["content"]] == ["positive", "negative"]
    assert chat[2]["content"] == _prompt(NEGATIVE)


def test_generate_refuses_missing_run_and_prompt(tmp_path, lora_run):
    # Any trained run serves (the 4-step LoRA run): the refusal comes before an answer. The 2-epoch full_run this
    # used to take cost a minute of the fast tier's (make test-fast) 3.
    with pytest.raises(ConfigError, match="no trained model in"):
        generate(_verb_cfg("generate", [f"run={tmp_path}", "prompt=hi"]))
    with pytest.raises(ConfigError, match="give exactly one of prompt= and fields="):
        generate(_verb_cfg("generate", [f"run={lora_run}"]))


def test_sampling_group_has_greedy_default_and_creative():
    cfg = _verb_cfg("generate", [])
    assert cfg.decoding.do_sample is False
    creative = _verb_cfg("generate", ["decoding=creative"]).decoding
    assert creative.do_sample is True and 0 < creative.temperature < 1 and creative.top_p < 1


def test_lora_export_loads_in_plain_transformers(lora_run, tmp_path):
    out = tmp_path / "export"
    export(_verb_cfg("export", [f"run={lora_run}", f"out={out}"]))
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "chat_template.jinja"} <= names
    assert not any(n.endswith((".bin", ".pt", ".ckpt")) or n.startswith("adapter") for n in names)
    model, tokenizer, _ = load_run(lora_run)  # tunelab's in-memory model: base + unmerged adapter
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())  # trained, non-zero
    ids = tokenizer.apply_chat_template([{"role": "user", "content": _prompt(POSITIVE)}], add_generation_prompt=True,
                                        return_dict=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    script = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
        tok = AutoTokenizer.from_pretrained({str(out)!r})
        assert tok.chat_template and tok.eos_token == "<|im_end|>"
        ids = torch.tensor(json.load(open({str(tmp_path / 'ids.json')!r})))
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        torch.save(logits, {str(tmp_path / 'logits.pt')!r})
        print(sorted(m for m in sys.modules if m.split('.')[0] in ('tunelab', 'peft')))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=budget(300))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"  # neither tunelab nor peft was imported
    logits = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert torch.allclose(logits, expected, atol=1e-4)


def test_prompt_tuning_exports_adapter_with_base(prompt_run, tmp_path, capsys):
    out = tmp_path / "export"
    export(_verb_cfg("export", [f"run={prompt_run}", f"out={out}"]))
    assert "not merged: this adapter cannot live in the base weights" in capsys.readouterr().out
    assert (out / "adapter_model.safetensors").is_file() and (out / "base/model.safetensors").is_file()
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((out / "base").resolve())
    from peft import AutoPeftModelForCausalLM

    reloaded = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    model, _, _ = load_run(prompt_run)
    ids = torch.randint(4, 2000, (1, 9))
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


def test_merge_of_prompt_tuning_is_a_config_error(prompt_run, tmp_path):
    done = _tunelab("export", f"run={prompt_run}", f"out={tmp_path / 'x'}", "merge=true")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "tunelab: config error: a PROMPT_TUNING adapter cannot be merged into the base weights" in done.stderr
    assert "merge=false" in done.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # two console-script processes (13 s): the fast tier keeps the in-process round trip
def test_readme_prompt_with_a_comma_a_question_mark_and_a_colon(lora_run):
    """The README's example, typed as a user types it: `prompt="... works well."` failed (Hydra read the comma
    as a sweep); `--prompt` takes the text literally, and `--prompt -` reads it from standard input."""
    text = "Is this review positive or negative? Great product: works well, really = 5 stars ${oc.env:HOME}"
    expected = generate(_verb_cfg("generate", [f"run={lora_run}", f"prompt={literal(text)}"]))
    assert expected[0]["content"] == text  # the interpolation stays text: a prompt never reads the environment
    answer = expected[-1]["content"]
    typed = _tunelab("generate", f"run={lora_run}", "--prompt", text)
    assert typed.returncode == 0 and typed.stdout.strip() == answer.strip(), typed.stderr[-3000:]
    piped = _tunelab("generate", f"run={lora_run}", "--prompt", "-", stdin=text + "\n")
    assert piped.returncode == 0 and piped.stdout.strip() == answer.strip(), piped.stderr[-3000:]
