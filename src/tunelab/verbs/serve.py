"""`tunelab serve run=<run dir>`: an OpenAI-compatible HTTP API over a trained run's model.

Endpoints: `POST /v1/chat/completions` (streamed as server-sent events with `stream: true`),
`POST /v1/completions`, `GET /v1/models`, `GET /health`. Built on FastAPI + uvicorn with
transformers' own `generate` and `TextIteratorStreamer`; the prompt is rendered exactly as
`tunelab generate` renders it (the chat template saved with the run, the recipe's system prompt),
so a greedy answer here equals `generate`'s. A request may send the training template's fields
instead of a message (`"fields": {...}`, an extra body field), as `generate fields=` does.

Limits: `max_tokens` per request, `max_concurrent` generations with `max_waiting` queued behind
them (429 beyond), a body size cap (413); every error is OpenAI-style JSON with its HTTP status,
never a traceback. SIGTERM stops accepting, lets requests in flight finish, and exits.

This file is the command (bind, load, run uvicorn); the HTTP app, request checks and streaming live in
`tunelab.serving`, and every answer comes from tunelab's one generation loop (`evaluate.generate_tokens`).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tunelab.errors import CheckpointError, ConfigError, TunelabError, did_you_mean
from tunelab.job import RunContext, verb
from tunelab.serving.requests import Served

# torch, transformers and the app (which imports them) load inside the functions below: a command line the
# checks refuse (an exposed host without a key, a limit out of range) is answered before seconds of imports.

API_KEY_ENV = "TUNELAB_API_KEY"


def is_loopback(host: str) -> bool:
    """`host` reaches only this machine (`localhost`, 127.0.0.0/8, ::1); `tunelab board` refuses others too."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _api_key(cfg: DictConfig) -> str | None:
    key = cfg.api_key if cfg.api_key is not None else os.environ.get(API_KEY_ENV)
    key = str(key).strip() if key is not None else None
    if not is_loopback(str(cfg.host)) and not key:
        raise ConfigError(f"host={cfg.host} would expose the model beyond this machine without an API key",
                          "key host", f"set {API_KEY_ENV} (or api_key=...) so clients must authenticate, "
                                      "or keep host=127.0.0.1")
    return key or None


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a port in use fails at once with exit 2."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets whose proto says TCP,
    # and without it every keep-alive request (the OpenAI client's) waited ~40 ms for the client's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is not "in use"
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}", "keys host, port",
                          "pick another port (port=0 takes any free one) or stop what is using it") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def load_served(cfg: DictConfig) -> Served:
    """The model, tokenizer and recipe to serve: from `run=` (a run directory or W&B artifact reference)
    or from a `model=` option as it is."""
    import torch

    from tunelab.evaluation.evaluate import decoding_settings
    from tunelab.models.load import for_inference, load_run, load_tokenizer
    from tunelab.tracking.artifacts import resolve_run

    torch.manual_seed(int(cfg.seed))  # a random-init model option is the same model every launch
    if cfg.get("threads") is not None:  # a batch's matrix products split over the cores (BENCHMARKS.md, "Serving")
        torch.set_num_threads(int(cfg.threads))
    if (cfg.run is None) == (cfg.get("model") is None):
        raise ConfigError("give exactly one of run= and model=", "command line",
                          "tunelab serve run=<run dir>, or tunelab serve model=<option>")
    if cfg.run is not None:
        run_dir = resolve_run(str(cfg.run))
        try:  # trust_remote_code only from this command line, never from the run directory (it is data)
            model, tokenizer, recipe = load_run(run_dir, trust_remote_code=bool(cfg.trust_remote_code))
        except TunelabError:
            raise
        except Exception as err:  # noqa: BLE001 - truncated safetensors, wrong shapes, bad JSON: a damaged model/
            first = (str(err).splitlines() or [""])[0]
            raise CheckpointError(f"cannot load the model in {run_dir / 'model'}: {type(err).__name__}: {first}",
                                  "key run", "the run directory looks damaged; retrain or export it again") from None
        name = run_dir.name if Path(str(cfg.run)).exists() else str(cfg.run).rsplit("/", 1)[-1]
    else:
        from tunelab.config.build import build

        with_trust = OmegaConf.merge(cfg.model, {"trust_remote_code": bool(cfg.trust_remote_code)})
        model = build(with_trust).eval()
        tokenizer = load_tokenizer(str(cfg.model.tokenizer_name_or_path), trust_remote_code=bool(cfg.trust_remote_code),
                                   revision=cfg.model.get("revision"))
        recipe, name = {}, str(cfg.model.name_or_path).rstrip("/").rsplit("/", 1)[-1]
    model = for_inference(model, cfg.get("inference"))
    system_prompt = cfg.system_prompt if cfg.system_prompt is not None else recipe.get("system_prompt")
    return Served(model=model, tokenizer=tokenizer, model_id=str(cfg.served_model_name or name), recipe=recipe,
                  defaults=decoding_settings(OmegaConf.to_container(cfg.decoding, resolve=True)),
                  system_prompt=system_prompt, max_tokens=int(cfg.max_tokens), max_concurrent=int(cfg.max_concurrent),
                  max_waiting=int(cfg.max_waiting), max_request_bytes=int(cfg.max_request_bytes),
                  batching=bool(cfg.batching), max_batch_size=int(cfg.max_batch_size),
                  batch_window_ms=float(cfg.batch_window_ms), prefix_cache=bool(cfg.get("prefix_cache", True)),
                  api_key=_api_key(cfg))


