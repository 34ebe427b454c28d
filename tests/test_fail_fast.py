"""Mistakes this machine can answer at once are refused before the slow part of a job: a hub model that cannot be
fetched (no network, or HF_HUB_OFFLINE, and not cached), a GPU the machine lacks, serve's exposed host without a key.

Each refusal is one `tunelab: config error:` message, exit 2, and comes before torch, Lightning and transformers are
imported (what made them take 8 to 53 s on an idle machine). The time is recorded and checked against a budget that
scales with the machine's load (tests/procs.py); the imports left out are the assertion that holds on any machine.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest

from procs import budget, run_all
from tunelab.cli import preflight
from tunelab.config import machine
from tunelab.config.compose import compose
from tunelab.errors import ConfigError

HEAVY = ("peft", "pytorch_lightning", "torch", "transformers")
# The console script, timed from its first line to its exit, reporting which heavy modules it had imported by then.
TIMED_CLI = f"""import runpy, sys, time
start = time.monotonic()
try:
    sys.argv = ["tunelab", *sys.argv[1:]]
    runpy.run_module("tunelab.cli", run_name="__main__")
finally:
    heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
    print(f"TIMING {{time.monotonic() - start:.2f}} {{heavy}}", file=sys.stderr)
"""


def _closed_port() -> int:
    """A local port nothing listens on: a hub endpoint that refuses every connection, on any machine."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _no_cuda() -> bool:
    return machine._cuda_devices() == 0


CASES = {
    # No HF_HUB_OFFLINE: the one probe finds no hub, and the model is not in the (empty) cache.
    "hub_unreachable": (["train", "model=qwen2.5-0.5b-instruct"], {"HF_HUB_OFFLINE": None},
                        ["cannot load 'Qwen/Qwen2.5-0.5B-Instruct'", "the hub cannot be reached",
                         "key model.name_or_path", "model=tiny"]),
    "gpu_on_cpu": (["train", "trainer=gpu"], {}, ["trainer.accelerator=gpu asks for a GPU", "use trainer=cpu"]),
    "serve_exposed": (["serve", "model=tiny", "host=0.0.0.0"], {"TUNELAB_API_KEY": None},
                      ["host=0.0.0.0 would expose the model", "TUNELAB_API_KEY"]),
}


@pytest.fixture(scope="module")
def refusals(tmp_path_factory) -> dict[str, tuple[str, float, set[str]]]:
    root = tmp_path_factory.mktemp("fail_fast")
    cache = root / "xdg"
    # The `_target_` signatures every command line reads are cached on disk once per code version; a user's second
    # command finds them there. Filled here in this process, so the timed children see what a user's would.
    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    try:
        for config in ("train", "serve"):
            preflight(["model=tiny"], config, deep=False)
    finally:
        os.environ.pop("XDG_CACHE_HOME") if saved is None else os.environ.__setitem__("XDG_CACHE_HOME", saved)
    base = {**os.environ, "XDG_CACHE_HOME": str(cache), "HF_HOME": str(root / "hf"), "OMP_NUM_THREADS": "1",
            "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    commands = {}
    for name, (argv, env, _) in CASES.items():
        merged = {**base, **env}
        child_env = {k: v for k, v in merged.items() if v is not None}
        out = root / name
        out.mkdir()
        commands[name] = ([sys.executable, "-c", TIMED_CLI, *argv, f"paths.output_dir={out}"],
                          {"cwd": out, "env": child_env})
    started = time.monotonic()
    done = run_all(commands, seconds=120, workers=1)  # one at a time: each timing is its own
    results = {}
    for name, proc in done.items():
        lines = proc.stderr.strip().splitlines()
        timing = next(line for line in lines if line.startswith("TIMING"))
        _, seconds, *heavy = timing.split(" ", 2)
        message = "\n".join(line for line in lines if not line.startswith("TIMING"))
        results[name] = (proc.returncode, message, float(seconds), heavy[0] if heavy else "")
    print(f"fail-fast refusals (wall {time.monotonic() - started:.1f} s, load {os.getloadavg()[0]:.1f}): "
          + ", ".join(f"{n} {r[2]:.1f} s" for n, r in results.items()))
    return results


@pytest.mark.slow  # three console scripts, one at a time: about 10 s idle, a minute at load 12 on 2 cores
@pytest.mark.parametrize("name", list(CASES))
def test_refused_before_the_heavy_imports(name, refusals):
    if name == "gpu_on_cpu" and not _no_cuda():
        pytest.skip("this machine has a CUDA GPU: trainer=gpu is not a mistake here")
    code, message, seconds, heavy = refusals[name]
    assert code == 2, message
    assert message.startswith("tunelab: config error: ") and "Traceback" not in message, message
    assert len(message.splitlines()) == 2 and message.splitlines()[1].lstrip().startswith("hint: "), message
    for needed in CASES[name][2]:
        assert needed in message, f"{needed!r} not in {message}"
    assert heavy == "[]", f"{name} imported {heavy} before refusing"
    assert seconds < budget(15), f"{name} took {seconds:.1f} s"  # idle: about 1-2 s (README, BENCHMARKS.md)


def _fake_cached(hub_cache: Path, repo_id: str) -> None:
    """A model in huggingface_hub's cache layout, as a download leaves it (refs/main -> snapshots/<commit>)."""
    folder = hub_cache / f"models--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "tokenizer_config.json"):
        (snapshot / name).write_text("{}")


def test_unreachable_hub_with_a_cached_model_goes_on_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(machine, "_probed", {})
    _fake_cached(tmp_path, "org/cached-model")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    machine.check_hub_ids(compose(["model.name_or_path=org/cached-model", "model.random_init=false"]))
    assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE is True  # the loaders: cache only
    with pytest.raises(ConfigError, match="'org/other-model': it is not in the local cache and HF_HUB_OFFLINE"):
        machine.check_hub_ids(compose(["model.name_or_path=org/other-model", "model.random_init=false"]))
    # A local directory is never a hub id; the probe ran once for the whole process.
    machine.check_hub_ids(compose([f"model.name_or_path={tmp_path}", "model.random_init=false"]))
    assert list(machine._probed.values()) == [False]


def test_a_cluster_launcher_is_not_judged_by_the_submitting_machine():
    """SLURM runs the job on GPU nodes: a CPU login node must not refuse trainer=gpu (nor a model it has not cached)."""
    machine.check_machine(compose(["hydra/launcher=slurm", "trainer=gpu", "model=qwen2.5-0.5b-instruct"]))
    if _no_cuda():
        with pytest.raises(ConfigError, match="trainer.accelerator=gpu asks for 2 GPUs"):
            machine.check_machine(compose(["trainer=gpu", "trainer.devices=2"]))
