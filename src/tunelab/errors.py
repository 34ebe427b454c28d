"""User-facing errors: one line `tunelab: <kind> error: <what>, <where>, <hint>` and a documented exit code.

Exit codes: 2 config or usage, 3 data, 4 checkpoint, 5 numerics; 1 is left to unexpected bugs,
which keep their traceback.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable
from typing import NoReturn


class TunelabError(Exception):
    """A mistake in the user's input; reported without a traceback."""

    kind = "usage"
    exit_code = 2

    def __init__(self, what: str, where: str | None = None, hint: str | None = None) -> None:
        self.what, self.where, self.hint = what, where, hint
        super().__init__(self.message())

    def message(self) -> str:
        parts = [self.what]
        if self.where:
            parts.append(self.where)
        text = f"tunelab: {self.kind} error: " + ", ".join(parts)
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class ConfigError(TunelabError):
    kind, exit_code = "config", 2


class DataError(TunelabError):
    kind, exit_code = "data", 3


class CheckpointError(TunelabError):
    kind, exit_code = "checkpoint", 4


class NumericsError(TunelabError):
    kind, exit_code = "numerics", 5


def exit_with(err: TunelabError) -> NoReturn:
    """End the process the way every verb ends on a user's mistake: the message on stderr, its exit code."""
    print(err.message(), file=sys.stderr)
    raise SystemExit(err.exit_code) from None


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """A hint naming the closest valid names (if any is close) and listing all of them."""
    valid = sorted({str(v) for v in valid})
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    listing = ", ".join(valid) if len(valid) <= 40 else ", ".join(valid[:40]) + ", ..."
    if close:
        return f"did you mean {' or '.join(repr(c) for c in close)}? valid: {listing}"
    return f"valid: {listing}" if valid else "nothing is valid here"
