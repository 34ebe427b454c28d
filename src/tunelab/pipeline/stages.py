"""The plan of a pipeline: its stages composed and validated (as the strategy rewrites them) before the first trains,
and how each stage starts from the previous stage's model (conf/adapter_carry/)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tunelab.config.build import build
from tunelab.config.compose import SearchPath
from tunelab.config.validate import validate
from tunelab.errors import CheckpointError, ConfigError, TunelabError
from tunelab.job import RunContext
from tunelab.pipeline.strategies import Stage

DONE = "stage.json"  # written last by a finished stage
# Keys that must agree between stages: a stage starts from the previous stage's weights and tokenizer.
SAME_MODEL_KEYS = ("model.name_or_path", "model.tokenizer_name_or_path", "model.revision", "tokenizer.chat_template")


def _quote(value: str | Path) -> str:
    """A path as a Hydra override value: quoted, so any character of a directory name parses."""
    text = str(value)
    return f"'{text}'" if "'" not in text else f'"{text}"'


def stage_dirname(index: int, stage: Stage) -> str:
    return f"{index + 1:02d}_{stage.name}"


# ---- how a stage starts from the previous one (conf/adapter_carry/) ------------------------------------
def full_weights(prev_run: Path) -> list[str]:
    """Start from the previous stage's full weights (and the tokenizer and chat template saved with them)."""
    model = prev_run / "model"
    return [f"model.name_or_path={_quote(model)}", f"model.tokenizer_name_or_path={_quote(model)}",
            "model.random_init=false"]


def merge_adapter(prev_run: Path, stage_dir: Path, prev_method: Mapping[str, Any], method: Mapping[str, Any],
                  prepare: bool = False) -> list[str]:
    """Merge the previous stage's adapter into its base (written to `<stage>/start_model`) and start from that;
    an adapter stage then adds a fresh adapter on top."""
    start = stage_dir / "start_model"
    if prepare:
        from tunelab.models.load import load_run

        model, tokenizer, _ = load_run(prev_run, quantize=False)
        if model.peft_config[model.active_adapter].is_prompt_learning:
            raise ConfigError("a prompt-learning adapter (prompt/prefix tuning) cannot be merged into its base",
                              "key adapter_carry", "use adapter_carry=continue, or a LoRA-type method")
        start.mkdir(parents=True, exist_ok=True)
        model.merge_and_unload().save_pretrained(start, safe_serialization=True)
        tokenizer.save_pretrained(start)
    return [f"model.name_or_path={_quote(start)}", f"model.tokenizer_name_or_path={_quote(start)}",
            "model.random_init=false"]


def continue_adapter(prev_run: Path, stage_dir: Path, prev_method: Mapping[str, Any], method: Mapping[str, Any],
                     prepare: bool = False) -> list[str]:
    """Keep training the previous stage's adapter on the same frozen base (the next stage's method must be the
    same adapter); a full fine-tuning stage after an adapter stage starts from the merged model instead."""
    if not method.get("peft"):
        return merge_adapter(prev_run, stage_dir, prev_method, method, prepare)
    if dict(prev_method) != dict(method):
        differing = sorted(k for k in set(prev_method) | set(method) if prev_method.get(k) != method.get(k))
        raise ConfigError(f"adapter_carry=continue trains one adapter through the stages, but consecutive stages "
                          f"use different methods (they differ in method.{differing[0]})", "key adapter_carry",
                          "give the stages the same method, or use adapter_carry=merge (merge, then a new adapter)")
    model = prev_run / "model"
    base = model / "base"  # a random-init base saved by the first adapter stage
    if prepare and not base.is_dir():
        config = json.loads((model / "adapter_config.json").read_text())
        base = Path(config["base_model_name_or_path"]) if config.get("base_model_name_or_path") else base
    name = base if isinstance(base, Path) else str(base)
    return [f"model.name_or_path={_quote(name)}", f"model.tokenizer_name_or_path={_quote(model)}",
            "model.random_init=false",
            "+callbacks.init_adapter._target_=tunelab.pipeline.stages.InitAdapter",
            f"+callbacks.init_adapter.path={_quote(model)}"]


