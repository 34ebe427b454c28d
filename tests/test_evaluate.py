"""The one scoring path: prompts rendered as training renders them, answers batched, scores aggregated."""

from __future__ import annotations

import torch

from tunelab.config.build import build
from tunelab.config.compose import compose
from tunelab.data.encode import encode_chat, prompt_ids
from tunelab.data.formats import Example
from tunelab.evaluation.evaluate import EvalItem, aggregate, evaluate, left_pad


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
    # longest first: batches take a task's items shortest first, and the rows still come back in the items' order
    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": f"question {i}" + " and more" * (5 - i)}])
               for i in range(5)]
    assert len(prompts[0]) > len(prompts[1]) > len(prompts[2])
    items = [EvalItem(p, reference="x", task="a" if i < 3 else "b", meta={"i": i}) for i, p in enumerate(prompts)]
    length = {"length": lambda answer, reference: float(len(answer) > 0), "one": lambda a, r: 1.0}
    result = evaluate(model, tokenizer, items, {"a": length, "b": {"one": length["one"]}},
                      {"max_new_tokens": 4, "do_sample": False, "temperature": 0.7}, batch_size=2)
    assert [row["i"] for row in result.rows] == [0, 1, 2, 3, 4]
    assert all(row["prompt_tokens"] == len(prompts[row["i"]]) for row in result.rows)
    assert all(1 <= row["answer_tokens"] <= 4 for row in result.rows)  # generated, up to max_new_tokens
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


def test_rank_choices_scores_each_option_as_a_separate_unpadded_forward_would():
    """decoding=choices: the batched (prompt x choice) log-likelihoods equal one plain forward per pair, and the
    answer is the argmax; prompts of different lengths arrive left-padded as generation takes them."""
    from tunelab.evaluation.evaluate import choice_logprobs

    model, tokenizer = _tiny()
    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": text}]) for text in ("Is it good?", "Hm, is it?")]
    choices = ["positive", "negative", "it depends on the day"]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    got = choice_logprobs(model, tokenizer, ids, mask, choices)
    for p, prompt in enumerate(prompts):
        for c, choice in enumerate(choices):
            option = tokenizer(choice, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            seq = torch.tensor([prompt + option])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=seq).logits[0, :-1].float(), -1)
            want = sum(float(logp[len(prompt) - 1 + k, tok]) for k, tok in enumerate(option))
            assert abs(float(got[p, c]) - want) < 1e-4, (p, c, float(got[p, c]), want)
    items = [EvalItem(prompt, reference="positive", task="t") for prompt in prompts]
    result = evaluate(model, tokenizer, items, {"t": {"acc": lambda a, r: float(a == r)}},
                      {"max_new_tokens": 1, "rank_choices": True}, choices={"t": choices})
    assert [r["answer"] for r in result.rows] == [choices[int(i)] for i in got.argmax(-1)]
    # what the chosen label adds to the context: its tokens and end of turn, as scored
    assert [r["answer_tokens"] for r in result.rows] == [
        len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) + 1 for r in result.rows]


def test_rank_choices_needs_the_datasets_labels():
    import pytest

    from tunelab.config.checks import check_values
    from tunelab.errors import ConfigError

    check_values(compose(["decoding=choices"], return_hydra_config=False), deep=False)  # reviews_sentiment lists them
    with pytest.raises(ConfigError, match="dataset.choices"):
        check_values(compose(["decoding=choices", "dataset=terms_general"], return_hydra_config=False), deep=False)
    with pytest.raises(ConfigError, match="at least 2"):
        check_values(compose(["decoding=choices", "dataset.choices=[positive]"], return_hydra_config=False), deep=False)
    with pytest.raises(ConfigError, match="no dataset"):
        check_values(compose(["decoding=choices", "prompt=hi"], config_name="generate", return_hydra_config=False),
                     deep=False)
