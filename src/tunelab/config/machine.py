"""Checks of what this machine offers a job about to start here: the hub models it names (cached, or a network to
fetch them), the accelerator it asks for, and the engine's package. Only the command line's pre-flight runs them
(`tunelab.cli.preflight`): `validate()` stays a check of the config alone, the same on every machine, and a job a
cluster launcher sends elsewhere (SLURM) is not judged by the machine that submits it.

Each answers in about a second where the loader would answer after minutes: without a network, huggingface_hub
retries every file five times with back-off (53 s for one model on an idle machine) before the same refusal.
"""

from __future__ import annotations

import glob
import os
import socket
import sys
import threading
import urllib.parse
import urllib.request
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tunelab.config.engine import check_engine
from tunelab.config.locate import value_at, where
from tunelab.config.places import LOCAL_PREFIXES
from tunelab.errors import ConfigError

MODEL_KEYS = ("model.name_or_path", "model.tokenizer_name_or_path")
# A file every hub model (config.json) or tokenizer (one of the others) has: its presence in the cache says the
# repository was downloaded at this revision.
CACHE_MARKERS = {"model.name_or_path": ("config.json",),
                 "model.tokenizer_name_or_path": ("tokenizer_config.json", "tokenizer.json", "config.json")}
PROBE_TIMEOUT_S = 3.0  # one TCP connection to the hub (or the proxy): a reachable hub answers in well under this
BUNDLED = "a local directory (model.name_or_path=/path/to/model model.random_init=false) or a bundled model " \
          "(model=tiny, model=tiny_base, model=tiny_instruct)"
# Launchers that start the job on this machine; any other (SLURM, Ray) runs it on machines of its own.
LOCAL_LAUNCHERS = ("", "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
                   "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher")

_probed: dict[str, bool] = {}  # endpoint -> reachable: one probe per process, however many configs a sweep has


def check_machine(cfg: DictConfig) -> None:
    """The engine's package, the accelerator and the hub models of a job about to start on this machine."""
    check_engine(cfg)
    launcher = str(OmegaConf.select(cfg, "hydra.launcher._target_", default="") or "")
    if launcher in LOCAL_LAUNCHERS:
        check_accelerator(cfg)
        check_hub_ids(cfg)


# ---- hub models ------------------------------------------------------------------------------------------------
def _hub_ids(cfg: DictConfig) -> dict[str, list[str]]:
    """hub id -> the model keys naming it (the tokenizer's usually interpolates the model's)."""
    ids: dict[str, list[str]] = {}
    for key in MODEL_KEYS:
        value = value_at(cfg, key)
        if not isinstance(value, str) or not value or value.startswith(LOCAL_PREFIXES):
            continue
        try:
            local = Path(value).exists()
        except (OSError, ValueError):  # a name too long for the file system, a NUL: no directory, so not local
            local = False
        if not local:
            ids.setdefault(value, []).append(key)
    return ids


def reachable(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether one TCP connection to `endpoint`'s host (or the proxy the environment names for it) opens within
    `timeout` seconds. Run in a thread: a name lookup ignores socket timeouts and can hang far longer."""
    if endpoint in _probed:
        return _probed[endpoint]
    url = urllib.parse.urlsplit(endpoint)
    proxy = urllib.request.getproxies().get(url.scheme) if not urllib.request.proxy_bypass(url.hostname or "") else None
    target = urllib.parse.urlsplit(proxy if "//" in str(proxy) else f"http://{proxy}") if proxy else url
    port = target.port or (443 if target.scheme == "https" else 80)
    result: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((target.hostname or "", port), timeout=timeout).close()
            result.append(True)
        except (OSError, ValueError):
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    _probed[endpoint] = bool(result and result[0])
    return _probed[endpoint]


def _cached(repo_id: str, key: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    for name in CACHE_MARKERS[key]:
        try:
            if isinstance(try_to_load_from_cache(repo_id, name, revision=revision), str):
                return True
        except Exception:  # noqa: BLE001 - an id the hub's validator refuses ("a/b/c") is not in the cache either
            return False
    return False


def go_offline() -> None:
    """Every later hub access reads the local cache only, at once: transformers, huggingface_hub and datasets read
    HF_HUB_OFFLINE (datasets and a not-yet-imported huggingface_hub from the environment, at import)."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


def check_hub_ids(cfg: DictConfig) -> None:
    """A hub model must be in the local cache when the hub cannot be reached (HF_HUB_OFFLINE, or one connection
    probe that fails): refused at once naming the key. Unreachable but cached: the job goes on offline."""
    ids = _hub_ids(cfg)
    if not ids:
        return
    from huggingface_hub import constants

    if constants.is_offline_mode():
        why = "HF_HUB_OFFLINE is set"
    elif reachable(constants.ENDPOINT):
        return  # online: the loader downloads (and says so if the id does not exist)
    else:
        go_offline()
        why = f"the hub cannot be reached from this machine (no connection within {PROBE_TIMEOUT_S:g} s)"
    revision = value_at(cfg, "model.revision")
    revision = revision if isinstance(revision, str) else None
    for repo_id, keys in ids.items():
        missing = [key for key in keys if not _cached(repo_id, key, revision)]
        if not missing:
            continue
        place = where(cfg, missing[0])
        if len(missing) > 1:  # the tokenizer follows the model: name the key to change first, and the other too
            place += f" (and key {missing[1]}, which follows it)"
        raise ConfigError(f"cannot load {repo_id!r}: it is not in the local cache and {why}", place,
                          f"use {BUNDLED}; or download it once on a machine with a network (unset HF_HUB_OFFLINE)")


# ---- accelerator -----------------------------------------------------------------------------------------------
def check_accelerator(cfg: DictConfig) -> None:
    """trainer.accelerator=gpu|cuda needs as many CUDA devices as trainer.devices asks for (gpu: or Apple's GPU),
    mps Apple's GPU."""
    accelerator = value_at(cfg, "trainer.accelerator")
    if accelerator not in ("gpu", "cuda", "mps"):
        return
    devices = value_at(cfg, "trainer.devices")
    wanted = devices if isinstance(devices, int) and devices > 0 else 1
    found = 0
    if accelerator != "mps":
        found = _cuda_devices()
        if found >= wanted:
            return
    if accelerator != "cuda" and wanted == 1 and sys.platform == "darwin" and _mps():
        return
    asked = f"{wanted} GPUs" if wanted > 1 else "a GPU"
    raise ConfigError(f"trainer.accelerator={accelerator} asks for {asked}, but torch sees "
                      f"{found or 'no'} {'Apple' if accelerator == 'mps' else 'CUDA'} GPU{'s' if found != 1 else ''} "
                      "on this machine", where(cfg, "trainer.accelerator"),
                      "use trainer=cpu (or trainer=default, which takes what is there); on a GPU machine, check that "
                      "torch is a CUDA build (make setup picks it where nvidia-smi finds a GPU) and "
                      "CUDA_VISIBLE_DEVICES")


def _cuda_devices() -> int:
    """CUDA devices torch can use. A Linux machine without an NVIDIA (or ROCm) device node has none, known without
    importing Lightning (11 s on a busy machine); elsewhere Lightning's count (NVML first: no CUDA context is made
    before ranks fork)."""
    if sys.platform.startswith("linux") and not glob.glob("/dev/nvidia[0-9]*") and not os.path.exists("/dev/kfd"):
        return 0
    from lightning_fabric.accelerators.cuda import num_cuda_devices

    return num_cuda_devices()


def _mps() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
