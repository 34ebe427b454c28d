"""Fine-tuning the dense retriever: (question, gold passage) pairs of a train split, sentence-transformers' own
trainer, and an in-batch-negatives loss (MultipleNegativesRankingLoss: each question's gold passage against the
other passages of its batch; Henderson et al. 2017, the loss all-MiniLM-L6-v2 itself was trained with).

Batches never hold one passage twice (`no_duplicates`): the knowledge task asks several questions per passage, and a
passage that is some other question's positive would otherwise also be its negative.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError, DataError
from tunelab.evaluation.metrics import Estimate, gold_rank, mean_ci, ranking_scores
from tunelab.evaluation.prompting import Sample
from tunelab.evaluation.retrieval import Passage

log = logging.getLogger(__name__)


@dataclass
class Pairs:
    """Questions (the user turn retrieval searches with) and the id of the passage holding each answer."""

    questions: list[str]
    gold: list[str]


def gold_pairs(samples: Sequence[Sample], gold_column: str, passages: Sequence[Passage], split: str) -> Pairs:
    """Each sample's question and gold passage id; a row without the column, or naming no passage, is a DataError."""
    ids = {p.id for p in passages}
    pairs = Pairs([], [])
    for sample in samples:
        if gold_column not in sample.fields:
            raise DataError(f"{sample.example.origin}: the {split} row has no {gold_column!r} column naming its gold "
                            "passage", "key documents.gold_column",
                            "train-retriever needs a dataset whose rows name the passage holding the answer "
                            "(dataset=knowledge with documents=knowledge)")
        gold = str(sample.fields[gold_column])
        if gold not in ids:
            raise DataError(f"{sample.example.origin}: {gold_column}={gold!r} is no passage of the document source",
                            "key documents.path", "the dataset and the documents must belong together")
        pairs.questions.append(sample.question)
        pairs.gold.append(gold)
    if not pairs.questions:
        raise DataError(f"the {split} split holds no examples", "key dataset.source", "give a dataset with rows")
    return pairs


def rank_figures(retriever: Any, pairs: Pairs, depth: int, bootstrap: Mapping[str, Any]) -> dict[str, Estimate]:
    """recall@1, recall@5 and MRR@depth of the gold passages over `pairs`, each with its bootstrap CI."""
    ranks = [gold_rank([p.id for p, _ in retriever.search(q, depth)], g)
             for q, g in zip(pairs.questions, pairs.gold, strict=True)]
    return {f"retrieval_{name}": mean_ci(scores, **bootstrap) for name, scores in ranking_scores(ranks).items()}


def fine_tune(model: Any, pairs: Pairs, passages: Mapping[str, str], hyperparams: Mapping[str, Any],
              out_dir: Path) -> dict[str, float]:
    """Train `model` (a SentenceTransformer) on the pairs with SentenceTransformerTrainer and
    MultipleNegativesRankingLoss; save it to `out_dir` (safetensors). Returns train/loss, train/steps."""
    import torch

    try:
        from datasets import Dataset
        from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
        from sentence_transformers.losses import MultipleNegativesRankingLoss
    except ImportError:
        from tunelab.evaluation.dense import EXTRA_HINT

        raise ConfigError("train-retriever needs sentence-transformers from the `rag` extra, which is not installed",
                          "verb train-retriever", EXTRA_HINT) from None
    distinct = len(set(pairs.gold))
    batch_size = int(hyperparams["batch_size"])
    if batch_size > distinct:  # no_duplicates cannot fill a batch with more passages than there are
        raise ConfigError(f"hyperparams.batch_size={batch_size} but the pairs hold {distinct} distinct passages",
                          "key hyperparams.batch_size", f"give at most {distinct}")
    data = Dataset.from_dict({"anchor": pairs.questions, "positive": [passages[g] for g in pairs.gold]})
    scratch = out_dir.parent / f".{out_dir.name}.trainer"
    args = SentenceTransformerTrainingArguments(
        output_dir=str(scratch), num_train_epochs=float(hyperparams["epochs"]),
        max_steps=int(hyperparams.get("max_steps", -1)), per_device_train_batch_size=batch_size,
        learning_rate=float(hyperparams["lr"]), weight_decay=float(hyperparams.get("weight_decay", 0.0)),
        warmup_steps=float(hyperparams.get("warmup_ratio", 0.0)),  # below 1: a fraction of the steps
        seed=int(hyperparams["seed"]), batch_sampler="no_duplicates", save_strategy="no", report_to="none",
        disable_tqdm=True, logging_steps=10, dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning without a GPU only earns a warning
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data,
                                         loss=MultipleNegativesRankingLoss(model))
    result = trainer.train()
    shutil.rmtree(scratch, ignore_errors=True)
    model.save(str(out_dir), safe_serialization=True)
    return {"train/loss": float(result.training_loss), "train/steps": float(result.global_step),
            "train/pairs": float(len(pairs.questions))}