class InitAdapter(pl.Callback):
    """Loads a previous stage's adapter weights into the run's fresh adapter before anything else uses it
    (adapter_carry=continue). A checkpoint restored later (a resumed stage) still wins, as it should."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.loaded = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.loaded:
            return
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        file = self.path / "adapter_model.safetensors"
        if not file.is_file():
            raise CheckpointError(f"no adapter weights to continue from: {file}", "key callbacks.init_adapter.path",
                                  "the previous stage must have trained an adapter (method with a peft config)")
        try:
            result = set_peft_model_state_dict(pl_module.model, load_file(str(file)))
        except RuntimeError as err:  # shapes differ: another rank or target modules
            raise CheckpointError(f"the adapter in {self.path} does not fit this stage's adapter: "
                                  f"{str(err).splitlines()[0]}", "key callbacks.init_adapter.path",
                                  "use the same method in both stages, or adapter_carry=merge") from None
        if result.unexpected_keys:
            raise CheckpointError(f"the adapter in {self.path} has weights this stage's adapter lacks: "
                                  f"{result.unexpected_keys[0]}", "key callbacks.init_adapter.path",
                                  "use the same method in both stages, or adapter_carry=merge")
        self.loaded = True


# ---- the plan: every stage composed and validated before the first trains ------------------------------
@dataclass
class Plan:
    stages: list[Stage]  # after the strategy
    configs: list[DictConfig]  # each stage composed with (placeholder) start overrides, validated
    tasks: list[str]  # evaluation columns: dataset names, in the order the stages introduce them
    task_specs: dict[str, dict[str, Any]]  # name -> its dataset node, resolved
    intro: list[int]  # per task: the stage that first trains it
    probe: tuple[str, dict[str, Any], str] | None  # (column name, dataset node, split) or None
    search: SearchPath = SearchPath()  # the command's config dir and search path, for composing stages


def compose_stage(stage: Stage, extra: Sequence[str] = (), search: SearchPath | None = None) -> DictConfig:
    """The stage's train config, composed and validated with the pipeline command's config dir and search path
    (`search`: a user's own dataset option resolves in a stage as on the command line); a mistake names the stage."""
    try:
        cfg = (search or SearchPath()).compose([*stage.overrides, *extra], "train")
        validate(cfg)
    except TunelabError as err:
        raise type(err)(f"stage {stage.name!r}: {err.what}", err.where,
                        err.hint or f"the stage's overrides: {' '.join(stage.overrides)}") from None
    return cfg


def _setting(cfg: DictConfig, key: str) -> Any:
    """A pipeline setting, read before any stage runs (so `${hydra:...}`, which only a running job resolves, is a
    config error here, not a traceback)."""
    try:
        return OmegaConf.select(cfg, key, default=None)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot read {key}: {str(err).splitlines()[0]}", f"key {key}",
                          "a pipeline's stages are planned before any job runs: use plain values there, not "
                          "${hydra:...}") from None


def _raw_stages(cfg: DictConfig) -> list[Stage]:
    stages = _setting(cfg, "pipeline.stages")
    if not stages:
        raise ConfigError("the pipeline has no stages", "key pipeline.stages",
                          "list them as `stages: {<name>: [<train overrides>], ...}` in conf/pipeline/<name>.yaml")
    shared = _setting(cfg, "pipeline.common") or []
    if not isinstance(shared, Sequence) or isinstance(shared, str):
        raise ConfigError(f"pipeline.common is not a list of train overrides: {shared!r}", "key pipeline.common",
                          "write it as a list, e.g. [hyperparams.lr=1e-3]")
    common = [f"paths.output_dir={_quote(cfg.paths.output_dir)}", *cfg.stage_defaults, *shared, *cfg.stage_overrides]
    out = []
    for name, overrides in stages.items():
        if not isinstance(overrides, Sequence) or isinstance(overrides, str):
            raise ConfigError(f"stage {name!r} is not a list of train overrides", f"key pipeline.stages.{name}",
                              "write it as a list, e.g. [dataset=reviews_rating, hyperparams.lr=1e-3]")
        out.append(Stage(str(name), tuple(str(o) for o in [*common, *overrides])))
    return out


