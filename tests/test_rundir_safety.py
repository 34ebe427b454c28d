"""A run directory is data, not code: generate/export execute nothing a tampered run directory asks for.

Each test plants one attack in a hand-made run directory (the tiny model saved as `tunelab train` saves it)
and checks that nothing ran (a marker file stays absent, a victim file keeps its bytes) and that the verb
ends with a tunelab error. On tunelab before issue 8 the first three ran the attacker's code.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from procs import budget
from tunelab import paths
from tunelab.config.compose import compose
from tunelab.errors import CheckpointError, TunelabError
from tunelab.models.load import load_run
from tunelab.verbs.generate import generate

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    """A run directory like `tunelab train` writes: model/ (safetensors, tokenizer, recipe), .hydra/config.yaml."""
    from tunelab.models.load import load_causal_lm, load_tokenizer

    run = tmp_path_factory.mktemp("run")
    tiny = str(paths.assets_dir() / "tiny-llama")
    load_causal_lm(tiny, random_init=True).save_pretrained(run / "model", safe_serialization=True)
    load_tokenizer(tiny).save_pretrained(run / "model")
    recipe = {"name": "x", "format": "prompt_completion", "system_prompt": None, "chat_template": None,
              "templates": [{"prompt": "Review: {{ text }}", "completion": "{{ sentiment }}"}]}
    (run / "model" / "tunelab_recipe.json").write_text(json.dumps(recipe))
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(
        {"model": {"trust_remote_code": False}, "method": {"peft": None, "quantization": None}}))
    return run


def _copy(run: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(run, dest)
    return dest


def _fields(values: dict) -> str:
    return "fields='" + json.dumps(values).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _generate(run: Path, *overrides: str) -> None:
    cfg = compose([f"run={run}", *overrides], config_name="generate", return_hydra_config=False)
    GlobalHydra.instance().clear()
    generate(cfg)


def test_clean_run_loads_and_renders(clean_run):
    """The fixture is a valid run: the attacks below fail because of what they plant, not a broken directory."""
    _generate(clean_run, _fields({"text": "fine"}), "decoding.max_new_tokens=2")


def test_recipe_template_cannot_run_code(clean_run, tmp_path):
    run = _copy(clean_run, tmp_path / "run")
    marker = tmp_path / "pwned"
    recipe = json.loads((run / "model" / "tunelab_recipe.json").read_text())
    recipe["templates"][0]["prompt"] = "{{ lipsum.__globals__['os'].makedirs(marker) }}"
    (run / "model" / "tunelab_recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(CheckpointError, match="unsafe"):
        _generate(run, _fields({"marker": str(marker)}), "decoding.max_new_tokens=2")
    assert not marker.exists()


def test_chat_template_in_the_run_cannot_run_code(clean_run, tmp_path):
    run = _copy(clean_run, tmp_path / "run")
    marker = tmp_path / "pwned"
    for name in ("chat_template.jinja",):
        (run / "model" / name).write_text(f"{{{{ cycler.__init__.__globals__.os.makedirs('{marker}') }}}}")
    with pytest.raises(CheckpointError, match="chat template"):
        _generate(run, "prompt=hi", "decoding.max_new_tokens=2")
    assert not marker.exists()


def test_saved_config_target_outside_the_allowlist_is_not_built(clean_run, tmp_path):
    """`builtins.open(victim, 'w')` as method.quantization in .hydra/config.yaml would truncate the victim."""
    run = _copy(clean_run, tmp_path / "run")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    saved = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    saved["method"]["quantization"] = {"_target_": "builtins.open", "file": str(victim), "mode": "w"}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(CheckpointError, match="builtins.open") as err:
        load_run(run)  # what generate does (quantize=True reads method.quantization)
    assert victim.read_text() == "precious\n"
    assert str(run / ".hydra" / "config.yaml") in err.value.message()
    # A class of a trusted package is no better: FileStore creates a file where the run says (and, with a folder
    # that does not exist, waits forever); only the listed quantization config classes are built.
    for target, args in (("torch.distributed.FileStore", {"file_name": str(tmp_path / "planted"), "world_size": 2}),
                         ("torch.distributed.FileStore", {"file_name": str(tmp_path / "no" / "dir"), "world_size": 2}),
                         ("transformers.TrainingArguments", {"output_dir": str(tmp_path / "planted_dir")})):
        saved["method"]["quantization"] = {"_target_": target, **args}
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(saved))
        with pytest.raises(CheckpointError, match="not one of the config classes"):
            load_run(run)
        assert not (tmp_path / "planted").exists() and not (tmp_path / "planted_dir").exists()
    for target in ("torch.load", "transformers.AutoModelForCausalLM.from_pretrained"):
        saved["method"]["quantization"] = {"_target_": target, "f": str(victim)}
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(saved))
        with pytest.raises(CheckpointError, match="refusing to build method.quantization"):
            load_run(run)


def test_trust_remote_code_comes_from_the_command_line_not_the_run(clean_run, tmp_path):
    """The run's saved config says trust_remote_code: true and model/ ships code that AutoConfig would import:
    `tunelab export` (through the real CLI) must not import it."""
    run = _copy(clean_run, tmp_path / "run")
    marker = tmp_path / "pwned"
    saved = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    saved["model"]["trust_remote_code"] = True
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(saved))
    (run / "model" / "evil.py").write_text(
        f"import os\nos.makedirs({str(marker)!r}, exist_ok=True)\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'llama'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    config = json.loads((run / "model" / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (run / "model" / "config.json").write_text(json.dumps(config))
    out = subprocess.run([sys.executable, "-m", "tunelab.cli", "export", f"run={run}", f"out={tmp_path / 'out'}"],
                         capture_output=True, text=True, timeout=budget(300), cwd=tmp_path,
                         env={**ENV, "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert not marker.exists(), out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.returncode == 0, out.stderr[-2000:]  # the built-in Llama code loads the weights; evil.py is ignored
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_pickled_weights_in_the_run_are_refused(clean_run, tmp_path):
    run = _copy(clean_run, tmp_path / "run")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.makedirs, (str(marker),)

    (run / "model" / "model.safetensors").unlink()
    (run / "model" / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(TunelabError, match="pickled weight file") as err:
        load_run(run)
    assert err.value.exit_code == 4
    assert not marker.exists()


def test_export_does_not_delete_a_directory_that_is_not_an_export(clean_run, tmp_path):
    """`out=` is replaced on export; `out=.` or a folder of someone's files must not be deleted."""
    from tunelab.errors import ConfigError
    from tunelab.verbs.export import export

    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("keep me\n")
    for out in (keep, clean_run):
        cfg = compose([f"run={clean_run}", f"out={out}"], config_name="export", return_hydra_config=False)
        GlobalHydra.instance().clear()
        with pytest.raises(ConfigError, match="is not an earlier export"):
            export(cfg)
    assert (keep / "notes.txt").read_text() == "keep me\n" and (clean_run / "model" / "config.json").is_file()


