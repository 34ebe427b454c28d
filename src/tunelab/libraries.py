"""Every use of a library's private API, in one place, each with the reason no public one does.

A library upgrade that moves one of these breaks here and nowhere else. Nothing is imported at module level:
the command line imports this module before it knows whether it will need torch.
"""

from __future__ import annotations

import argparse
from typing import Any


# ---- Hydra ------------------------------------------------------------------------------------------
def hydra_args(argv: list[str], intermixed: bool = False) -> argparse.Namespace:
    """`argv` parsed by Hydra's own command-line parser (overrides, -m, --cfg, --help, --config-dir ...).

    Why private: Hydra has no public parser; reading the flags any other way could disagree with the run Hydra
    is about to start. `intermixed` accepts flags between overrides (`a=1 --cfg job b=2`).
    """
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    return parser.parse_intermixed_args(argv) if intermixed else parser.parse_args(argv)


def hydra_config_loader(conf_dir: str, config_dir: str | None = None) -> Any:
    """Hydra's config loader over `conf_dir` (and --config-dir before it), as Hydra builds it for a run.

    Why private: `OverridesParser` needs a loader to expand `group=glob(*)` into a group's options, and Hydra
    builds its loader only inside `hydra.main`.
    """
    import os

    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path

    search_path = create_config_search_path(conf_dir)
    if config_dir:
        search_path.prepend("command-line", f"file://{os.path.abspath(config_dir)}")
    return ConfigLoaderImpl(config_search_path=search_path)


# ---- Lightning --------------------------------------------------------------------------------------
def should_update_logs(trainer: Any) -> bool:
    """Whether Lightning's loggers take this step's figures (every `log_every_n_steps`).

    Why private: the trainer exposes no public flag; its own LearningRateMonitor reads this same attribute.
    """
    return bool(trainer._logger_connector.should_update_logs)


def is_stateful(obj: Any) -> bool:
    """Whether a dataloader has the state_dict/load_state_dict pair Lightning saves in its loop state.

    Why private: `_Stateful` is the protocol Lightning itself tests loaders against when it saves the data
    position; testing the same protocol restores exactly the loaders it saved.
    """
    from lightning_fabric.utilities.types import _Stateful

    return isinstance(obj, _Stateful)


def drop_wandb_anonymous(logger: Any) -> None:
    """Leave `anonymous` out of the arguments a WandbLogger passes to `wandb.init`.

    Why private: Lightning 2.6 always passes `anonymous=None`, and W&B 0.31 prints "The anonymous setting has no
    effect and will be removed" for any value given, on every run; the argument list is only held in this attribute.
    """
    logger._wandb_init.pop("anonymous", None)


# ---- transformers and kernels -------------------------------------------------------------------------
def set_attn_implementation(config: Any, attn_implementation: str | None) -> None:
    """Choose the attention kernel of a model built from a config (random init).

    Why private: `from_config` takes `attn_implementation` only for some architectures and versions; setting
    the config's attribute is what `from_pretrained` does for every one of them.
    """
    config._attn_implementation = attn_implementation


def apply_liger_kernel(model: Any) -> None:
    """Swap Liger's Triton kernels into an already built model (RMSNorm, RoPE, SwiGLU; not the loss).

    Why private: Liger's public entry points patch a model class before it is built; tunelab builds the model
    first (PEFT, quantization), and this is the function those entry points call per instance.
    """
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=False, cross_entropy=False)


def deepspeed_full_state_dict(engine: Any) -> dict[str, Any] | None:
    """ZeRO-3's weights gathered layer by layer onto rank 0, in the training dtype (a collective).

    Why private: DeepSpeed's public `save_16bit_model` writes this dict to a pickle file; tunelab writes
    safetensors, so it takes the dict `save_16bit_model` is built on.
    """
    return engine._zero3_consolidated_16bit_state_dict()


# ---- sacrebleu ----------------------------------------------------------------------------------------
def sacrebleu_statistics(metric: Any, predictions: list[str], references: list[list[str]]) -> list[list[float]]:
    """Per-sentence sufficient statistics (n-gram counts) of a sacrebleu corpus metric.

    Why private: sacrebleu's paired bootstrap uses these same two methods; the public `corpus_score` would
    re-score the text for every resample (85 ms against under 1 ms from statistics).
    """
    return metric._extract_corpus_statistics(predictions, references)


def sacrebleu_score(metric: Any, statistics: list[Any]) -> float:
    """The corpus score (0-100) of summed sufficient statistics; the pair of `sacrebleu_statistics`."""
    return float(metric._compute_score_from_stats(statistics).score)


# ---- OmegaConf (Hydra's config library) ---------------------------------------------------------------
def config_child(node: Any, key: str | int) -> Any:
    """The child of a DictConfig or ListConfig as stored: a node whose interpolations are not yet resolved.

    Why private: the public `node[key]` resolves interpolations, and validation walks the tree before every
    resolver can run (a `${tunelab_path:}` or a missing value must be reported, not raised mid-walk).
    """
    return node._get_node(key)


def raw_target(node: Any) -> str:
    """A node's `_target_` as written in the YAML (no interpolation resolved); the pair of `config_child`."""
    return str(node._get_node("_target_")._value())
