"""Keep secrets out of everything tunelab persists: saved configs, logs, W&B."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Key names that hold secrets (`hf_token`, `api_key`, `password`), but not `tokenizer` or `max_new_tokens`.
SECRET_KEY = re.compile(r"(^|_)(token|api_?key|secret|password|passwd|credentials?|auth)($|_)", re.I)
# Values that look like credentials whatever their key (Hugging Face and OpenAI-style keys).
SECRET_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,})\b")
MASK = "***"


def redact(obj: Any) -> Any:
    """A copy of a plain container with secret-looking keys and values masked."""
    if isinstance(obj, dict):
        return {k: MASK if SECRET_KEY.search(str(k)) and obj[k] not in (None, "", False) else redact(obj[k])
                for k in obj}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return SECRET_VALUE.sub(MASK, obj)
    return obj


FILE_MASK = "REDACTED"  # a plain YAML scalar: valid wherever it lands (`- x`, `[x]`, `k: x`), unlike a bare ***
# `key: value` and `- key=value` (Hydra's overrides.yaml) lines; the value is masked when the key's last part is secret.
_KEY_LINE = re.compile(r"^(?P<lead>\s*(?:-\s+)?[+~]*)(?P<key>[\w.\-]+)(?P<sep>\s*:\s+|=)(?P<value>.*?)\s*$")


def redact_line(line: str, mask: str = FILE_MASK) -> str:
    """One YAML line or command-line override with secrets masked: by key name, then by value pattern."""
    match = _KEY_LINE.match(line)
    if (match and SECRET_KEY.search(match["key"].rsplit(".", 1)[-1])
            and match["value"] not in ("", "null", "~", "''", '""', "false")):
        end = "\n" if line.endswith("\n") else ""
        line = f"{match['lead']}{match['key']}{match['sep']}{mask}{end}"
    return SECRET_VALUE.sub(mask, line)


def redact_file(path: Path) -> None:
    """Mask secrets in a YAML file written by someone else (Hydra's saved configs); it stays valid YAML."""
    if not path.is_file():
        return
    text = path.read_text()
    masked = "".join(redact_line(line) for line in text.splitlines(keepends=True))
    if masked != text:
        path.write_text(masked)


def logged_config(cfg: DictConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """The resolved config for experiment trackers: secrets masked, hyperparameters also at the top level
    (so W&B's parallel-coordinates and parameter-importance panels find them)."""
    resolved = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    flat = {k: v for k, v in resolved["hyperparams"].items() if not isinstance(v, dict)}
    return redact({**flat, **extra, **resolved})
