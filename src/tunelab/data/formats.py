"""Turn source rows into training examples: a chat (list of role/content messages) or raw text.

A format is a function `(fields, row) -> Example` named by `_target_` in the dataset config
(`conf/dataset/format/<name>.yaml`, chosen with `dataset/format=<name>`); a user's own format is one
such function and one YAML. The built-in ones:
- `prompt_completion`: a prompt and its completion, either as columns or rendered from the row by a
  template of the dataset's template library (Jinja over the row's fields), sampled per example.
- `instruction`: Alpaca-style `instruction`, optional `input`, and `output` columns.
- `chat`: a `messages` column of role/content dicts (OpenAI style; ShareGPT's from/value is accepted).
- `text`: a `text` column for continued pre-training; every token is supervised.
- `preference`: a prompt, a `chosen` and a `rejected` reply (TRL's shapes, plain strings or message lists), for
  preference objectives (`objective=dpo|simpo`); any other objective trains on the chosen reply.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tunelab.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
# Templates come from configs and from run directories (generate reads a run's recipe): the sandbox keeps
# `{{ lipsum.__globals__['os'].system(...) }}` from running code. `_text` refuses a completion field that is
# not a string: `{{ sentiment }}` over null, 3, [..] or {..} would train on "None", "3", "[...]"; `_no_container`
# refuses a list or an object in a prompt (numbers and null there are common and read as intended).
class _Template(jinja2.Template):
    """A compiled template that knows the names it reads, in order: a bad value is reported under its own field,
    not another field that happens to hold the same value (`rating: 4` beside `sentiment: 4`)."""

    names: tuple[str, ...] = ()


class _NotText(jinja2.UndefinedError):
    """A value a template cannot render as text; an UndefinedError, so callers that report a bad field (generate's
    `fields=`) report this one too."""

    def __init__(self, value: Any) -> None:
        super().__init__(f"a field renders {type(value).__name__} {value!r}, not text")
        self.value = value


def _text(value: Any) -> Any:
    """`finalize` of completion templates: every `{{ ... }}` must produce a string (`|string` converts)."""
    if isinstance(value, jinja2.Undefined):
        return str(value)  # StrictUndefined raises here: a missing field is reported as missing, not as non-text
    if not isinstance(value, str):
        raise _NotText(value)
    return value


def _no_container(value: Any) -> Any:
    """`finalize` of prompt templates: a list or an object would be pasted in as its Python repr."""
    if isinstance(value, (Mapping, list, tuple)):
        raise _NotText(value)
    return value


def _environment(**extra: Any) -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False,
                                        autoescape=False, **extra)
    env.template_class = _Template
    return env


_JINJA = _environment(finalize=_no_container)
_COMPLETION_JINJA = _environment(finalize=_text)


def _compile(env: ImmutableSandboxedEnvironment, source: str) -> jinja2.Template:
    template = env.from_string(source)
    if isinstance(template, _Template):
        names = (node.name for node in env.parse(source).find_all(jinja2.nodes.Name) if node.ctx == "load")
        template.names = tuple(dict.fromkeys(names))
    return template


@dataclass
class Example:
    """A chat (`messages`) or a raw `text`, the expected answer for evaluation, and its origin."""

    origin: str
    messages: list[dict[str, str]] = field(default_factory=list)
    text: str | None = None
    template: int | None = None  # index into the template library, when one was used
    rejected: list[dict[str, str]] | None = None  # a preference row: the same chat ending in the rejected reply

    @property
    def reference(self) -> str | None:
        return self.messages[-1]["content"] if self.messages else None


def compile_templates(templates: Sequence[Mapping[str, str]]) -> list[tuple[jinja2.Template, jinja2.Template]]:
    """Compile a template library; a syntax error names the template's index."""
    compiled = []
    for index, template in enumerate(templates):
        try:
            compiled.append((_compile(_JINJA, template["prompt"]), _compile(_COMPLETION_JINJA, template["completion"])))
        except (KeyError, TypeError):
            raise ConfigError(
                f"template {index} needs a 'prompt' and a 'completion'", f"key dataset.templates[{index}]"
            ) from None
        except jinja2.TemplateSyntaxError as err:
            raise ConfigError(
                f"template {index} is not valid Jinja: {err.message} (line {err.lineno})",
                f"key dataset.templates[{index}]",
            ) from None
    return compiled


