"""`tunelab serve engine=vllm`: hand a run's model to vLLM's own OpenAI-compatible server (CUDA only).

vLLM brings continuous batching and paged attention on a GPU; tunelab's part is choosing what it serves (the run's
plain model directory, whose tokenizer carries the chat template used in training) and the same command-line keys
(host, port, served model name, API key, max_tokens as the context cap). An adapter run is exported first
(`tunelab export` merges it): vLLM's LoRA serving is a separate feature with its own limits.
The pre-flight (`verbs.serve._check_engine`) has already refused a machine without a GPU or without vllm.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

from tunelab.errors import ConfigError


def vllm_command(cfg: DictConfig, model_dir: Path, name: str) -> list[str]:
    """The `python -m vllm.entrypoints.openai.api_server` command line for `cfg` (the API key goes in the
    environment, VLLM_API_KEY, never on the command line where `ps` shows it)."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", name, "--host", str(cfg.host), "--port", str(int(cfg.port) or 8000),
            "--max-num-seqs", str(int(cfg.max_concurrent) + int(cfg.max_waiting)),
            "--dtype", "auto" if cfg.inference.dtype == "auto" else str(cfg.inference.dtype)]


def serve_vllm(cfg: DictConfig, api_key: str | None) -> None:
    """Run vLLM's server over `cfg.run`'s model until it exits; its exit status becomes ours."""
    from tunelab.tracking.artifacts import resolve_run

    if cfg.run is None:
        raise ConfigError("engine=vllm serves a run's model: give run=<run dir>", "key run",
                          "or serve a hub model with vLLM directly: vllm serve <hub id>")
    if cfg.inference.quantize != "none":
        raise ConfigError("inference.quantize=int8 is torch's CPU quantization; vLLM has its own", "key inference",
                          "use inference.quantize=none with engine=vllm")
    run_dir = resolve_run(str(cfg.run))
    model_dir = run_dir / "model"
    if (model_dir / "adapter_config.json").is_file():
        export = run_dir / "export"
        if not (export / "config.json").is_file():
            raise ConfigError(f"{model_dir} holds an adapter; vLLM serves a merged model", "key run",
                              f"tunelab export run={run_dir} first (it writes {export}), then serve again")
        model_dir = export
    name = str(cfg.served_model_name or run_dir.name)
    env = {**os.environ, **({"VLLM_API_KEY": api_key} if api_key else {})}
    print(f"tunelab: serving {name!r} with vLLM on http://{cfg.host}:{int(cfg.port) or 8000}/v1", flush=True)
    raise SystemExit(subprocess.call(vllm_command(cfg, model_dir, name), env=env))
