"""W&B model artifacts: log a run's `model/` as one, and resolve an artifact reference back to a directory.

Logging: `log_model_artifact` adds `model/` (and metrics.json) to a W&B artifact of type `model`, named
`model-<W&B run id>` (Lightning's own convention), with the final metrics as its metadata and aliases
`latest` and `final`. Offline the artifact lives in the offline run's transaction log
(`wandb/offline-run-*/run-<id>.wandb`) until `wandb sync` uploads it; the files are referenced where they
are (`policy="immutable"`), not copied into W&B's staging area.

Resolving: wherever a run directory is accepted (`generate`, `export`, `serve`), a reference
`wandb-artifact://[entity/][project/]<name>[:alias]` (or `[entity/project/]<name>:<alias>` when no such
path exists) is accepted too. W&B cannot resolve a reference without its server (`use_artifact` and
`Artifact.download` refuse in offline mode, wandb/wandb#9631), so tunelab first looks for the artifact
locally: it reads the offline runs' transaction logs under the search roots (`TUNELAB_ARTIFACT_ROOTS`,
`:`-separated, default `outputs`) with W&B's own protobuf record class — a LevelDB-style log of protobuf
records, read as data, nothing executed — finds the newest artifact record with that name and alias,
and returns the run directory that logged it after checking every file against the record's MD5 digests.
With W&B credentials and not offline, a reference not found locally is downloaded with W&B's public API.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import CheckpointError, ConfigError
from tunelab.tracking import wandb_log

SCHEME = "wandb-artifact://"
ROOTS_ENV = "TUNELAB_ARTIFACT_ROOTS"
_REF = re.compile(r"^(?:(?P<entity>[\w.-]+)/)?(?:(?P<project>[\w.-]+)/)?(?P<name>[\w.-]+)(?::(?P<alias>[\w.-]+))?$")


# ---- logging -------------------------------------------------------------------------------------
def artifact_name(run_id: str) -> str:
    """`model-<run id>`, as Lightning's WandbLogger names model artifacts; W&B allows [\\w.-] only."""
    return "model-" + re.sub(r"[^\w.-]", "-", run_id)


def log_model_artifact(experiment: Any, model_dir: Path, metrics: Mapping[str, float]) -> Any:
    """Log `model_dir` (+ metrics.json next to it, when written) to the W&B run `experiment` as a model
    artifact with `metrics` as metadata; returns the artifact. Works offline (synced later)."""
    import wandb

    artifact = wandb.Artifact(artifact_name(experiment.id), type="model",
                              description="tunelab run's model/ directory (Hugging Face format)",
                              metadata={k: float(v) for k, v in metrics.items()})
    artifact.add_dir(str(model_dir), name="model", policy="immutable")  # referenced in place, not copied
    return experiment.log_artifact(artifact, aliases=["latest", "final"])


# ---- resolving -----------------------------------------------------------------------------------
@dataclass
class Reference:
    name: str
    alias: str = "latest"
    entity: str | None = None
    project: str | None = None

    def __str__(self) -> str:
        path = "/".join(p for p in (self.entity, self.project, self.name) if p)
        return f"{path}:{self.alias}"


def parse_reference(text: str) -> Reference | None:
    """A W&B artifact reference, or None when `text` is not one (then it is a path)."""
    explicit = text.startswith(SCHEME)
    body = text[len(SCHEME):].lstrip("/") if explicit else text
    if not explicit and (":" not in body or Path(text).exists()):
        return None
    match = _REF.match(body)
    if not match:
        if explicit:
            raise ConfigError(f"not a W&B artifact reference: {text!r}", "key run",
                              f"{SCHEME}[entity/][project/]<name>[:alias], e.g. {SCHEME}model-<run id>:latest")
        return None
    parts = match.groupdict()
    if parts["project"] is None and parts["entity"] is not None:  # `a/b:alias` is project/name
        parts["project"], parts["entity"] = parts["entity"], None
    return Reference(name=parts["name"], alias=parts["alias"] or "latest", entity=parts["entity"],
                     project=parts["project"])


def offline_artifacts(log_file: Path) -> Iterator[dict[str, Any]]:
    """The artifact records of one offline run: name, type, aliases, metadata, files (path -> md5 b64)."""
    for record in wandb_log.records(log_file):
        if record.WhichOneof("record_type") != "artifact":
            continue
        art = record.artifact
        yield {"name": art.name, "type": art.type, "aliases": list(art.aliases), "project": art.project,
               "entity": art.entity, "metadata": json.loads(art.metadata or "{}"),
               "files": {e.path: e.digest for e in art.manifest.contents}, "log": log_file}


def search_roots() -> list[Path]:
    raw = os.environ.get(ROOTS_ENV)
    return [Path(p) for p in raw.split(os.pathsep) if p] if raw else [Path("outputs")]


def _md5_b64(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return base64.b64encode(digest.digest()).decode()


def resolve_local(ref: Reference, roots: list[Path] | None = None) -> Path | None:
    """The run directory holding the newest local artifact matching `ref`, its files verified; None if none."""
    found = []
    for root in roots or search_roots():
        for log_file in root.glob("**/wandb/*run-*/run-*.wandb"):
            for art in offline_artifacts(log_file):
                if art["name"] == ref.name and art["type"] == "model" and (
                        ref.alias in art["aliases"] or ref.alias == "latest") and (
                        ref.project is None or ref.project == art["project"]):
                    found.append((log_file.stat().st_mtime, art))
    if not found:
        return None
    _, art = max(found, key=lambda item: item[0])
    run_dir = art["log"].parents[2]  # <run>/wandb/offline-run-*/run-<id>.wandb
    for rel, digest in art["files"].items():
        path = run_dir / rel
        if not path.is_file() or _md5_b64(path) != digest:
            raise CheckpointError(f"artifact {ref} was logged from {run_dir}, but {rel} there is missing or changed",
                                  f"file {path}", "sync the run (`wandb sync`) and resolve it online, or retrain")
    return run_dir


def _download(ref: Reference) -> Path:
    """Online: download the artifact with W&B's public API (files only; nothing in it is executed)."""
    from tunelab.tracking.loggers import wandb_credentials_present

    if os.environ.get("WANDB_MODE") in ("offline", "disabled") or not wandb_credentials_present():
        raise ConfigError(f"W&B artifact {ref} is not among the local offline runs and W&B is offline",
                          "key run", f"run where the artifact was logged (searched: "
                                     f"{', '.join(map(str, search_roots()))}; set {ROOTS_ENV}), or log in to W&B")
    import wandb

    try:
        artifact = wandb.Api().artifact(str(ref), type="model")
        return Path(artifact.download())
    except Exception as err:  # noqa: BLE001 - W&B's errors (not found, no access, network) as one message
        raise ConfigError(f"cannot fetch W&B artifact {ref}: {str(err).splitlines()[0]}", "key run",
                          "check the entity/project/name:alias and your W&B access") from None


def resolve_run(text: str) -> Path:
    """A run directory from `text`: a path as it is, or a W&B artifact reference resolved to a directory
    holding `model/` (local offline runs first, then W&B's server when online)."""
    ref = parse_reference(text)
    if ref is None:
        path = Path(text).expanduser()
        if not path.exists():
            raise ConfigError(f"run directory not found: {text}", "key run",
                              f"give a run directory written by `tunelab train`, or {SCHEME}model-<run id>:latest")
        return path
    return resolve_local(ref) or _download(ref)