def _check_limits(cfg: DictConfig) -> None:
    for key in ("max_tokens", "max_concurrent", "max_request_bytes"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"{key} must be a whole number of at least 1, got {cfg[key]!r}", f"key {key}")
    if not isinstance(cfg.max_waiting, int) or cfg.max_waiting < 0:
        raise ConfigError(f"max_waiting must be a whole number of at least 0, got {cfg.max_waiting!r}",
                          "key max_waiting")
    if not isinstance(cfg.port, int) or not 0 <= cfg.port <= 65535:
        raise ConfigError(f"port must be 0..65535, got {cfg.port!r}", "key port", "port=0 takes any free port")
    if not isinstance(cfg.batching, bool):
        raise ConfigError(f"batching must be true or false, got {cfg.batching!r}", "key batching")
    if not isinstance(cfg.get("prefix_cache", True), bool):
        raise ConfigError(f"prefix_cache must be true or false, got {cfg.prefix_cache!r}", "key prefix_cache")
    if not isinstance(cfg.max_batch_size, int) or not 1 <= cfg.max_batch_size <= 256:
        raise ConfigError(f"max_batch_size must be a whole number in 1..256, got {cfg.max_batch_size!r}",
                          "key max_batch_size")
    threads = cfg.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 1024):
        raise ConfigError(f"threads must be null or a whole number of at least 1, got {threads!r}", "key threads",
                          "null lets torch choose (OMP_NUM_THREADS, else every core)")
    window = cfg.batch_window_ms
    if isinstance(window, bool) or not isinstance(window, (int, float)) or not 0 <= window <= 1000:
        raise ConfigError(f"batch_window_ms must be a number of milliseconds in 0..1000, got {window!r}",
                          "key batch_window_ms", "5 lets requests that arrive together share a batch")


ENGINES = ("transformers", "vllm")


def _has_cuda_gpu() -> bool:
    """An NVIDIA GPU's device node or driver tool, looked up without importing torch (the pre-flight is fast)."""
    import glob
    import shutil

    return bool(glob.glob("/dev/nvidia[0-9]*")) or shutil.which("nvidia-smi") is not None


def _check_engine(cfg: DictConfig) -> None:
    engine = str(cfg.get("engine", "transformers"))
    if engine not in ENGINES:
        raise ConfigError(f"engine={engine} is not one of {', '.join(ENGINES)}", "key engine",
                          did_you_mean(engine, list(ENGINES)))
    if engine != "vllm":
        return
    import importlib.util

    if not _has_cuda_gpu():
        raise ConfigError("engine=vllm serves on a CUDA GPU, and this machine has none", "key engine",
                          "use engine=transformers on the CPU (batched, see README Deploy); on a GPU machine "
                          "pip install 'tunelab[vllm]'")
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("engine=vllm needs the vllm package, which is not installed", "key engine",
                          "pip install 'tunelab[vllm]' (CUDA only), or engine=transformers")


def check_command_line(cfg: DictConfig) -> None:
    """What needs no model and no heavy import: the limits, the port range, an exposed host without a key.
    The CLI's pre-flight calls it (the verb table's `check`), so a refusal comes before torch is imported."""
    _check_limits(cfg)
    _check_engine(cfg)
    _api_key(cfg)


@verb()
def serve(cfg: DictConfig, run: RunContext) -> None:
    """Bind, load the model, and serve until SIGTERM/SIGINT."""
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"tunelab serve needs {' and '.join(missing)}, which is not installed", "command line",
                          "pip install 'tunelab[serve]' (make installs it)")
    import uvicorn

    check_command_line(cfg)  # again: serve() is also called as a library function, without the pre-flight
    if str(cfg.engine) == "vllm":
        from tunelab.serving.vllm_engine import serve_vllm

        serve_vllm(cfg, _api_key(cfg))
        return
    sock = _bind(str(cfg.host), int(cfg.port))
    try:
        served = load_served(cfg)
    except BaseException:
        sock.close()
        raise
    from tunelab.serving.app import build_app

    app = build_app(served)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:  # SIGTERM/SIGINT: drain, then stop
            app.state.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=int(cfg.graceful_timeout_s),
                            access_log=True, log_config=None)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"tunelab: serving {served.model_id!r} on http://{shown}:{port}/v1 "
          f"(max_tokens {served.max_tokens}, {served.max_concurrent} at once, "
          f"{f'batches of up to {served.max_batch_size}' if served.batching else 'no batching'})", flush=True)
    Server(config).run(sockets=[sock])


if __name__ == "__main__":
    from tunelab.cli import run_verb

    run_verb("serve")
