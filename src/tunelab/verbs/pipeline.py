"""`tunelab pipeline`: `train` stages run in order, each from the previous stage's model, and a forgetting matrix.

    tunelab pipeline pipeline=reviews_chain                      # conf/pipeline/reviews_chain.yaml, sequential
    tunelab pipeline pipeline=reviews_chain strategy=replay      # the same chain with replay
    tunelab pipeline -m strategy=sequential,replay,multitask,lora   # side by side: comparison.md/.png
    tunelab pipeline pipeline=reviews_chain run_id=<id>          # resume a killed pipeline

compose → plan (every stage composed and validated, the strategy applied, models and tokenizers checked
alike) → score the starting model (the baseline row) → for each stage: train it from the previous stage's
model (`tunelab.verbs.train.train`, in its own run directory), mark it done, score the model on every task of the
pipeline and the probe (through `tunelab.evaluation.evaluate.evaluate`), rewrite the matrix → a W&B table.

The pipeline directory:

    .hydra/  plan.json                the pipeline's config and its stages' overrides (checked on resume)
    baseline/scores.json              the starting model's row
    01_<stage>/ 02_<stage>/ ...       ordinary run directories (model/, metrics.json, ...), plus
                                      stage.json (written last: the stage is done) and scores.json (its row)
    matrix.csv summary.json heatmap.png

A stage is done when stage.json, metrics.json and model/ exist; a rerun with the same run_id skips done
stages (never retrained) and retrains an unfinished one from its start.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from tunelab.config.schema import build, build_with, compose, dataset_spec, validate
from tunelab.errors import CheckpointError, ConfigError, TunelabError
from tunelab.job import RunContext, close_loggers, verb
from tunelab.pipeline import forgetting
from tunelab.pipeline.strategies import Stage

log = logging.getLogger(__name__)

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
            "+callbacks.init_adapter._target_=tunelab.verbs.pipeline.InitAdapter",
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


def _compose_stage(stage: Stage, extra: Sequence[str] = ()) -> DictConfig:
    """The stage's train config, composed and validated; a mistake names the stage."""
    try:
        cfg = compose([*stage.overrides, *extra], "train")
        validate(cfg)
    except TunelabError as err:
        raise type(err)(f"stage {stage.name!r}: {err.what}", err.where,
                        err.hint or f"the stage's overrides: {' '.join(stage.overrides)}") from None
    return cfg


def _raw_stages(cfg: DictConfig) -> list[Stage]:
    stages = OmegaConf.select(cfg, "pipeline.stages", default=None)
    if not stages:
        raise ConfigError("the pipeline has no stages", "key pipeline.stages",
                          "list them as `stages: {<name>: [<train overrides>], ...}` in conf/pipeline/<name>.yaml")
    common = [f"paths.output_dir={_quote(cfg.paths.output_dir)}", *cfg.stage_defaults,
              *(OmegaConf.select(cfg, "pipeline.common", default=None) or []), *cfg.stage_overrides]
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


def make_plan(cfg: DictConfig, pipeline_dir: Path) -> Plan:
    """Compose and validate every stage (as the strategy rewrites them), before anything trains."""
    raw = _raw_stages(cfg)
    raw_cfgs = [_compose_stage(stage) for stage in raw]
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
        scfg = _compose_stage(stage)
        if i:
            method = OmegaConf.to_container(scfg.method, resolve=True)
            scfg = _compose_stage(stage, start_overrides(cfg, i, configs, pipeline_dir, stages, method))
        configs.append(scfg)
    tasks = list(task_specs)
    intro = [next(i for i, s in enumerate(stages) if t in s.tasks) for t in tasks]
    probe = None
    probe_option = OmegaConf.select(cfg, "pipeline.probe", default=None)
    if probe_option:  # a general text split: its held-out perplexity
        pcfg = _compose_stage(Stage("probe", (*raw[0].overrides, f"dataset={probe_option}")))
        node = OmegaConf.to_container(pcfg.dataset, resolve=True)
        probe = (f"{node['name']}/validation/ppl", node, "validation")
    elif tasks:  # else the first task's validation split
        probe = (f"{tasks[0]}/validation/ppl", task_specs[tasks[0]], "validation")
    return Plan(stages, configs, tasks, task_specs, intro, probe)


def preflight(cfg: DictConfig) -> None:
    """The CLI's pre-flight for `tunelab pipeline`: every stage of every swept pipeline composes and validates."""
    make_plan(cfg, Path(str(cfg.paths.output_dir)) / "runs" / "<pipeline>")