def _text_field(row: RowContext, fields: Mapping[str, Any], name: str) -> str:
    if name not in fields:
        raise DataError(f"{row.origin}: {name}: missing", hint=f"fields present: {', '.join(sorted(fields))}")
    value = fields[name]
    if not isinstance(value, str):
        raise DataError(f"{row.origin}: {name}: expected a string, got {type(value).__name__}")
    return value


def _render(row: RowContext, template: jinja2.Template, fields: Mapping[str, Any], part: str) -> str:
    try:
        return template.render(**fields)
    except _NotText as err:  # before UndefinedError, which it is
        read = [*getattr(template, "names", ()), *map(str, fields)]  # the template's own names first
        name = next((k for k in read if k in fields and fields[k] is err.value), None)
        shown = repr(err.value) if len(repr(err.value)) <= 40 else repr(err.value)[:37] + "..."
        if part == "completion":
            hint = (f"a {part} is text: fix the row, or write {{{{ {name or 'field'} | string }}}} in the template "
                    "to train on the value's text")
        else:
            hint = (f"a {part} is text: fix the row, or say how to write it in the template, e.g. "
                    f"{{{{ {name or 'field'} | join(', ') }}}} for a list or {{{{ {name or 'field'} | tojson }}}}")
        raise DataError(
            f"{row.origin}: {name or part}: the {part} renders {type(err.value).__name__} {shown}, not a string",
            hint=hint,
        ) from None
    except jinja2.UndefinedError as err:
        raise DataError(
            f"{row.origin}: {part} template: {err.message}",
            hint=f"fields present: {', '.join(sorted(map(str, fields)))}; rename with dataset.column_map",
        ) from None
    except jinja2.exceptions.SecurityError as err:
        raise ConfigError(f"{part} template: refused by Jinja's sandbox: {err}", "key dataset.templates") from None


def _chat(row: RowContext, fields: Mapping[str, Any]) -> list[dict[str, str]]:
    raw = fields.get("messages", fields.get("conversations"))
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{row.origin}: messages: expected a non-empty list of role/content objects")
    messages = []
    for i, message in enumerate(raw):
        where = f"{row.origin}: messages[{i}]"
        if not isinstance(message, Mapping):
            raise DataError(f"{where}: expected an object, got {type(message).__name__}")
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        role = SHAREGPT_ROLES.get(role) if isinstance(role, str) else None
        if role is None:
            raise DataError(f"{where}.role: unknown role {message.get('role', message.get('from'))!r}",
                            hint=f"roles: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}.content: expected a string, got {type(content).__name__}")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{row.origin}: messages: the last message must be the assistant's")
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and not message["content"].strip():
            raise DataError(f"{row.origin}: messages[{i}].content: empty assistant message")
    return messages


@dataclass(frozen=True)
class RowContext:
    """What a format function knows besides the row's fields: where the row came from and the dataset's recipe."""

    origin: str  # file:line, for error messages
    index: int  # the row's index in its split: the template draw depends on it and the seed only
    seed: int
    templates: Sequence[tuple[jinja2.Template, jinja2.Template]] = ()
    system_prompt: str | None = None


Format = Callable[[Mapping[str, Any], RowContext], Example]


def _with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def _single_turn(row: RowContext, prompt: str, completion: str, template: int | None = None) -> Example:
    if not completion.strip():
        raise DataError(f"{row.origin}: completion: empty")
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return Example(row.origin, messages=_with_system(messages, row.system_prompt), template=template)


def text(fields: Mapping[str, Any], row: RowContext) -> Example:
    """A `text` column for (continued) pre-training."""
    return Example(row.origin, text=_text_field(row, fields, "text"))


