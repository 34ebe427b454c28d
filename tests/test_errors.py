"""User mistakes through the real console script: one `tunelab: <kind> error:` message, exit code, no traceback.

Every case runs `tunelab train ...` in a process of its own. One module fixture runs them all, a few at a time
(tests/procs.py: a pool as wide as the cores, each case's timeout counted from its own start); the tests then read
their results. One case of each kind of refusal (FRESH: refused in pre-flight, when the job builds its objects,
and a data error) starts a new interpreter (`python -m tunelab.cli`); the others are forked from the fork server
of tests/forkrun.py, which has imported torch, transformers and Lightning once (each fresh start paid those
imports: the fixture took about a minute on the 2-core machine).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from forkrun import run_all_forked
from procs import run_all
from tunelab import paths
from tunelab.config.schema import Overlength

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


def _bad_user_conf(root: Path) -> Path:
    conf = root / "user_conf"
    (conf / "model").mkdir(parents=True)
    tiny = (paths.conf_dir() / "model" / "tiny.yaml").read_text()
    assert "\nname_or_path:" in tiny
    (conf / "model" / "bad.yaml").write_text(tiny.replace("\nname_or_path:", "\nname_or_pth:"))
    return conf


# name -> (overrides, exit code, texts the message must contain)
CASES: dict[str, tuple[list[str], int, list[str]]] = {
    "unknown_key": (["hyperparams.lrr=1"], 2, [
        "unknown key 'lrr'", "hyperparams.lrr", "on the command line", "did you mean 'lr'?",
    ]),
    "group_option_typo": (["model=tinyy"], 2, [
        "unknown model option 'tinyy'", "override model=tinyy on the command line", "did you mean 'tiny'",
    ]),
    "group_name_typo": (["hyperparam=default"], 2, [
        "unknown key 'hyperparam'", "override hyperparam on the command line", "did you mean 'hyperparams'?",
        "a config group is chosen with group=option",
    ]),
    "wrong_type": (["hyperparams.batch_size=abc"], 2, [
        "wrong type or value 'abc'", "key hyperparams.batch_size",
        "override hyperparams.batch_size=abc on the command line", "hint: hyperparams.batch_size takes int",
    ]),
    "wrong_enum": (["dataset.overlength=trunc"], 2, [
        "wrong type or value 'trunc'", "key dataset.overlength",
        "override dataset.overlength=trunc on the command line",
        "did you mean 'truncate'?", "valid: " + ", ".join(sorted(o.value for o in Overlength)),
    ]),
    "format_as_a_value": (["dataset.format=chatt"], 2, [
        "dataset.format is a config group, not a value: 'chatt'", "override dataset.format=chatt on the command line",
        "choose it with dataset/format=chatt", "did you mean 'chat'?",
    ]),
    "unknown_format": (["dataset/format=chatt"], 2, [
        "unknown dataset/format option 'chatt'", "did you mean 'chat'?",
    ]),
    "unknown_key_in_user_yaml": (["--config-dir", "{conf}", "model=bad"], 2, [
        "unknown key 'name_or_pth' for tunelab.models.load.load_causal_lm", "key model.name_or_pth",
        "{conf}/model/bad.yaml:3", "did you mean 'name_or_path'",
    ]),
    "unknown_target_key_added": (["+method.peft.rr=3", "method=lora"], 2, [
        "unknown key 'rr' for peft.LoraConfig", "key method.peft.rr",
        "override +method.peft.rr=3 on the command line", "did you mean 'r'?",
    ]),
    "unknown_target_key_overridden": (["method.peft.rr=3", "method=lora"], 2, [
        "unknown key 'rr' for peft.LoraConfig", "override method.peft.rr on the command line",
        "did you mean 'r'?", "lora_dropout", "use_dora",  # LoraConfig's own arguments, not only the YAML's keys
    ]),
    "sweep_with_one_bad_value": (["-m", "hyperparams.batch_size=4,x"], 2, [
        "wrong type or value 'x'", "key hyperparams.batch_size", "takes int",
    ]),
    # Found only when the job builds its objects (a run directory exists), still one message and exit 2.
    "unreachable_hub_model": (["model=smollm2-135m-instruct", "logger=none"], 2, [
        "cannot load 'HuggingFaceTB/SmolLM2-135M-Instruct'", "key model.tokenizer_name_or_path", "HF_HUB_OFFLINE",
    ]),
    "missing_local_model": (["model.name_or_path=/nonexistent/model", "logger=none"], 2, [
        "model directory not found: /nonexistent/model", "key model.",
    ]),
    "peft_refuses_a_value": (["method=lora", "method.peft.bias=sometimes", "logger=none", "eval.baseline=false"], 2, [
        "PEFT cannot apply method.peft to this model", "Requested bias: sometimes", "key method.peft",
    ]),
    "packing_with_prefix_tuning": (["method=prefix_tuning", "hyperparams.packing=batch", "logger=none"], 2, [
        "packing cannot be combined with a prompt-learning method", "hyperparams.packing=none",
    ]),
    "packing_with_moe": (["model=tiny_moe", "hyperparams.packing=dataset", "logger=none"], 2, [
        "packing cannot be combined with a mixture-of-experts router loss", "hyperparams.packing=none",
    ]),
    "multirun_with_ddp": (["-m", "trainer=ddp_cpu", "hyperparams.lr=1e-3,2e-3"], 2, [
        "a sweep (-m) cannot run trials with trainer.strategy=ddp on 2 devices", "trainer.strategy=ddp_spawn",
    ]),
    "deepspeed_not_installed": (["trainer=deepspeed_zero3"], 2, [
        "trainer.strategy is DeepSpeed but the deepspeed package is not installed", "key trainer.strategy",
        "pip install -e '.[deepspeed]'",
    ]),
    "missing_data_file": (["dataset.source.path=/nonexistent/x.jsonl", "logger=none", "eval.baseline=false"], 3, [
        "tunelab: data error:", "/nonexistent/x.jsonl", "hint:",
    ]),
}


# One case of each kind through a new interpreter: refused in pre-flight, when the job builds its objects, bad data.
FRESH = {"unknown_key", "missing_local_model", "missing_data_file"}


def _skip_where_not_a_mistake(name: str) -> None:
    if name == "deepspeed_not_installed" and importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here: the refusal cannot happen")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path, Path]]:
    root = tmp_path_factory.mktemp("errors")
    conf = _bad_user_conf(root)
    commands, forked = {}, {}
    for name, (args, _, _) in CASES.items():
        out_dir = root / name
        out_dir.mkdir()
        argv = [a.format(conf=conf) for a in args] + [f"paths.output_dir={out_dir}"]
        if name in FRESH:
            commands[name] = ([sys.executable, "-m", "tunelab.cli", "train", *argv], {"cwd": out_dir, "env": ENV})
        else:
            forked[name] = ("train", argv, out_dir, ENV)
    # 120 s: one CLI's imports, composition and (for the runtime cases) building the tiny model, with room to spare.
    done = {**run_all(commands, seconds=120), **run_all_forked(forked, seconds=120)}
    return {name: (done[name], root / name, conf) for name in CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_user_mistake_is_one_message_with_exit_code(name, results):
    _skip_where_not_a_mistake(name)
    out, out_dir, conf = results[name]
    _, code, texts = CASES[name]
    text = out.stderr + out.stdout
    assert out.returncode == code, text
    assert "Traceback" not in text
    kind = "data" if code == 3 else "config"
    assert out.stderr.startswith(f"tunelab: {kind} error: "), out.stderr
    first, _, rest = out.stderr.partition("\n")
    assert rest.lstrip().startswith("hint: "), out.stderr  # `what, where` on one line, then the hint
    for needed in texts:
        assert needed.format(conf=conf) in out.stderr, f"{needed!r} not in:\n{out.stderr}"


RUNTIME = {"unreachable_hub_model", "missing_local_model", "peft_refuses_a_value", "packing_with_prefix_tuning",
           "packing_with_moe"}


@pytest.mark.parametrize("name", [n for n, (_, code, _) in CASES.items() if code == 2 and n not in RUNTIME])
def test_config_error_starts_no_job(name, results):
    """Config errors are caught before Hydra starts a job: no run or sweep directory, nothing trained."""
    _skip_where_not_a_mistake(name)
    _, out_dir, _ = results[name]
    assert not (out_dir / "runs").exists() and not (out_dir / "multiruns").exists()
    assert not list(out_dir.rglob("*.ckpt")) and not list(out_dir.rglob(".hydra"))


def test_data_error_names_the_file_not_a_key(results):
    out, _, _ = results["missing_data_file"]
    assert out.stderr.startswith("tunelab: data error: data file not found: /nonexistent/x.jsonl")
    assert "hint: check dataset.source.path" in out.stderr
