"""Tokenise examples into input ids and labels, supervising only what the model should learn to say.

Chats are rendered by the tokenizer's chat template. Each assistant turn's tokens are found by
rendering the conversation up to that turn twice, with and without the turn, and taking the
difference; this works for any template and checks that the prompt is a prefix of prompt+answer.
The end-of-sequence token closes every supervised span, so the model learns to stop (trl#976).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tunelab.data.formats import Example
from tunelab.errors import DataError

IGNORE = -100


@dataclass
class Encoded:
    """Token ids, labels (IGNORE where not supervised), and for chats the prompt of the last turn."""

    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int] | None
    reference: str | None
    origin: str
    # A preference pair (formats.preference): the same prompt ending in the rejected reply, ids and labels as above.
    # Flat lists, not a nested Encoded, so the JSON cache stores them as they are.
    rejected_ids: list[int] | None = None
    rejected_labels: list[int] | None = None

    @property
    def supervised(self) -> int:
        """Tokens that carry loss: labels are compared with the next token, so the first never counts."""
        return sum(label != IGNORE for label in self.labels[1:])


def _ids(tokenizer: Any, text: str) -> list[int]:
    # Templates already write any BOS they want; adding special tokens again would double it.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (backend is not None and backend.truncation is None and backend.padding is None
            and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))):
        # The Rust tokenizer that `tokenizer(...)` calls, without its Python wrapping: the same ids (a test checks)
        # for 0.08 ms instead of 0.2 ms a prompt (a served request costs its event loop ~1 ms in all). A backend that an
        # earlier call left truncating, padding or splitting special tokens goes through `tokenizer(...)`, which
        # resets that.
        return backend.encode(text, add_special_tokens=False).ids
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def prompt_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """The token ids of `messages` rendered by the tokenizer's chat template, ending in the generation prompt: the
    prompt of a training example (below), of a scored test item and of a served request are the same tokens."""
    return _ids(tokenizer, _render(tokenizer, list(messages), True))


def encode_chat(tokenizer: Any, example: Example, train_on_prompt: bool = False) -> Encoded:
    """Ids and labels of a chat: every assistant turn (and its end-of-turn token) supervised, nothing else."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{example.origin}: the tokenizer has no chat template",
            "key dataset.chat_template",
            "set dataset.chat_template to chatml, alpaca, plain or inline Jinja",
        )
    messages = example.messages
    input_ids = _ids(tokenizer, _render(tokenizer, messages, False))
    labels = list(input_ids) if train_on_prompt else [IGNORE] * len(input_ids)
    eos = tokenizer.eos_token_id
    prompt: list[int] = []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = prompt_ids(tokenizer, messages[:turn])  # what evaluation generates from
        upto = _ids(tokenizer, _render(tokenizer, messages[: turn + 1], False))
        if upto[: len(prompt)] != prompt or input_ids[: len(upto)] != upto:
            raise DataError(
                f"{example.origin}: the chat template's prompt is not a prefix of prompt+answer (turn {turn})",
                "key dataset.chat_template",
                "the template must render earlier turns identically whatever follows; use a named template",
            )
        start, end = len(prompt), len(upto)
        span = upto[start:end]
        if eos not in span:
            if turn != len(messages) - 1:
                raise DataError(
                    f"{example.origin}: the chat template ends assistant turn {turn} without the EOS token "
                    f"{tokenizer.eos_token!r}",
                    "key dataset.chat_template",
                    "use a template that closes each assistant turn with the eos token",
                )
            # A template that writes no end-of-turn token: append EOS so the model still learns to stop.
            input_ids = input_ids[:end] + [eos]
            labels = labels[:end] + [IGNORE]
            end += 1
        else:
            # Supervise up to and including the first EOS; template whitespace after it is not an answer.
            end = start + span.index(eos) + 1
        labels[start:end] = input_ids[start:end]
    return Encoded(input_ids, labels, prompt, example.reference, example.origin)


def encode_text(tokenizer: Any, example: Example) -> Encoded:
    """Ids and labels of raw text: every token supervised, EOS appended."""
    ids = _ids(tokenizer, example.text or "") + [tokenizer.eos_token_id]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [tokenizer.bos_token_id] + ids
    return Encoded(ids, list(ids), None, None, example.origin)


def encode_pair(tokenizer: Any, example: Example, max_len: int, policy: str) -> Encoded | None:
    """A preference example: the chosen chat as the example (what SFT trains on and evaluation scores against) and
    the rejected chat beside it, each held to `max_seq_len` by `policy` (a pair is dropped if either is)."""
    chosen = apply_length_policy(encode_chat(tokenizer, example), max_len, policy)
    rejected = encode_chat(tokenizer, Example(f"{example.origin}: rejected", messages=example.rejected or []))
    rejected = apply_length_policy(rejected, max_len, policy)
    if chosen is None or rejected is None:
        return None
    chosen.rejected_ids, chosen.rejected_labels = rejected.input_ids, rejected.labels
    return chosen


def apply_length_policy(encoded: Encoded, max_len: int, policy: str) -> Encoded | None:
    """Enforce `max_seq_len`: `error` (default), `truncate` (keeping at least one supervised token), or `drop`."""
    if len(encoded.input_ids) <= max_len:
        return encoded
    if policy == "drop":
        return None
    if policy == "truncate":
        cut = Encoded(encoded.input_ids[:max_len], encoded.labels[:max_len], encoded.prompt_ids,
                      encoded.reference, encoded.origin)
        if cut.supervised == 0:
            raise DataError(
                f"{encoded.origin}: truncation to max_seq_len={max_len} removes every supervised token "
                f"(length {len(encoded.input_ids)})",
                hint="raise hyperparams.max_seq_len or set dataset.overlength=drop",
            )
        return cut
    raise DataError(
        f"{encoded.origin}: example has {len(encoded.input_ids)} tokens, over max_seq_len={max_len}",
        hint="raise hyperparams.max_seq_len, or set dataset.overlength=truncate or drop",
    )
