"""Where tunelab's own files live, found from this file (never from the cwd or the environment).

A wheel carries `conf/`, `data/` and `assets/` inside the package (see pyproject's
force-include); a source checkout keeps `conf/` and `data/` at the repository root.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _first_existing(*candidates: Path) -> Path:
    for path in candidates:
        if path.is_dir():
            return path
    return candidates[-1]


def conf_dir() -> Path:
    """The built-in config tree (`conf/`)."""
    return _first_existing(PACKAGE_DIR / "conf", PACKAGE_DIR.parents[1] / "conf")


def data_dir() -> Path:
    """The bundled datasets (`data/`)."""
    return _first_existing(PACKAGE_DIR / "bundled_data", PACKAGE_DIR.parents[1] / "data")


def assets_dir() -> Path:
    """Locally built model assets (the tiny model's config and tokenizer)."""
    return PACKAGE_DIR / "assets"
