"""`tunelab eval`: score a trained run or a model as it is on datasets' held-out split, with a prompting strategy.

compose → load the model (`run=<run dir>`: full or base + adapter with the prompt recipe it was trained
with; or `model=<option>`) → format the split as training does → build each prompt with the prompting
strategy (zero-shot, few-shot, retrieval; drawing on train or a document source, never on test) →
answer and score through `tunelab.evaluation.evaluate.evaluate` (the scoring path `train` uses too) → per-metric
bootstrap confidence intervals, corpus metrics, slices → the eval directory:

    .hydra/            the composed config and overrides
    metrics.json       `test/<metric>` (+ `/ci_low`, `/ci_high`), `test/<dataset>/<metric>` with several
                       datasets, slices `test/<field>=<value>/<metric>`, prompt and answer tokens, latency,
                       hit rate, and with a gold passage `test/retrieval_recall@1`, `@5`,
                       `test/retrieval_mrr` (with CIs)
    predictions.jsonl  one row per example: prompt, retrieved context, reference, answer, per-metric score,
                       prompt tokens, answer tokens, latency
    wandb/             the W&B run (job_type=eval): the metrics and a Table of the predictions

`evaluate_cfg(cfg)` is importable and returns the metrics; `@verb` declares the job around it (tunelab.job).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tunelab.checkpoint.rundir import checked_file, find_run, read_json
from tunelab.config.build import build, build_with
from tunelab.errors import ConfigError
from tunelab.evaluation.metrics import Estimate, corpus_ci, mean_ci, ranking_scores
from tunelab.evaluation.prompting import load_samples
from tunelab.evaluation.score import prompt_budget, score_task
from tunelab.job import RunContext, close_loggers, verb

log = logging.getLogger(__name__)


# ---- the model: a run directory or a model option ----------------------------------------------------
def read_run_settings(run_dir: Path) -> dict[str, Any]:
    """Plain values of the run's saved config and metrics (seed, eval batch size, cost); nothing is built
    from a run directory (ARCHITECTURE: a run directory is data, not code)."""
    out: dict[str, Any] = {}
    saved = run_dir / ".hydra" / "config.yaml"
    if checked_file(run_dir, saved) is not None:  # a link out of the run (to /dev/zero, a FIFO) is refused: exit 4
        try:
            run_cfg = OmegaConf.load(saved)
            for key, name in (("hyperparams.seed", "seed"), ("hyperparams.eval_batch_size", "batch_size")):
                value = OmegaConf.select(run_cfg, key, default=None, throw_on_resolution_failure=False)
                if isinstance(value, int):
                    out[name] = value
        except Exception as err:  # a damaged file: the model directory alone still loads
            log.warning("ignoring %s (%s)", saved, str(err).splitlines()[0])
    metrics = read_json(run_dir, run_dir / "metrics.json") or {}  # one that does not parse is exit 4, naming it
    for key in ("params/trainable", "params/total", "perf/train_s"):
        if isinstance(metrics.get(key), (int, float)):
            out[key] = float(metrics[key])
    return out


def run_dir_of(cfg: DictConfig) -> Path | None:
    """`cfg.run` as a checked run directory (one that holds model/), or None when a model option is scored."""
    return None if cfg.run is None else find_run(str(cfg.run))


def load_model(cfg: DictConfig, run_dir: Path | None, seed: int) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, recipe): the run's when given, else the `model` option as it is (no training)."""
    if run_dir is not None:
        from tunelab.models.load import load_run

        # trust_remote_code only from this command line, never from the run directory
        return load_run(run_dir, trust_remote_code=bool(cfg.get("trust_remote_code", False)))
    torch.manual_seed(seed)  # a random-init model (model=tiny) is the same base `train` starts from
    tokenizer = build(cfg.tokenizer)
    return build(cfg.model).eval(), tokenizer, {}


def _with_recipe(dataset: dict[str, Any], recipe: Mapping[str, Any]) -> dict[str, Any]:
    """The dataset config with the run's training recipe (templates, system prompt, format) when the run was
    trained on this dataset: prompts are then exactly those the run was trained and tested on."""
    if not recipe or recipe.get("name") != dataset.get("name"):
        return dataset
    # Templates and system prompt are data (rendered in Jinja's sandbox); the format is a `_target_` and comes
    # from tunelab's own dataset config, never from the run directory.
    return {**dataset, **{k: recipe[k] for k in ("templates", "system_prompt") if recipe.get(k) is not None}}


