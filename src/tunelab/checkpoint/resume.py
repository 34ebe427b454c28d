"""`resume=`: what a checkpoint belongs to (its identity), and the checked plan a run resumes from.

`find_resume` turns `resume=auto|<run dir>|<file>` into one checked checkpoint or a one-line error (exit 4):
a checkpoint of another model or method is refused with what differs, before anything is built, and again
against the built module's tensor names and shapes (`Resume.check_tensors`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf, open_dict

from tunelab.checkpoint.io import CheckpointInfo, complete_checkpoints, is_checkpoint_dir, read_checkpoint
from tunelab.errors import CheckpointError, ConfigError

if TYPE_CHECKING:  # Lightning (seconds to import) only where a run is built: `tunelab.prelaunch` imports this
    import pytorch_lightning as pl  # module for every verb, and `sweep-report`, `serve` or `generate` never train

log = logging.getLogger(__name__)

# ---- what a checkpoint belongs to -------------------------------------------------------------
IDENTITY_KEYS = ("model", "method")  # a checkpoint resumes only into a run of the same model and method
# How the model runs, not what its tensors are: a run resumed with gradient checkpointing turned on (after an
# out-of-memory) or compile turned off is the same run.
IGNORED_MODEL_KEYS = {"attn_implementation", "trust_remote_code", "revision", "tokenizer_name_or_path",
                      "gradient_checkpointing", "compile", "liger_kernel"}


def identity(cfg: DictConfig) -> dict[str, Any]:
    """The config that decides which tensors a checkpoint holds and what they mean: model and method."""
    plain = {key: OmegaConf.to_container(cfg[key], resolve=True) if isinstance(cfg.get(key), DictConfig)
             else cfg.get(key) for key in IDENTITY_KEYS}
    model = {k: v for k, v in (plain.get("model") or {}).items() if k not in IGNORED_MODEL_KEYS}
    assets = str(OmegaConf.select(cfg, "paths.assets_dir", default="") or "")
    if assets and isinstance(model.get("name_or_path"), str):  # the bundled models move with the checkout
        model["name_or_path"] = model["name_or_path"].replace(assets, "<assets>")
    return {"model": model, "method": plain.get("method")}


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def identity_difference(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: value in the checkpoint vs value here` for each setting that differs."""
    before, after = _flatten(saved), _flatten(current)
    return [f"{key}: {before.get(key)!r} in the checkpoint, {after.get(key)!r} here"
            for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]


# ---- resume=... ---------------------------------------------------------------------------------
@dataclass
class Resume:
    """What `resume=` resolved to: a checked checkpoint (or none), and whether the run continues in place."""

    path: Path | None = None
    info: CheckpointInfo | None = None
    in_place: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def ckpt_path(self) -> str | None:
        return str(self.path) if self.path else None

    def continue_logger_runs(self, loggers: DictConfig) -> None:
        """Resumed in place: a logger node with an `id` key (W&B) continues the checkpoint's run."""
        wandb_id = self.info.tunelab.get("wandb_id") if self.info is not None and self.in_place else None
        if not wandb_id:
            return
        with open_dict(loggers):
            for node in loggers.values():
                if isinstance(node, DictConfig) and "id" in node and node.get("id") is None:
                    node.id = wandb_id

    def prepare(self, callbacks: list[Any], module: pl.LightningModule, run_identity: dict[str, Any]) -> None:
        """Tag this run's checkpoints with its identity; refuse a checkpoint whose tensors do not fit `module`."""
        from tunelab.checkpoint.callback import Checkpointing

        for callback in callbacks:
            if isinstance(callback, Checkpointing):
                callback.identity = run_identity
        self.check_tensors(module)
        for note in self.notes:
            log.warning(note)
        if self.info is not None:
            log.warning("resuming from %s (step %d, epoch %d)", self.path, self.info.step, self.info.epoch)

    def check_tensors(self, module: pl.LightningModule) -> None:
        """Refuse a checkpoint whose tensors do not fit this run's module (names or shapes), saying what differs."""
        if self.info is None or (self.path is not None and self.path.is_dir()):
            return  # a directory of shards: the engine matches names and shapes itself as it loads
        state = module.state_dict()
        if not getattr(module, "strict_loading", True):  # adapters and frozen runs save only what trains
            trainable = {f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad}
            state = {k: v for k, v in state.items() if k in trainable}
        expected = {k: tuple(v.shape) for k, v in state.items()}
        saved = {k: v for k, v in self.info.state_shapes.items() if k in expected or not k.startswith("running.")}
        missing = sorted(set(expected) - set(saved))
        extra = sorted(set(saved) - set(expected))
        reshaped = sorted(k for k in set(saved) & set(expected) if saved[k] != expected[k])
        if not (missing or extra or reshaped):
            return
        parts = []
        for label, keys in (("missing", missing), ("unexpected", extra), ("of another shape", reshaped)):
            if keys:
                parts.append(f"{len(keys)} tensors {label} (e.g. {keys[0]})")
        raise CheckpointError(f"checkpoint {self.path} is of another model or method: " + "; ".join(parts),
                              "key resume", "resume with the model= and method= the checkpoint was trained with")


