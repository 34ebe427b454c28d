"""Every YAML under conf/ composes and validates; `_target_` nodes bind to their targets; user config dirs work."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from procs import budget
from tunelab import paths
from tunelab.config.compose import compose
from tunelab.config.targets import INSTANTIATE_KEYS
from tunelab.config.validate import validate
from tunelab.errors import ConfigError

CONF = paths.conf_dir()
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
TUNELAB = [sys.executable, "-m", "tunelab.cli", "train"]

# Files that are not `group=option` choices of `train`, each with the reason. Top-level files are the
# primary configs of the verbs (train.yaml, ...): each is composed by name in test_every_primary_config.
SKIPPED_GROUPS: dict[str, str] = {
    "prompting": "an option of `tunelab eval`, not train: composed with eval.yaml in test_eval.py",
    "documents": "an option of `tunelab eval`, not train: composed with eval.yaml in test_eval.py",
    "retriever": "an option of `tunelab eval` and `train-retriever`, not train: composed in test_eval.py",
}


def _discover() -> list[Path]:
    return sorted(p.relative_to(CONF) for p in CONF.rglob("*.yaml"))


def _cases() -> list:
    cases = []
    for rel in _discover():
        if len(rel.parts) == 1:
            continue  # a primary config, not a group option
        reason = SKIPPED_GROUPS.get(rel.parts[0])
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        cases.append(pytest.param(rel, marks=marks, id=str(rel)))
    return cases


@pytest.mark.parametrize("name", sorted(p.stem for p in CONF.glob("*.yaml")))
def test_every_primary_config_composes(name):
    cfg = compose([], config_name=name)
    validate(cfg)
    assert cfg.task_name == name  # each verb's primary config names its own task


@pytest.fixture(scope="module")
def base_choices() -> dict[str, str | None]:
    return dict(compose([]).hydra.runtime.choices)


def _override(rel: Path, choices: dict[str, str | None]) -> str:
    """How a user selects the file `rel`: `group=option`, `group=sub/option` or `+group=option`."""
    parts = rel.with_suffix("").parts
    for cut in range(len(parts) - 1, 0, -1):  # the longest group prefix the defaults list knows
        group, option = "/".join(parts[:cut]), "/".join(parts[cut:])
        if group in choices:
            return f"{group}={option}"
    return f"+{'/'.join(parts[:-1])}={parts[-1]}"


def test_discovery_finds_the_config_tree():
    found = {str(p) for p in _discover()}
    assert len(found) >= 10, found
    assert len(_cases()) >= 10
    # Groups every run composes; if these vanish, discovery is looking in the wrong place.
    for expected in ("train.yaml", "model/tiny.yaml", "method/lora.yaml", "method/full.yaml",
                     "dataset/reviews_sentiment.yaml", "hyperparams/default.yaml", "objective/sft.yaml"):
        assert expected in found


def test_override_spelling(base_choices):
    assert _override(Path("model/tiny.yaml"), base_choices) == "model=tiny"
    assert _override(Path("debug/fdr.yaml"), base_choices) == "debug=fdr"  # `debug: null` in the defaults
    assert _override(Path("method/variants/x.yaml"), base_choices) == "method=variants/x"
    assert _override(Path("nogroup/x.yaml"), base_choices) == "+nogroup=x"


# Options of a group that only another verb's primary config composes, composed with that config: a pipeline may
# override the pipeline config's own groups (sft_then_dpo sets adapter_carry), which train.yaml does not have.
PRIMARY_OF = {"pipeline": "pipeline"}


def _compose_option(rel: Path, base_choices: dict[str, str | None]) -> tuple[str, DictConfig]:
    primary = PRIMARY_OF.get(rel.parts[0])
    if primary is None:
        override = _override(rel, base_choices)
        return override, compose([override])
    override = _override(rel, dict(compose([], config_name=primary).hydra.runtime.choices))
    return override, compose([override], config_name=primary)


@pytest.mark.parametrize("rel", _cases())
def test_every_yaml_composes_and_validates(rel: Path, base_choices):
    override, cfg = _compose_option(rel, base_choices)
    validate(cfg)
    group, _, option = override.lstrip("+").partition("=")
    assert cfg.hydra.runtime.choices[group] == option
    if (CONF / rel).read_text().find("@package _global_") < 0 and "/" not in group:
        assert group in cfg  # a non-global option lands under its group's key


def _target_nodes(node, path=""):
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for key in node:
            if not path and key == "hydra":
                continue
            yield from _target_nodes(node._get_node(key), f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for i, child in enumerate(node):
            yield from _target_nodes(child, f"{path}[{i}]")


@pytest.mark.parametrize("rel", [c for c in _cases() if not c.marks])
def test_target_nodes_bind_to_their_signatures(rel: Path, base_choices):
    """Independent of validate(): every `_target_` node's keys bind to the target's signature."""
    _, cfg = _compose_option(rel, base_choices)
    nodes = list(_target_nodes(cfg))
    assert rel.parts[0] in PRIMARY_OF or any(path == "module" for path, _ in nodes)
    for path, node in nodes:
        target = get_object(str(node._get_node("_target_")._value()))
        keys = [str(k) for k in node if k not in INSTANTIATE_KEYS]
        try:
            inspect.signature(target).bind_partial(**dict.fromkeys(keys))
        except TypeError as err:
            pytest.fail(f"{rel}: {path} ({node._target_}) does not bind: {err}")


@pytest.mark.parametrize(("node", "bad", "suggestion"), [
    ("model", "name_or_pth", "name_or_path"),
    ("method.peft", "rr", "r"),
    ("hyperparams.optimizer", "betass", "betas"),
    ("callbacks.best", "save_top", "save_top_k"),
])
def test_validate_rejects_an_injected_bad_key(node, bad, suggestion):
    cfg = compose(["method=lora"])
    with open_dict(cfg):
        OmegaConf.select(cfg, node)[bad] = 3
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    text = info.value.message()
    assert text.startswith("tunelab: config error: unknown key")
    assert f"key {node}.{bad}" in text
    assert f"did you mean '{suggestion}'" in text


@pytest.mark.parametrize("rel", _discover(), ids=str)
def test_every_yaml_opens_with_a_header_comment(rel: Path):
    lines = (CONF / rel).read_text().splitlines()
    if lines[0].startswith("# @package"):
        # Hydra reads `# @package` only in the leading `# @key value` lines, so it comes first here
        # (hydra/plugins/config_source.py, _get_header_dict); the human header follows it.
        lines = lines[1:]
    first = lines[0]
    assert first.startswith("# ") and not first.startswith("# @") and len(first) > 10, f"{rel}: header {first!r}"


def _user_conf(tmp_path: Path) -> Path:
    conf = tmp_path / "my_conf"
    (conf / "model").mkdir(parents=True)
    text = (CONF / "model" / "tiny.yaml").read_text()
    assert "attn_implementation: sdpa" in text
    (conf / "model" / "my_model.yaml").write_text(
        "# A user's model: the tiny Llama with eager attention.\n"
        + text.split("\n", 1)[1].replace("attn_implementation: sdpa", "attn_implementation: eager")
    )
    return conf


def test_user_config_dir_composes(tmp_path):
    cfg = compose(["model=my_model"], config_dir=str(_user_conf(tmp_path)))
    validate(cfg)
    assert cfg.hydra.runtime.choices.model == "my_model"
    assert cfg.model.attn_implementation == "eager"
    assert cfg.model._target_ == "tunelab.models.load.load_causal_lm"


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(TUNELAB + args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=budget(120))


def test_cli_user_config_dir_and_cfg_job(tmp_path):
    conf = _user_conf(tmp_path)
    # Overrides on both sides of a flag: the CLI appends run_id=..., which argparse alone would reject.
    # --resolve: the CLI resolves its own `${tunelab_path:}` interpolations; this process has not registered
    # tunelab's resolvers (run alone, reading model.name_or_path here would fail).
    out = _run(["--config-dir", str(conf), "model=my_model", "hyperparams.lr=0.5", "--cfg", "job", "--resolve",
                "hyperparams.seed=7"], tmp_path)
    assert out.returncode == 0, out.stderr
    job = OmegaConf.create(out.stdout)
    assert job.model.attn_implementation == "eager"
    assert job.model.name_or_path.endswith("tiny-llama") and Path(job.model.name_or_path).is_dir()
    assert (job.hyperparams.lr, job.hyperparams.seed) == (0.5, 7)
    assert "hydra" not in job and job.run_id  # the job config, with the run id the CLI pinned
    assert not (tmp_path / "outputs").exists()  # --cfg job prints; it starts no run


def _groups() -> dict[str, list[str]]:
    """Every config group under conf/ (a subgroup as dataset/format) and its options, read from the tree."""
    groups: dict[str, list[str]] = {}
    for rel in _discover():
        if len(rel.parts) > 1 and rel.parts[0] != "hydra":  # Hydra's own groups have their own help section
            groups.setdefault("/".join(rel.parts[:-1]), []).append(rel.stem)
    return {group: sorted(options) for group, options in sorted(groups.items())}


def test_cli_help(tmp_path):
    out = _run(["--help"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "== Configuration groups ==" in out.stdout
    groups = _groups()
    assert {"model", "method", "dataset", "hyperparams", "dataset/format"} <= groups.keys()
    for group, options in groups.items():  # every group on disk, with every option
        assert f"{group}: {', '.join(options)}" in out.stdout


def test_every_verb_has_its_primary_config_and_module():
    """The verb table (tunelab.cli.VERBS) and conf/ agree: each primary config is a verb's, each verb's exists."""
    import importlib.util

    from tunelab.cli import VERBS

    configs = {verb.config for verb in VERBS if verb.config}
    assert configs and configs == {p.stem for p in CONF.glob("*.yaml")}
    for verb in VERBS:
        assert importlib.util.find_spec(verb.module) is not None, verb


@pytest.mark.slow  # builds the wheel with pip
def test_wheel_ships_config_data_and_assets(tmp_path):
    try:
        import hatchling  # noqa: F401

        isolation = ["--no-build-isolation"]
    except ImportError:
        isolation = []  # pip fetches hatchling into an isolated build environment
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", str(tmp_path), str(REPO)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=budget(300))
    if out.returncode and not isolation and any(s in out.stdout + out.stderr for s in
                                                ("No matching distribution", "NewConnectionError", "ConnectionError")):
        pytest.skip("hatchling is not installed and pip cannot download it (offline)")
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = tmp_path.glob("tunelab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("tunelab/conf/train.yaml", "tunelab/conf/model/tiny.yaml",
                   "tunelab/bundled_data/reviews/train.jsonl", "tunelab/assets/tiny-llama/tokenizer.json",
                   "tunelab/assets/tiny-llama/config.json", "tunelab/cli.py"):
        assert needed in names
    # The only weights shipped are the committed lifecycle bases (model=tiny_base, tiny_instruct; 4 MB each).
    shipped = {"tunelab/assets/tiny-base/model.safetensors", "tunelab/assets/tiny-instruct/model.safetensors"}
    assert shipped <= names
    assert not [n for n in names - shipped if n.endswith((".pyc", ".ckpt", ".safetensors"))]