def chat(fields: Mapping[str, Any], row: RowContext) -> Example:
    """A `messages` (or ShareGPT `conversations`) column; the dataset's system prompt is added when absent."""
    return Example(row.origin, messages=_with_system(_chat(row, fields), row.system_prompt))


def prompt_completion(fields: Mapping[str, Any], row: RowContext) -> Example:
    """One turn rendered by a template drawn with `Random(seed, index)` (stable), or `prompt`/`completion` columns."""
    if not row.templates:
        return _single_turn(row, _text_field(row, fields, "prompt"), _text_field(row, fields, "completion"))
    chosen = random.Random(f"{row.seed}:{row.index}").randrange(len(row.templates))
    prompt_t, completion_t = row.templates[chosen]
    prompt = _render(row, prompt_t, fields, "prompt")
    return _single_turn(row, prompt, _render(row, completion_t, fields, "completion"), chosen)


def instruction(fields: Mapping[str, Any], row: RowContext) -> Example:
    """Alpaca-style `instruction`, optional `input`, `output` columns (or the template library, when given)."""
    if row.templates:
        return prompt_completion(fields, row)
    prompt = _text_field(row, fields, "instruction")
    extra = fields.get("input")
    if extra is not None and not isinstance(extra, str):
        raise DataError(f"{row.origin}: input: expected a string, got {type(extra).__name__}")
    prompt = f"{prompt}\n\n{extra}" if extra and extra.strip() else prompt
    return _single_turn(row, prompt, _text_field(row, fields, "output"))


def _reply(row: RowContext, fields: Mapping[str, Any], name: str) -> list[dict[str, str]]:
    """`chosen`/`rejected` as messages: a string is one assistant turn; a list is TRL's conversational shape."""
    value = fields.get(name)
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{row.origin}: {name}: empty")
        return [{"role": "assistant", "content": value}]
    if isinstance(value, list):
        return _chat(row, {"messages": value})
    if name not in fields:
        raise DataError(f"{row.origin}: {name}: missing", hint="a preference row has prompt, chosen and rejected")
    raise DataError(f"{row.origin}: {name}: expected a string or a list of messages, got {type(value).__name__}")


def preference(fields: Mapping[str, Any], row: RowContext) -> Example:
    """A `prompt`, a `chosen` and a `rejected` reply, in TRL's shapes: strings (standard), message lists
    (conversational), or no prompt and two whole conversations that differ only in the last assistant turn
    (implicit prompt). With a template library the prompt is rendered by the drawn template's prompt (its
    completion is not used). The chosen chat is the example's `messages` (what SFT trains on and evaluation
    scores against); `rejected` is the same prompt ending in the rejected reply."""
    chosen, rejected = _reply(row, fields, "chosen"), _reply(row, fields, "rejected")
    drawn = None
    if row.templates:
        drawn = random.Random(f"{row.seed}:{row.index}").randrange(len(row.templates))
        prompt = [{"role": "user", "content": _render(row, row.templates[drawn][0], fields, "prompt")}]
    elif isinstance(fields.get("prompt"), list):
        prompt = _chat(row, {"messages": [*fields["prompt"], {"role": "assistant", "content": "-"}]})[:-1]
    elif "prompt" in fields:
        prompt = [{"role": "user", "content": _text_field(row, fields, "prompt")}]
    else:  # implicit prompt: everything before the last turn, the same in both
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
        if _reply(row, fields, "rejected")[:-1] != prompt:
            raise DataError(f"{row.origin}: chosen and rejected: without a prompt column they must share every "
                            "turn but the last", hint="add a prompt column (TRL's explicit-prompt shape)")
    if not prompt:
        raise DataError(f"{row.origin}: prompt: empty", hint="a preference row needs a prompt to reply to")
    if chosen == rejected:
        raise DataError(f"{row.origin}: chosen and rejected: identical",
                        hint="a pair teaches nothing when both replies are the same; fix or drop the row")
    prompt = _with_system(prompt, row.system_prompt)
    return Example(row.origin, messages=[*prompt, *chosen], template=drawn, rejected=[*prompt, *rejected])
