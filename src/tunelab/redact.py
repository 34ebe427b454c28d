"""Keep secrets out of everything tunelab persists: saved configs, logs, W&B."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

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


def redact_file(path: Path) -> None:
    """Mask credential-looking values in a text file written by someone else (Hydra's saved configs)."""
    if path.is_file():
        text = path.read_text()
        masked = SECRET_VALUE.sub(MASK, text)
        masked = re.sub(r"((?:^|[\s.'\"-])\w*(?:token|api_?key|secret|password)\w*\s*[:=]\s*)(?!null\b)(\S+)",
                        lambda m: m.group(1) + MASK if "tokenizer" not in m.group(0) else m.group(0),
                        masked, flags=re.I | re.M)
        if masked != text:
            path.write_text(masked)