# ---- figures ----------------------------------------------------------------------------------------
def figures(rows: Sequence[Mapping[str, Any]], scorers: Mapping[str, Any], corpus: Mapping[str, Any],
            bootstrap: Mapping[str, Any]) -> dict[str, Estimate]:
    """Each metric over `rows` with its bootstrap CI: means of per-example scores, and corpus metrics."""
    out = {name: mean_ci([r[name] for r in rows], **bootstrap) for name in scorers}
    answers, references = [r["answer"] for r in rows], [r["reference"] for r in rows]
    out.update({name: corpus_ci(metric, answers, references, **bootstrap) for name, metric in corpus.items()})
    hits = [r["retrieval_hit"] for r in rows if "retrieval_hit" in r]
    if hits:
        out["retrieval_hit"] = mean_ci(hits, **bootstrap)
    ranks = [r["gold_rank"] for r in rows if "gold_rank" in r]  # the gold passage's rank, for recall@k and MRR
    if ranks:
        out.update({f"retrieval_{name}": mean_ci(scores, **bootstrap)
                    for name, scores in ranking_scores(ranks).items()})
    return out


def flatten(prefix: str, estimates: Mapping[str, Estimate]) -> dict[str, float]:
    flat: dict[str, float] = {}
    for name, est in estimates.items():
        flat[f"{prefix}/{name}"] = est.value
        flat[f"{prefix}/{name}/ci_low"], flat[f"{prefix}/{name}/ci_high"] = est.low, est.high
    return flat


def summarize(rows: Sequence[Mapping[str, Any]], prefix: str, scorers: Mapping[str, Any],
              corpus: Mapping[str, Any], bootstrap: Mapping[str, Any], slice_by: Sequence[str]) -> dict[str, float]:
    """metrics.json figures of one dataset: metrics with CIs, cost per answer, and each slice's metrics."""
    flat = flatten(prefix, figures(rows, scorers, corpus, bootstrap))
    flat[f"{prefix}/n"] = len(rows)
    for key in ("prompt_tokens", "answer_tokens", "latency_s", "shots", "passages"):
        values = [float(r[key]) for r in rows if key in r]
        if values:
            flat[f"{prefix}/{key}"] = sum(values) / len(values)
    for field in slice_by:
        values = sorted({json.dumps(r.get(field)) for r in rows if field in r})
        if not values:
            raise ConfigError(f"slice_by names {field!r}, which no row of the dataset has", "key slice_by",
                              "name a column of the dataset's rows, e.g. slice_by=[changed] on knowledge_updated")
        for value in values:
            part = [r for r in rows if json.dumps(r.get(field)) == value]
            flat.update(flatten(f"{prefix}/{field}={json.loads(value)}",
                                figures(part, scorers, corpus, bootstrap)))
            flat[f"{prefix}/{field}={json.loads(value)}/n"] = len(part)
    return flat


