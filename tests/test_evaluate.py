"""The one scoring path: prompts rendered as training renders them, answers batched, scores aggregated."""

from __future__ import annotations

import torch

from tunelab.config import build, compose
from tunelab.data.encode import encode_chat
from tunelab.data.formats import Example
from tunelab.evaluate import EvalItem, aggregate, evaluate, left_pad, prompt_ids


def _tiny():
    cfg = compose(["paths.output_dir=/tmp"], return_hydra_config=False)
    torch.manual_seed(0)
    return build(cfg.model), build(cfg.tokenizer)


def test_prompt_ids_are_the_training_prompt():
    _, tokenizer = _tiny()
    messages = [{"role": "user", "content": "Is it good?"}, {"role": "assistant", "content": "positive"}]
    encoded = encode_chat(tokenizer, Example("x:1", messages=messages))
    assert encoded.prompt_ids == prompt_ids(tokenizer, messages[:1])


def test_left_pad_puts_real_tokens_last():
    ids, mask = left_pad([[5, 6, 7], [9]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_evaluate_rows_and_aggregates_per_task():
    model, tokenizer = _tiny()
    model.train()
    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": f"question {i}"}]) for i in range(5)]
    items = [EvalItem(p, reference="x", task="a" if i < 3 else "b", meta={"i": i}) for i, p in enumerate(prompts)]
    length = {"length": lambda answer, reference: float(len(answer) > 0), "one": lambda a, r: 1.0}
    result = evaluate(model, tokenizer, items, {"a": length, "b": {"one": length["one"]}},
                      {"max_new_tokens": 4, "do_sample": False, "temperature": 0.7}, batch_size=2)
    assert [row["i"] for row in result.rows] == [0, 1, 2, 3, 4]
    assert all(row["prompt_tokens"] == len(prompts[row["i"]]) for row in result.rows)
    assert "length" not in result.rows[3] and result.rows[3]["one"] == 1.0
    assert result.metrics["one"] == 1.0 and result.metrics["a/one"] == 1.0 and result.metrics["b/one"] == 1.0
    assert model.training  # evaluate() puts the model back in the mode it found it in
    assert result.metrics["length"] == sum(r["length"] for r in result.rows[:3]) / 3
    # The same items answered one by one give the same greedy answers as batched (left padding is masked).
    single = evaluate(model, tokenizer, items, {"a": length, "b": length}, {"max_new_tokens": 4}, batch_size=1)
    assert [r["answer"] for r in single.rows] == [r["answer"] for r in result.rows]


def test_aggregate_is_the_mean_over_rows():
    rows = [{"task": "t", "m": 1.0}, {"task": "t", "m": 0.0}, {"task": "t", "m": 0.5}]
    assert aggregate(rows, {"t": ["m"]}) == {"m": 0.5}