def resume_value(resume: Any) -> str | None:
    """`resume=` as text, None when unset (`null`); an empty `resume=` is a usage error (exit 2), not a silent
    fresh start: it is most likely a shell variable that expanded to nothing (`resume=$RUN`)."""
    if resume is None or str(resume).strip() in ("null", "None"):
        return None
    if not str(resume).strip():
        raise ConfigError("resume= is empty", "key resume",
                          "give resume=auto|<run dir>|<ckpt>, or leave resume= out to start a new run")
    return str(resume)


def find_resume(resume: Any, run_dir: Path, current_identity: dict[str, Any] | None = None) -> Resume:
    """Resolve `resume` (None, `auto`, a run directory, a checkpoints directory or a file) into a checked checkpoint.

    `auto` looks in this run's own directory and starts from scratch when nothing is there; a directory
    must hold a complete checkpoint. Incomplete checkpoints are skipped with a note.
    """
    text = resume_value(resume)
    if text is None:
        return Resume()
    auto = text == "auto"
    target = Path(run_dir) if auto else Path(text).expanduser()
    if auto or (target.is_dir() and not is_checkpoint_dir(target)):
        directory = target / "checkpoints" if (target / "checkpoints").is_dir() else target
        found, notes = complete_checkpoints(directory) if directory.is_dir() else ([], [])
        if not found:
            if auto:
                return Resume(notes=[*notes, f"resume=auto: no checkpoint in {directory} yet, starting from scratch"])
            if not (directory.is_dir() or (target / ".hydra").is_dir()):
                raise CheckpointError(f"{target} is a directory but not a run directory (no checkpoints/)",
                                      "key resume", "pass a run directory (outputs/runs/<id>) or a .ckpt file")
            raise CheckpointError(
                f"no complete checkpoint in {directory}: the run stopped before its first checkpoint"
                + (f" ({len(notes)} incomplete skipped)" if notes else ""), "key resume",
                "start the run again without resume= (nothing was saved to continue from)")
        path = found[-1][1]
        plan = Resume(path, read_checkpoint(path), in_place=True, notes=notes)
    else:
        plan = Resume(target, read_checkpoint(target))
    if current_identity is not None and plan.info is not None and "identity" in plan.info.tunelab:
        differences = identity_difference(plan.info.tunelab["identity"], current_identity)
        if differences:
            raise CheckpointError(
                f"checkpoint {plan.path} is of another model or method: " + "; ".join(differences[:4])
                + (f" (+{len(differences) - 4} more)" if len(differences) > 4 else ""), "key resume",
                "resume with the command line the run was started with (its .hydra/overrides.yaml) plus resume=")
    return plan