# ---- scoring: every task's test split through tunelab.evaluation.evaluate, and a held-out loss ---------------------
@torch.no_grad()
def heldout_loss(model: Any, examples: Sequence[Any], pad_id: int, batch_size: int) -> float:
    """Token-mean loss over supervised tokens of `examples` (the probe's perplexity is its exp)."""
    from tunelab.data.datamodule import Collator
    from tunelab.training.module import summed_token_loss

    device = next(model.parameters()).device
    collate = Collator(pad_id, with_prompts=False)
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(list(examples[start:start + batch_size]))
            out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            loss, count = summed_token_loss(out.logits, batch["labels"].to(device))
            total, tokens = total + float(loss), tokens + int(count)
    finally:
        model.train(was_training)
    return total / max(tokens, 1)


class Scorer:
    """Scores a model on the test split of every task of the pipeline (one row of the matrix) and on the probe."""

    def __init__(self, plan: Plan, scoring: Mapping[str, Any], decoding: Mapping[str, Any], seed: int,
                 max_seq_len: int) -> None:
        self.plan, self.scoring, self.decoding = plan, dict(scoring), dict(decoding)
        self.seed, self.max_seq_len = seed, max_seq_len
        self._encoded: dict[str, dict[str, list[Any]]] = {}  # one tokenizer for every stage (checked in the plan)

    def _splits(self, name: str, spec: Mapping[str, Any], tokenizer: Any) -> dict[str, list[Any]]:
        if name not in self._encoded:
            from tunelab.data.datamodule import encode_task

            spec = dict(spec)
            source = dict(spec["source"])
            if not source.get("test_size") and not source.get("val_size"):
                # Held-out splits only: scoring never needs train (unless a held-out split is carved from it).
                source["splits"] = {**(source.get("splits") or {}), "train": None}
                spec["source"] = source
            self._encoded[name], _ = encode_task(dataset_spec(spec), tokenizer, self.max_seq_len, self.seed)
        return self._encoded[name]

    def __call__(self, model: Any, tokenizer: Any) -> dict[str, float]:
        from tunelab.evaluation.evaluate import EvalItem, evaluate

        device = torch.device("cuda" if self.scoring.get("device") == "auto" and torch.cuda.is_available()
                              else "cpu" if self.scoring.get("device") == "auto" else str(self.scoring["device"]))
        model.to(device)
        limit = self.scoring.get("max_samples") or None
        batch_size = int(self.scoring.get("batch_size") or 32)
        row: dict[str, float] = {}
        for name in self.plan.tasks:
            spec = self.plan.task_specs[name]
            test = self._splits(name, spec, tokenizer).get("test", [])[:limit]
            if not test:
                raise ConfigError(f"task {name!r} has no test split to score", f"dataset {name}",
                                  "name it in dataset.source.splits or carve it with dataset.source.test_size")
            scorers = build(dict(spec.get("metrics") or {}), _convert_="all")
            if not scorers:
                raise ConfigError(f"task {name!r} names no metrics", f"dataset {name}", "give it a metrics: node")
            items = [EvalItem(e.prompt_ids, e.reference or "", name) for e in test]
            result = evaluate(model, tokenizer, items, {name: scorers}, self.decoding, batch_size,
                              {name: spec.get("choices") or []})
            primary = next(iter(scorers))
            row[name] = result.metrics[primary]
            row.update({f"{name}/{metric}": value for metric, value in result.metrics.items()})
        if self.plan.probe is not None:
            column, spec, split = self.plan.probe
            examples = self._splits(f"probe:{column}", spec, tokenizer).get(split, [])[:limit]
            if examples:
                loss = heldout_loss(model, examples, tokenizer.pad_token_id, batch_size)
                row[column] = math.exp(min(loss, 30.0))
        return row


def metric_names(plan: Plan) -> list[str]:
    return [next(iter(plan.task_specs[t].get("metrics") or {"score": None})) for t in plan.tasks]


# ---- running ------------------------------------------------------------------------------------------
def is_done(stage_dir: Path) -> bool:
    """A finished stage: its marker (written last), its metrics and its model."""
    return (stage_dir / DONE).is_file() and (stage_dir / "metrics.json").is_file() and (stage_dir / "model").is_dir()


