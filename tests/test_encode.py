"""Golden label masks with the real tiny tokenizer: what is supervised, what is not, and length policies."""

from __future__ import annotations

import json

import pytest

from conftest import fmt
from tunelab import paths
from tunelab.data.datamodule import Collator, encode_task
from tunelab.data.encode import IGNORE, Encoded, apply_length_policy, encode_chat, encode_text
from tunelab.data.formats import Example
from tunelab.errors import DataError
from tunelab.models.load import load_tokenizer

TINY = str(paths.assets_dir() / "tiny-llama")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINY)


def _chat(*turns: tuple[str, str]) -> Example:
    return Example("rows.jsonl:7", messages=[{"role": r, "content": c} for r, c in turns])


def _supervised(tok, item: Encoded) -> str:
    return tok.decode([i for i, label in zip(item.input_ids, item.labels, strict=True) if label != IGNORE])


def _spans(item: Encoded) -> list[tuple[int, int]]:
    """[start, end) ranges of supervised positions."""
    spans, start = [], None
    for i, label in enumerate([*item.labels, IGNORE]):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_special_tokens_of_the_tiny_tokenizer(tok):
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.pad_token_id == 3 != tok.eos_token_id  # pad == eos would mask EOS out (trl#976)


def test_prompt_completion_golden_ids_and_labels(tok):
    item = encode_chat(tok, _chat(("user", "Is it good?"), ("assistant", "positive")))
    # <|im_start|>user\nIs it good?<|im_end|>\n<|im_start|>assistant\npositive<|im_end|>\n
    assert item.input_ids == [1, 424, 260, 202, 425, 299, 557, 34, 2, 202, 1, 407, 784, 508, 202, 375, 2, 202]
    assert tok.convert_ids_to_tokens(item.input_ids[-4:]) == ["Ċ", "positive", "<|im_end|>", "Ċ"]
    assert item.labels == [IGNORE] * 15 + [375, 2] + [IGNORE]  # answer + EOS; not the "\n" after EOS
    assert _supervised(tok, item) == "positive<|im_end|>"
    assert item.supervised == 2
    # The generation prompt is exactly the unsupervised prefix, so eval prompts match training.
    assert item.prompt_ids == item.input_ids[:15]
    assert tok.decode(item.prompt_ids).endswith("<|im_start|>assistant\n")
    assert item.reference == "positive" and item.origin == "rows.jsonl:7"


def test_multi_turn_chat_supervises_each_assistant_turn_only(tok):
    item = encode_chat(tok, _chat(
        ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello there"),
        ("user", "Sentiment of 'great'?"), ("assistant", "positive"),
    ))
    spans = _spans(item)
    assert len(spans) == 2
    assert [tok.decode(item.input_ids[a:b]) for a, b in spans] == ["Hello there<|im_end|>", "positive<|im_end|>"]
    for a, b in spans:
        assert item.labels[a:b] == item.input_ids[a:b]
        assert tok.decode(item.input_ids[:a]).endswith("<|im_start|>assistant\n")
    unsupervised = tok.decode([i for i, label in zip(item.input_ids, item.labels, strict=True) if label == IGNORE])
    for text in ("Be brief.", "Hi", "Sentiment of 'great'?", "<|im_start|>system", "<|im_start|>user"):
        assert text in unsupervised
    assert item.supervised == sum(b - a for a, b in spans)


def test_train_on_prompt_supervises_everything(tok):
    example = _chat(("system", "Be brief."), ("user", "Is it good?"), ("assistant", "positive"))
    item = encode_chat(tok, example, train_on_prompt=True)
    assert item.labels == item.input_ids
    assert item.input_ids == encode_chat(tok, example).input_ids


def test_text_format_supervises_every_token_and_appends_eos(tok):
    item = encode_text(tok, Example("book.jsonl:1", text="hello world"))
    plain = tok("hello world", add_special_tokens=False)["input_ids"]
    assert item.input_ids == [*plain, tok.eos_token_id]
    assert item.labels == item.input_ids
    assert item.prompt_ids is None and item.reference is None


def test_named_plain_template_ends_with_a_supervised_eos(tok):
    plain = load_tokenizer(TINY, chat_template="plain")
    item = encode_chat(plain, _chat(("user", "Is it good?"), ("assistant", "positive")))
    assert item.input_ids[-1] == plain.eos_token_id and item.labels[-1] == plain.eos_token_id
    assert _supervised(plain, item) == "positive<|im_end|>"


