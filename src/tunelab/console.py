"""The console a person reads: the libraries' tips and known-harmless warnings filtered once, at the command line's
entry point, and lines holding a path or a command printed whole.

Each filter names the message it drops and why nothing is lost; any other warning still prints. Only the command
line installs them (`tunelab.cli.run_verb`): a test or a notebook calling a verb sees every library message.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

# (message prefix as a regular expression, warning category, why it is harmless here)
WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # Lightning 2.6 tests `isinstance(spec, LeafSpec)` on every batch it moves; torch 2.13 deprecated that class.
    # Lightning's own code, identical results: nothing a user can or needs to change.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, "Lightning's call into torch"),
    # TuneModule overrides on_after_batch_transfer on purpose (flattening a packed batch for FlashAttention) and
    # the datamodule does not define it: Lightning says it will use the module's, which is what is meant.
    (r"You have overridden `on_after_batch_transfer` in `LightningModule` but have passed in a "
     r"`LightningDataModule`", UserWarning, "tunelab's hook, used as intended"),
)
# Lightning's rank-zero info lines that advertise a service (Lightning's cloud logger and model registry), printed on
# every run whatever the logger: not about the run.
TIPS = ("💡 Tip:",)
TIP_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero",
               "lightning.pytorch.utilities.rank_zero")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TIPS)


_TIP_FILTER = _DropTips()


def quiet_known_noise() -> None:
    """Install the filters above (idempotent): warnings by message and category, Lightning's tips by logger."""
    for message, category, _ in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in TIP_LOGGERS:
        logger = logging.getLogger(name)
        if _TIP_FILTER not in logger.filters:
            logger.addFilter(_TIP_FILTER)


def print_whole(console: Any, text: str) -> None:
    """One line holding a path or a command, never broken by rich at the console's width (a terminal wraps it for
    the eye only, so it copies and pastes whole) and not recoloured (digits in a path are not numbers)."""
    console.print(text, soft_wrap=True, highlight=False, markup=False)