def _check_plan(pipeline_dir: Path, record: dict[str, Any]) -> None:
    """A resumed pipeline must be the same pipeline: same stages, same overrides, same strategy."""
    saved_file = pipeline_dir / "plan.json"
    if not saved_file.is_file():
        forgetting._atomic_write(saved_file, json.dumps(record, indent=2) + "\n")
        return
    saved = json.loads(saved_file.read_text())
    if saved != record:
        old = {s["name"]: s["overrides"] for s in saved.get("stages", [])}
        new = {s["name"]: s["overrides"] for s in record["stages"]}
        differ = [n for n in dict.fromkeys([*old, *new]) if old.get(n) != new.get(n)] or ["(strategy or tasks)"]
        raise ConfigError(f"{pipeline_dir} holds a pipeline planned differently (stage {differ[0]!r} differs)",
                          f"file {saved_file}",
                          "rerun with the same pipeline and overrides to resume it, or leave run_id out to start anew")


def _write_stage_config(stage_dir: Path, cfg: DictConfig, overrides: Sequence[str]) -> None:
    """`.hydra/config.yaml` and `overrides.yaml`, as a `tunelab train` run would have them (later verbs read them)."""
    hydra_dir = stage_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), hydra_dir / "config.yaml")
    (hydra_dir / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


def _load_model(stage_dir: Path | None, cfg0: DictConfig) -> tuple[Any, Any]:
    """A finished stage's model, or (None) the model the first stage starts from, built as `train` builds it."""
    if stage_dir is not None:
        from tunelab.models.load import load_run

        model, tokenizer, _ = load_run(stage_dir)
        return model, tokenizer
    pl.seed_everything(int(cfg0.hyperparams.seed), workers=True, verbose=False)  # train seeds before building
    tokenizer = build(cfg0.tokenizer)
    return build(cfg0.model).eval(), tokenizer


@verb(run_dir=True, validate=True, lock=True)
def run_pipeline(cfg: DictConfig, run: RunContext) -> dict[str, Any]:
    """Plan, score the baseline, train and score each stage not yet done; returns the summary (summary.json)."""
    pipeline_dir = run.run_dir
    plan = make_plan(cfg, pipeline_dir)
    name = str(OmegaConf.select(cfg, "pipeline.name", default=None) or run.choices.get("pipeline", "pipeline"))
    strategy = run.choices.get("strategy") or str(cfg.strategy._target_).rsplit(".", 1)[-1]
    _check_plan(pipeline_dir, {"pipeline": name, "strategy": str(cfg.strategy._target_),
                               "stages": [{"name": s.name, "overrides": list(s.overrides)} for s in plan.stages],
                               "tasks": plan.tasks})
    cfg0 = plan.configs[0]
    scorer = Scorer(plan, OmegaConf.to_container(cfg.scoring, resolve=True),
                    OmegaConf.to_container(cfg0.decoding, resolve=True), int(cfg0.hyperparams.seed),
                    int(cfg0.hyperparams.max_seq_len))
    group = run.run_id  # one W&B group per pipeline: its stages and its own run
    rows: list[tuple[str, dict[str, float]]] = []
    title = f"{name} ({strategy}): {plan.probe[0] if plan.probe else ''}"

    def score_row(row_name: str, out_dir: Path, stage_dir: Path | None) -> None:
        scores_file = out_dir / "scores.json"
        if scores_file.is_file():
            scores = json.loads(scores_file.read_text())
        else:
            began = time.perf_counter()
            model, tokenizer = _load_model(stage_dir, cfg0)
            scores = scorer(model, tokenizer)
            del model
            log.info("scored %s in %.1f s", row_name, time.perf_counter() - began)
            out_dir.mkdir(parents=True, exist_ok=True)
            forgetting._atomic_write(scores_file, json.dumps(scores, indent=2, sort_keys=True) + "\n")
        rows.append((row_name, scores))
        _write_outputs(pipeline_dir, plan, rows, name, strategy, title)

    score_row("baseline", pipeline_dir / "baseline", None)
    limit = cfg.stop_after if cfg.stop_after is not None else len(plan.stages)
    for i, stage in enumerate(plan.stages[:limit]):
        stage_dir = pipeline_dir / stage_dirname(i, stage)
        if is_done(stage_dir):
            log.info("stage %s is done (%s): not retrained", stage.name, stage_dir / DONE)
        else:
            if stage_dir.exists():  # an unfinished stage: trained again from its start
                log.warning("stage %s did not finish (no %s): training it again", stage.name, DONE)
                shutil.rmtree(stage_dir)
            stage_dir.mkdir(parents=True)
            method = OmegaConf.to_container(plan.configs[i].method, resolve=True)
            start = start_overrides(cfg, i, plan.configs, pipeline_dir, plan.stages, method, prepare=True)
            scfg = _compose_stage(stage, start)
            with open_dict(scfg):
                for node in scfg.logger.values():
                    if "group" in node:
                        node.group = group
            _write_stage_config(stage_dir, scfg, [*stage.overrides, *start])
            from tunelab.verbs.train import train

            metrics = train(scfg, RunContext.local(stage_dir, run_id=f"{run.run_id}-{stage_dirname(i, stage)}",
                                                   overrides=(*stage.overrides, *start)))
            forgetting._atomic_write(stage_dir / DONE, json.dumps(
                {"stage": stage.name, "index": i, "overrides": [*stage.overrides, *start],
                 "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "val/loss": metrics.get("val/loss")}, indent=2) + "\n")
        score_row(stage.name, stage_dir, stage_dir)
    summary = _write_outputs(pipeline_dir, plan, rows, name, strategy, title, final=True)
    _log_wandb(cfg, run, group, plan, rows, summary)
    if run.sweep_dir is not None:  # a multirun over strategies: the side-by-side table so far
        forgetting.compare(run.sweep_dir)
    return summary


def _write_outputs(pipeline_dir: Path, plan: Plan, rows: Sequence[tuple[str, dict[str, float]]], name: str,
                   strategy: str, title: str, final: bool = False) -> dict[str, Any]:
    """matrix.csv, summary.json and heatmap.png from the rows so far (the matrix fills in as stages finish)."""
    R = [[scores[t] for t in plan.tasks] for _, scores in rows[1:]]
    baseline = [rows[0][1][t] for t in plan.tasks]
    figures = forgetting.summarize(R, baseline, plan.intro)
    probe = plan.probe[0] if plan.probe else None
    probe_values = [scores.get(probe) for _, scores in rows] if probe else []
    summary = {"pipeline": name, "strategy": strategy, "stages_total": len(plan.stages), **figures,
               "tasks": plan.tasks, "metrics": metric_names(plan), "intro": plan.intro,
               "rows": [row for row, _ in rows], "probe": probe,
               "probe_baseline": probe_values[0] if probe_values else None,
               "probe_final": probe_values[-1] if probe_values else None,
               "probe_change": (probe_values[-1] - probe_values[0]) if len(probe_values) > 1 else None,
               "stages": [asdict(s) for s in plan.stages]}
    forgetting.write_matrix(pipeline_dir, plan.tasks, metric_names(plan), rows, probe, summary)
    heading = (f"{name} · {strategy} · ACC {forgetting._fmt(figures['acc'])} BWT {forgetting._fmt(figures['bwt'])} "
               f"forgetting {forgetting._fmt(figures['forgetting'])}")
    forgetting.heatmap(pipeline_dir / "heatmap.png", plan.tasks, rows, heading)
    forgetting.print_matrix(plan.tasks, rows, probe, summary, f"{title} — {'final' if final else 'so far'}")
    return summary


def _log_wandb(cfg: DictConfig, run: RunContext, group: str, plan: Plan,
               rows: Sequence[tuple[str, dict[str, float]]], summary: Mapping[str, Any]) -> None:
    """The pipeline's own W&B run, in the stages' group: the matrix as a Table, the figures as its summary."""
    from pytorch_lightning.loggers import WandbLogger

    with open_dict(cfg):
        for node in cfg.logger.values():
            if "group" in node:
                node.group = group
            if "job_type" in node:
                node.job_type = "pipeline"
    for node in cfg.logger.values():
        logger = build_with(node, run=replace(run, run_id=f"{run.run_id}-pipeline"))
        if not isinstance(logger, WandbLogger):
            continue
        import wandb

        completed = False
        try:
            columns = ["row", *plan.tasks] + ([plan.probe[0]] if plan.probe else [])
            table = wandb.Table(columns=columns, data=[[name, *(scores.get(c) for c in columns[1:])]
                                                       for name, scores in rows])
            logger.experiment.log({"forgetting_matrix": table,
                                   "heatmap": wandb.Image(str(run.run_dir / "heatmap.png"))})
            logger.experiment.summary.update({f"pipeline/{k}": v for k, v in summary.items()
                                              if isinstance(v, (int, float)) and v is not None})
            completed = True
        finally:
            close_loggers([logger], completed)


if __name__ == "__main__":
    from tunelab.cli import run_verb

    run_verb("pipeline")