def _tasks_of(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    if dataset.get("tasks"):
        return {str(task["name"]): task for task in dataset["tasks"].values()}
    return {dataset["name"]: dataset}


def _train_rows(cfg: DictConfig) -> int | None:
    if OmegaConf.select(cfg, "dataset.tasks", default=None):
        return None
    from tunelab.data.sources import load_splits

    source = OmegaConf.to_container(cfg.dataset.source, resolve=True)
    return len(load_splits(source, int(cfg.hyperparams.seed)).get("train", []))


def _check_same_model(stages: Sequence[Stage], configs: Sequence[DictConfig]) -> None:
    first = configs[0]
    for stage, cfg in zip(stages[1:], configs[1:], strict=True):
        differ = [f"{key}: {OmegaConf.select(first, key)!r} in {stages[0].name!r}, {OmegaConf.select(cfg, key)!r} "
                  f"in {stage.name!r}" for key in SAME_MODEL_KEYS
                  if OmegaConf.select(first, key) != OmegaConf.select(cfg, key)]
        if differ:
            raise ConfigError(f"the stages use different models or tokenizers ({'; '.join(differ)})",
                              f"pipeline.stages.{stage.name}",
                              "each stage starts from the previous stage's model and tokenizer: choose the model and "
                              "chat template once, in pipeline.common")


def start_overrides(cfg: DictConfig, index: int, plan_configs: Sequence[DictConfig], pipeline_dir: Path,
                    stages: Sequence[Stage], method: Mapping[str, Any], prepare: bool = False) -> list[str]:
    """The overrides that make stage `index` start from stage `index-1`'s model (none for the first stage)."""
    if index == 0:
        return []
    prev_cfg = plan_configs[index - 1]
    prev_run = pipeline_dir / stage_dirname(index - 1, stages[index - 1])
    prev_method = OmegaConf.to_container(prev_cfg.method, resolve=True)
    if not prev_method.get("peft"):
        return full_weights(prev_run)
    carry = build(cfg.adapter_carry)  # a partial: (prev_run, stage_dir, prev_method, method, prepare)
    return carry(prev_run, pipeline_dir / stage_dirname(index, stages[index]), prev_method, dict(method), prepare)


def make_plan(cfg: DictConfig, pipeline_dir: Path, run: RunContext | None = None) -> Plan:
    """Compose and validate every stage (as the strategy rewrites them), before anything trains, with the command's
    config dir and search path (from `cfg.hydra`, or the job's `run` context)."""
    raw = _raw_stages(cfg)
    search = SearchPath.of(cfg, run)
    raw_cfgs = [compose_stage(stage, search=search) for stage in raw]
    _check_same_model(raw, raw_cfgs)
    task_specs: dict[str, dict[str, Any]] = {}
    described = []
    for stage, scfg in zip(raw, raw_cfgs, strict=True):
        tasks = _tasks_of(scfg)
        task_specs.update({k: v for k, v in tasks.items() if k not in task_specs})
        choice = scfg.hydra.runtime.choices.get("dataset")
        described.append(replace(stage, dataset=str(choice) if choice else None, train_rows=_train_rows(scfg),
                                 tasks=tuple(tasks), mixture=bool(OmegaConf.select(scfg, "dataset.tasks")),
                                 max_steps=int(scfg.hyperparams.max_steps)))
    strategy: Callable[[list[Stage]], list[Stage]] = build(cfg.strategy)
    stages = list(strategy(described))
    configs: list[DictConfig] = []
    for i, stage in enumerate(stages):
        scfg = compose_stage(stage, search=search)
        if i:
            method = OmegaConf.to_container(scfg.method, resolve=True)
            scfg = compose_stage(stage, start_overrides(cfg, i, configs, pipeline_dir, stages, method), search)
        configs.append(scfg)
    tasks = list(task_specs)
    intro = [next(i for i, s in enumerate(stages) if t in s.tasks) for t in tasks]
    probe = None
    probe_option = OmegaConf.select(cfg, "pipeline.probe", default=None)
    if probe_option:  # a general text split: its held-out perplexity
        pcfg = compose_stage(Stage("probe", (*raw[0].overrides, f"dataset={probe_option}")), search=search)
        node = OmegaConf.to_container(pcfg.dataset, resolve=True)
        probe = (f"{node['name']}/validation/ppl", node, "validation")
    elif tasks:  # else the first task's validation split
        probe = (f"{tasks[0]}/validation/ppl", task_specs[tasks[0]], "validation")
    return Plan(stages, configs, tasks, task_specs, intro, probe, search)
