"""Named chat templates (`conf/chat_template/<name>.yaml`) and the check of a `dataset.chat_template` value.

A dataset may pick a named template instead of the tokenizer's own: Jinja, rendered by the tokenizer exactly
as a model's own template would be. A new one is one YAML file; nothing here lists them.
"""

from __future__ import annotations

import functools
from typing import Any

import yaml

from tunelab import paths
from tunelab.errors import did_you_mean


@functools.cache
def named_chat_templates() -> dict[str, str]:
    """name -> Jinja text, one entry per file of `conf/chat_template/` (read once per process)."""
    return {file.stem: str(yaml.safe_load(file.read_text(encoding="utf-8"))["template"])
            for file in sorted((paths.conf_dir() / "chat_template").glob("*.yaml"))}


def resolve_chat_template(value: str) -> str:
    """The Jinja text of `value`: a named template's, or `value` itself (inline Jinja)."""
    return named_chat_templates().get(value, value)


def chat_template_problem(value: Any) -> tuple[str, str] | None:
    """(what, hint) when `value` is not a usable `dataset.chat_template`: a name of a named template, or
    Jinja that parses and reads `messages`. Anything else ("nope", a typo of a name) would be taken as a
    template that renders the same text for every example and trains on it."""
    names = named_chat_templates()
    if value is None or value in names:
        return None
    hint = f"{did_you_mean(str(value), names)}; or inline Jinja that loops over messages; null: the tokenizer's own"
    if not isinstance(value, str):
        return f"expected a template name or Jinja text, got {type(value).__name__}", hint
    import jinja2
    import jinja2.meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        parsed = ImmutableSandboxedEnvironment().parse(value)
    except jinja2.TemplateSyntaxError as err:
        return f"not a known name and not valid Jinja: {err.message} (line {err.lineno})", hint
    if "messages" not in jinja2.meta.find_undeclared_variables(parsed):
        return f"{value[:40]!r} is neither a known template name nor Jinja that reads `messages`", hint
    return None