def test_export_never_writes_into_a_run(clean_run, tmp_path):
    """`out=<run>/model` once rewrote the run's own weights and deleted tunelab_recipe.json; `out=<another run>/model`
    replaced that run's weights; `out=<symlink>` was a traceback. Each is refused before the model loads."""
    from tunelab.errors import ConfigError
    from tunelab.verbs.export import export

    other = _copy(clean_run, tmp_path / "other")
    link = tmp_path / "link"
    link.symlink_to(other / "model", target_is_directory=True)
    before = {p: p.read_bytes() for p in (clean_run / "model").iterdir() if p.is_file()}
    cases = {clean_run / "model": "part of it", clean_run / "checkpoints": "part of it",
             other / "model": "inside another run", other / "export": "inside another run",
             other / "model" / "sub": "inside another run", link: "symbolic link"}
    for out, why in cases.items():
        cfg = compose([f"run={clean_run}", f"out={out}"], config_name="export", return_hydra_config=False)
        GlobalHydra.instance().clear()
        with pytest.raises(ConfigError, match=why):
            export(cfg)
    assert {p: p.read_bytes() for p in (clean_run / "model").iterdir() if p.is_file()} == before
    assert (other / "model" / "config.json").is_file() and not (other / "model" / "sub").exists()


# ---- damaged files: refused before loading, one line and exit 4 (issue 21 item 5) ---------------------------------
def _safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def _write_safetensors(path: Path, header: dict, data: bytes, length: int | None = None) -> None:
    text = json.dumps(header).encode()
    path.write_bytes((len(text) if length is None else length).to_bytes(8, "little") + text + data)


def _retensor(model: Path, change) -> None:
    """Rewrite the first tensor's header entry of model.safetensors with `change(entry)`."""
    header, data = _safetensors(model / "model.safetensors")
    change(header[next(k for k in header if k != "__metadata__")])
    _write_safetensors(model / "model.safetensors", header, data)


def _link(path: Path, target: str) -> None:
    path.unlink()
    path.symlink_to(target)