# ---- the verb ---------------------------------------------------------------------------------------
@verb(run_dir=True, validate=True, lock=True)
def evaluate_cfg(cfg: DictConfig, run: RunContext) -> dict[str, float]:
    """Evaluate as `cfg` describes, write the eval directory, return the figures written to metrics.json.

    `run` says where the job writes (Hydra's job directory); without it, `cfg.paths.run_dir`.
    """
    out_dir = run.run_dir
    run_dir = run_dir_of(cfg)
    if cfg.get("harness"):
        return _harness(cfg, out_dir, run_dir)
    run_settings = read_run_settings(run_dir) if run_dir is not None else {}
    seed = int(cfg.seed)
    # Templates are drawn per row with a seed: a run's own seed draws the very prompts it was tested on.
    template_seed = int(run_settings.get("seed", seed))
    model, tokenizer, recipe = load_model(cfg, run_dir, seed)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else str(cfg.device))
    from tunelab.models.load import for_inference

    model = for_inference(model.to(device), cfg.get("inference"))  # bfloat16 / int8 once on its device
    decoding = OmegaConf.to_container(cfg.decoding, resolve=True)
    budget = prompt_budget(model, decoding, cfg.max_prompt_tokens)
    batch_size = int(cfg.batch_size or run_settings.get("batch_size", 32))
    bootstrap = OmegaConf.to_container(cfg.bootstrap, resolve=True)

    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    tasks = dataset.get("tasks") or {dataset["name"]: dataset}  # a mixture is scored task by task
    metrics: dict[str, float] = {k: v for k, v in run_settings.items() if "/" in k}  # params/*, perf/train_s
    if run_dir is not None and "params/trainable" not in metrics:
        from tunelab.models.method import count_parameters

        metrics["params/trainable"], metrics["params/total"] = count_parameters(model)
    all_rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for name, task in tasks.items():
        task = _with_recipe(task, recipe)
        scored = score_task(model, tokenizer, name, task, load_samples(task, template_seed), cfg.prompting, decoding,
                            split=cfg.split, seed=seed, budget=budget, batch_size=batch_size,
                            max_samples=cfg.max_samples, cache_dir=cfg.paths.cache_dir, slice_by=list(cfg.slice_by))
        notes += [scored.note] if scored.note else []
        prefix = cfg.split if len(tasks) == 1 else f"{cfg.split}/{name}"
        metrics.update(summarize(scored.result.rows, prefix, scored.scorers, scored.corpus, bootstrap,
                                 list(cfg.slice_by)))
        all_rows.extend({"dataset": name, **row} for row in scored.result.rows)

    with (out_dir / "predictions.jsonl").open("w") as handle:
        for row in all_rows:
            handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    if notes:
        (out_dir / "notes.txt").write_text("\n".join(notes) + "\n")
    _log(cfg, run, metrics, all_rows)
    _print(out_dir, metrics, notes)
    return metrics


def _harness(cfg: DictConfig, out_dir: Path, run_dir: Path | None) -> dict[str, float]:
    """`harness=<task yaml>`: lm-evaluation-harness's `hf` model on the run's plain model (evaluation/harness.py)."""
    from tunelab.evaluation.harness import harness_model_dir, run_harness

    model_dir = harness_model_dir(run_dir, None if run_dir is not None else str(cfg.model.name_or_path))
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else \
        "cpu" if cfg.device == "auto" else str(cfg.device)
    metrics = run_harness(model_dir, str(cfg.harness), out_dir, cfg.max_samples, int(cfg.batch_size or 32), device)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    _print(out_dir, metrics, [])
    return metrics


def _log(cfg: DictConfig, run: RunContext, metrics: dict[str, float], rows: list[dict[str, Any]]) -> None:
    """The W&B run (job_type from the logger config: `eval`): summary metrics and a Table of predictions."""
    from pytorch_lightning.loggers import WandbLogger

    from tunelab.config.redact import redact

    resolved = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    for node in cfg.logger.values():
        logger = build_with(node, run=run)
        completed = False
        try:
            if isinstance(logger, WandbLogger):
                import wandb

                experiment = logger.experiment
                experiment.config.update(redact(resolved), allow_val_change=True)  # secrets masked, as train does
                experiment.summary.update(metrics)
                columns = sorted({k for row in rows for k in row})
                table = wandb.Table(columns=columns,
                                    data=[[_cell(row.get(c)) for c in columns] for row in rows])
                experiment.log({"predictions": table})
            else:
                logger.log_metrics(metrics)
            completed = True
        finally:
            close_loggers([logger], completed)


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _print(out_dir: Path, metrics: dict[str, float], notes: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    from tunelab.console import print_whole

    console = Console()
    table = Table(title="tunelab eval")
    for column in ("metric", "value", "95% CI"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for key in sorted(metrics):
        if key.endswith(("/ci_low", "/ci_high")) or key.startswith(("params/", "perf/")):
            continue
        low, high = metrics.get(f"{key}/ci_low"), metrics.get(f"{key}/ci_high")
        table.add_row(key, f"{metrics[key]:.4f}", "" if low is None else f"[{low:.4f}, {high:.4f}]")
    console.print(table)
    for note in notes:
        console.print(f"note: {note}")
    print_whole(console, f"eval directory: {out_dir}")


if __name__ == "__main__":
    from tunelab.cli import run_verb

    run_verb("eval")
