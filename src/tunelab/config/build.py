"""Build objects from `_target_` nodes: Hydra's instantiate, with tunelab's errors kept and a constructor's
refusal of the user's values turned into a config error."""

from __future__ import annotations

import inspect
import re
from typing import Any

from hydra.utils import get_object

from tunelab import libraries
from tunelab.errors import ConfigError, TunelabError


def build(node: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, except that a tunelab error raised by the target keeps its message and
    exit code (Hydra would wrap it into an InstantiationException and a traceback), and a ValueError or
    TypeError from a constructor given the user's values (LoraConfig(r=0), ...) is a config error."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, TunelabError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        from lightning_fabric.utilities.exceptions import MisconfigurationException

        # Lightning's own refusal of a setting (trainer=gpu or a DeepSpeed strategy where no GPU is) included.
        if isinstance(err.__cause__, (ValueError, TypeError, MisconfigurationException)):
            match = re.search(r"full_key: (\S+)", str(err))
            target = re.search(r"target '([^']+)'", str(err))
            raise ConfigError(
                f"{target.group(1) if target else 'a target'} refused its arguments: {err.__cause__}",
                f"key {match.group(1)}" if match else "config", "check the values set under this key",
            ) from None
        raise


def build_with(node: Any, **runtime: Any) -> Any:
    """`build(node)`, passing each runtime object in `runtime` only to a target that names it as a parameter
    (a W&B logger takes the run context; a CSV logger does not)."""
    target = get_object(libraries.raw_target(node))
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        params = {}
    passed = {k: v for k, v in runtime.items() if k in params}
    # Hydra merges keyword arguments into the node, which turns a dataclass (the run context) into a
    # DictConfig without its methods; a partial called with the objects passes them as they are.
    return build(node, _partial_=True)(**passed) if passed else build(node)