DAMAGE = {  # name: (damage model/ in place, the file the error must name, what it must say)
    "weights linked to /etc/passwd": (lambda m: _link(m / "model.safetensors", "/etc/passwd"),
                                      "model.safetensors", "outside the run directory"),
    "tokenizer linked elsewhere": (lambda m: _link(m / "tokenizer.json", "/etc/hostname"),
                                   "tokenizer.json", "outside the run directory"),
    "model/ linked elsewhere": (lambda m: (m / "base").symlink_to("/etc", target_is_directory=True),
                                "base", "outside the run directory"),
    "a tensor claiming 100 GB": (lambda m: _retensor(m, lambda t: t["data_offsets"].__setitem__(1, 100 * 2**30)),
                                 "model.safetensors", "outside the file"),
    "a header length of 2^62": (lambda m: _write_safetensors(m / "model.safetensors", *_safetensors(
        m / "model.safetensors"), length=2**62), "model.safetensors", "header length of 4611686018427387904"),
    "a shape its bytes do not hold": (lambda m: _retensor(m, lambda t: t.__setitem__("shape", [2, *t["shape"]])),
                                      "model.safetensors", "but data_offsets hold"),
    "a header that is not JSON": (lambda m: (m / "model.safetensors").write_bytes((4).to_bytes(8, "little") + b"{bad"),
                                  "model.safetensors", "does not parse"),
    "tokenizer.json not JSON": (lambda m: (m / "tokenizer.json").write_text("{not json"), "tokenizer.json",
                                "cannot read tokenizer.json"),
    "config.json a list": (lambda m: (m / "config.json").write_text("[1, 2]"), "config.json", "not a JSON object"),
    "a FIFO for a tokenizer file": (lambda m: os.mkfifo(m / "special_tokens_map.json"), "special_tokens_map.json",
                                    "not a regular file"),
    "config.json without a model type": (lambda m: (m / "config.json").write_text("{}"), "",
                                         "cannot load the run's model"),  # passes the checks: the library refuses
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_model_directory_is_a_checkpoint_error_naming_the_file(clean_run, tmp_path, kind):
    """Each damage once ended in a traceback (exit 1) from safetensors, json or transformers, or in a config error
    (exit 2) blaming model.tokenizer_name_or_path; now load_run (what generate, export, eval and serve call)
    refuses it with one line naming the file, exit 4."""
    run = _copy(clean_run, tmp_path / "run")
    damage, name, says = DAMAGE[kind]
    damage(run / "model")
    with pytest.raises(CheckpointError) as err:
        load_run(run)
    text = err.value.message()
    assert says in text and f"{run / 'model' / name}" in text and err.value.exit_code == 4, text


def test_links_inside_the_run_still_load(clean_run, tmp_path):
    """The check refuses links out of the run, not links: weights kept elsewhere in the run, a loop of folders."""
    run = _copy(clean_run, tmp_path / "run")
    (run / "store").mkdir()
    (run / "model" / "model.safetensors").rename(run / "store" / "weights.safetensors")
    (run / "model" / "model.safetensors").symlink_to(run / "store" / "weights.safetensors")
    (run / "model" / "sub").mkdir()
    (run / "model" / "sub" / "up").symlink_to(run / "model", target_is_directory=True)
    model, _, recipe = load_run(run)
    assert recipe["name"] == "x" and sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "LINK"])
def test_eval_refuses_a_damaged_metrics_json(clean_run, tmp_path, content):
    """`tunelab eval run=<dir>` read the run's metrics.json with a bare json.loads: a traceback (exit 1)."""
    from tunelab.verbs.eval import evaluate_cfg

    run = _copy(clean_run, tmp_path / "run")
    if content == "LINK":
        (run / "metrics.json").symlink_to("/etc/passwd")
    else:
        (run / "metrics.json").write_text(content)
    cfg = compose([f"run={run}", "logger=none", f"paths.output_dir={tmp_path / 'eval'}"], config_name="eval")
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.run_dir = str(tmp_path / "eval")
    with pytest.raises(CheckpointError) as err:
        evaluate_cfg(cfg)
    assert str(run / "metrics.json") in err.value.message() and err.value.exit_code == 4


@pytest.mark.slow  # two console-script processes (11 s); the in-process cases above run in the fast tier
def test_damaged_run_on_the_command_line_is_exit_4_without_a_traceback(clean_run, tmp_path):
    """The CLI path of the cases above, for generate and export: one `tunelab: checkpoint error` line, exit 4."""
    run = _copy(clean_run, tmp_path / "run")
    DAMAGE["a header length of 2^62"][0](run / "model")
    for args in (["generate", f"run={run}", "prompt=hi"], ["export", f"run={run}", f"out={tmp_path / 'out'}"]):
        out = subprocess.run([sys.executable, "-m", "tunelab.cli", *args], capture_output=True, text=True,
                             timeout=600, cwd=tmp_path, env=ENV)
        assert out.returncode == 4, out.stderr[-2000:]
        assert "tunelab: checkpoint error: model.safetensors has a header length" in out.stderr, out.stderr[-2000:]
        assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "out").exists()