def test_template_without_eos_gets_a_supervised_eos_appended(tok):
    # Turn boundaries on "\n": a prompt ending in a space would merge with the answer's first BPE token.
    no_eos = "{% for m in messages %}{{ m['role'] + ':\n' + m['content'] + '\n' }}{% endfor %}" \
             "{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}"
    tok2 = load_tokenizer(TINY, chat_template=no_eos)
    assert tok2.eos_token not in tok2.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], tokenize=False)
    item = encode_chat(tok2, _chat(("user", "Is it good?"), ("assistant", "positive")))
    assert item.input_ids[-1] == tok2.eos_token_id and item.labels[-1] == tok2.eos_token_id
    assert _supervised(tok2, item) == "positive\n<|im_end|>"  # the whole rendered answer, then EOS
    assert item.labels.count(tok2.eos_token_id) == 1
    # An earlier assistant turn cannot get an appended EOS in the middle of the text: refused, not mislabelled.
    with pytest.raises(DataError, match="without the EOS token"):
        encode_chat(tok2, _chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")))


def _long(tok) -> Encoded:
    return encode_chat(tok, _chat(("user", "word " * 40), ("assistant", "positive")))


def test_overlength_error_names_the_row_and_the_numbers(tok):
    item = _long(tok)
    assert apply_length_policy(item, len(item.input_ids), "error") is item
    with pytest.raises(DataError) as info:
        apply_length_policy(item, 20, "error")
    text = info.value.message()
    assert text.startswith(f"tunelab: data error: rows.jsonl:7: example has {len(item.input_ids)} tokens, "
                           "over max_seq_len=20")
    assert "overlength=truncate or drop" in text


def test_overlength_drop_and_truncate(tok):
    item = _long(tok)
    assert apply_length_policy(item, 20, "drop") is None
    # Truncation that keeps the answer: cut the trailing "\n" only.
    cut = apply_length_policy(item, len(item.input_ids) - 1, "truncate")
    assert cut.input_ids == item.input_ids[:-1] and cut.labels == item.labels[:-1]
    assert _supervised(tok, cut) == "positive<|im_end|>"
    # Truncation that would remove every supervised token is an error, never a silent no-op row.
    with pytest.raises(DataError, match="removes every supervised token"):
        apply_length_policy(item, 20, "truncate")


def _write(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_dataset_with_zero_supervised_tokens_is_refused(tok, tmp_path):
    rows = [{"prompt": "word " * 40, "completion": "positive"} for _ in range(3)]
    _write(tmp_path / "d", rows)
    cfg = {"name": "d", "source": {"path": str(tmp_path / "d")}, "format": fmt("prompt_completion"),
           "overlength": "drop"}
    with pytest.raises(DataError) as info:
        encode_task(cfg, tok, 16, 0)  # every row is over-length and dropped: nothing left to learn from
    text = info.value.message()
    assert "the train split has no supervised tokens (3 rows, 3 over-length dropped" in text
    assert str(tmp_path / "d" / "train.jsonl") in text
    # The same rows with room to fit train fine, with exactly 2 supervised tokens per row.
    splits, stats = encode_task({**cfg, "overlength": "error"}, tok, 256, 0)
    assert stats["train"]["supervised_tokens"] == 6 and len(splits["train"]) == 3


def test_collator_pads_with_pad_id_and_keeps_eos_supervised(tok):
    short = encode_chat(tok, _chat(("user", "Hi"), ("assistant", "positive")))
    longer = encode_chat(tok, _chat(("user", "Is it good?"), ("assistant", "negative")))
    batch = Collator(tok.pad_token_id, with_prompts=True)([short, longer])
    width = len(longer.input_ids)
    pad = width - len(short.input_ids)
    assert pad > 0
    assert batch["input_ids"][0, -pad:].tolist() == [tok.pad_token_id] * pad
    assert batch["labels"][0, -pad:].tolist() == [IGNORE] * pad
    assert batch["attention_mask"][0].tolist() == [1] * len(short.input_ids) + [0] * pad
    assert (batch["labels"] == tok.eos_token_id).sum(dim=1).tolist() == [1, 1]  # EOS never masked as padding
    assert batch["prompt_ids"][0, 0].item() == tok.pad_token_id  # prompts are left-padded for generation
    assert batch["references"] == ["positive", "negative"]


def _with_template(template: str):
    tokenizer = load_tokenizer(TINY, chat_template=template)
    return tokenizer


def test_named_alpaca_template_golden_text_and_labels():
    tokenizer = _with_template("alpaca")
    item = encode_chat(tokenizer, _chat(("system", "Be brief."), ("user", "Is it good?"), ("assistant", "positive")))
    assert tokenizer.decode(item.input_ids) == (
        "Be brief.\n\n### Instruction:\nIs it good?\n\n### Response:\npositive<|im_end|>\n\n")
    assert tokenizer.decode(item.prompt_ids) == "Be brief.\n\n### Instruction:\nIs it good?\n\n### Response:\n"
    assert _supervised(tokenizer, item) == "positive<|im_end|>"


def test_named_chatml_template_matches_the_tokenizers_own(tok):
    example = _chat(("user", "Is it good?"), ("assistant", "positive"))
    own = encode_chat(tok, example)
    named = encode_chat(_with_template("chatml"), example)
    assert (named.input_ids, named.labels) == (own.input_ids, own.labels)


def test_inline_jinja_template_golden():
    # A newline, not a space, ends each role tag: BPE merges " 4" into one token, so a prompt ending in a
    # space is not a token prefix of prompt+answer (and is refused, see the next test's mechanism).
    inline = ("{% for m in messages %}{{ '<' + m['role'] + '>\\n' + m['content'] }}"
              "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<assistant>\\n' }}{% endif %}")
    tokenizer = _with_template(inline)
    item = encode_chat(tokenizer, _chat(("user", "2+2?"), ("assistant", "4"), ("user", "3+3?"), ("assistant", "6")))
    assert tokenizer.decode(item.input_ids) == (
        "<user>\n2+2?\n<assistant>\n4<|im_end|>\n<user>\n3+3?\n<assistant>\n6<|im_end|>\n")
    assert [tokenizer.decode(item.input_ids[s:e]) for s, e in _spans(item)] == ["4<|im_end|>", "6<|im_end|>"]


def test_template_whose_prompt_is_not_a_prefix_is_refused():
    # Renders the final message differently from earlier ones: the prompt rendered alone then differs
    # from the same turns inside prompt+answer, so training and inference would see different text.
    tokenizer = _with_template("{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}"
                               "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}{{ ' A:' }}{% endif %}")
    with pytest.raises(DataError, match=r"rows.jsonl:7: the chat template's prompt is not a prefix of prompt\+answer"):
        encode_chat(tokenizer, _chat(("user", "hi"), ("assistant", "hello")))


def test_template_library_draws_several_templates_reproducibly(tok):
    cfg = {"name": "s", "source": {"path": str(paths.data_dir() / "reviews")}, "format": fmt("prompt_completion"),
           "templates": [{"prompt": "A {{ text }}", "completion": "{{ sentiment }}"},
                         {"prompt": "B {{ title }}: {{ text }}", "completion": "{{ sentiment }}"},
                         {"prompt": "C {{ product }}", "completion": "{{ sentiment }}"}]}
    first, _ = encode_task(cfg, tok, 256, seed=7)
    again, _ = encode_task(cfg, tok, 256, seed=7)
    other, _ = encode_task(cfg, tok, 256, seed=8)
    heads = [tok.decode(e.prompt_ids).split("user\n", 1)[1][0] for e in first["train"][:300]]
    counts = {h: heads.count(h) for h in set(heads)}
    assert sorted(counts) == ["A", "B", "C"] and min(counts.values()) > 60  # ~100 each of 300
    assert [e.input_ids for e in again["train"]] == [e.input_ids for e in first["train"]]
    assert [e.input_ids for e in other["train"]] != [e.input_ids for e in first["train"]]


def test_named_templates_are_the_files_of_conf_chat_template():
    """A named template is one YAML under conf/chat_template/ (a one-line header, then `template:`), listed."""
    from tunelab.config.chat_templates import chat_template_problem, named_chat_templates

    files = sorted((paths.conf_dir() / "chat_template").glob("*.yaml"))
    assert {"alpaca", "chatml", "plain"} <= {f.stem for f in files}
    assert sorted(named_chat_templates()) == [f.stem for f in files]
    for file in files:
        assert file.read_text().startswith("# ")
        assert chat_template_problem(named_chat_templates()[file.stem]) is None  # Jinja that reads `messages`
