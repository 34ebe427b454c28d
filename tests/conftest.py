"""Shared fixtures: offline, no W&B server, every run writes under a temporary directory.

Order: every test passes alone and in any order. `--shuffle-seed N` runs the files, and the tests within
each file, in an order drawn from N (no plugin needed); after each test the process state a test can leave
behind (environment, working directory, Hydra's globals, torch defaults, signal handlers) is put back as it
was and named in the summary, so no test depends on what an earlier one happened to leave.
"""

from __future__ import annotations

import os
import random
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from omegaconf import DictConfig, open_dict

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]


# The tokenised-data cache the configs of make_cfg share in a test session (set by `shared_data_cache`). Its
# entries are keyed by the data's content hash, tokenizer, template and lengths, so sharing it changes no run;
# it spares each in-process run encoding its dataset again (reviews_sentiment: 3.4 s of CPU, brand_replies 6.9 s).
SHARED_CACHE: Path | None = None


def make_cfg(tmp_path: Path, overrides: list[str] | None = None) -> DictConfig:
    """A composed train config whose run directory is `tmp_path`, ready for `train(cfg)` (no Hydra globals).
    Its `paths.cache_dir` is the session's SHARED_CACHE unless `overrides` name one (the last one given wins)."""
    from tunelab.config.compose import compose

    shared = [f"paths.cache_dir={SHARED_CACHE}"] if SHARED_CACHE else []
    cfg = compose(shared + list(overrides or []) + [f"paths.output_dir={tmp_path}"])
    with open_dict(cfg):
        cfg.paths.run_dir = str(tmp_path)
    return cfg


def shared_cache() -> str:
    """`paths.cache_dir=` the session's SHARED_CACHE, for a `tunelab` child process (a sweep's trials, a DDP rank): it
    reads the encoding an earlier run of the session wrote instead of encoding again in each new process."""
    assert SHARED_CACHE is not None, "set for the session by the shared_data_cache fixture"
    return f"paths.cache_dir={SHARED_CACHE}"


@pytest.fixture(scope="session", autouse=True)
def shared_data_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One tokenised-data cache for the session's make_cfg runs (one per xdist worker: its own base temp dir)."""
    global SHARED_CACHE
    SHARED_CACHE = tmp_path_factory.getbasetemp() / "data-cache"
    yield SHARED_CACHE
    SHARED_CACHE = None


@pytest.fixture
def cfg_factory(tmp_path: Path):
    return lambda overrides=None: make_cfg(tmp_path, overrides)


def fmt(name: str) -> dict:
    """A built-in dataset format's config node (conf/dataset/format/<name>.yaml), for hand-written task configs."""
    return {"_target_": f"tunelab.data.formats.{name}", "_partial_": True}


# ---- any order: --shuffle-seed, and the process state each test leaves restored -------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--shuffle-seed", type=int, default=None, metavar="N",
                     help="run the test files, and the tests within each file, in a random order drawn from N")


# The longest files, longest first: each file's seconds in one `make test` (2026-12-07, 2 cores): sweeps 222,
# fuzz_property 162, generate_export 127, serve 108, kill 99, fast 87, train 69, config 68, scale 66, eval 64,
# kill_dpo 58, pipeline 56, preference 43, resume 41. Under `--dist loadfile --no-loadscope-reorder` (Makefile) a
# process that is free takes the next file in this order; xdist's own order (most tests first) left the few-test,
# long files (kill, kill_dpo) for last. Longest first, the two processes end within seconds of each other (replayed
# from that run's test durations: 913 s -> 867 s). Unlisted files follow, most tests first.
LONGEST_FIRST = tuple(f"tests/test_{name}.py" for name in (
    "sweeps", "fuzz_property", "generate_export", "serve", "kill", "fast", "train", "config", "scale", "eval",
    "kill_dpo", "pipeline", "preference", "resume"))


def _file_order(items: list[pytest.Item]) -> list[pytest.Item]:
    files: dict[str, list[pytest.Item]] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::")[0], []).append(item)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    order = sorted(files, key=lambda name: (rank.get(name, len(rank)), -len(files[name])))
    return [item for name in order for item in files[name]]


@pytest.hookimpl(tryfirst=True)  # before pytest regroups tests that share a parametrised module fixture
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seed = config.getoption("shuffle_seed")
    if seed is None:
        items[:] = _file_order(items)
        return
    rng = random.Random(seed)  # the same seed gives every xdist worker the same order, as xdist requires
    files: dict[str, list[pytest.Item]] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::")[0], []).append(item)
    order = list(files)
    rng.shuffle(order)  # files stay whole: under `--dist loadfile` a file runs in one process, in this order
    for name in order:
        rng.shuffle(files[name])
    items[:] = [item for name in order for item in files[name]]


def pytest_report_header(config: pytest.Config) -> str | None:
    seed = config.getoption("shuffle_seed")
    return None if seed is None else f"shuffled order: --shuffle-seed {seed}"


SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Set once per process by a library, on import (lightning_fabric: NVML-based CUDA checks, so no CUDA context before
# a fork) or on first use (torch inductor's cache dir): a test run alone sets them too, so they stay.
LIBRARY_ENV = ("PYTORCH_NVML_BASED_CUDA_CHECK", "TORCHINDUCTOR_CACHE_DIR")
LEFT_BEHIND: dict[str, list[str]] = {}  # test id -> the state it changed (restored after it)


def _state() -> dict[str, object]:
    """What one test could change for the next: read only from modules already imported (no import cost)."""
    env = {key: value for key, value in os.environ.items() if key not in LIBRARY_ENV}
    state: dict[str, object] = {"env": env, "cwd": os.getcwd()}
    state.update({f"signal {signal.Signals(s).name}": signal.getsignal(s) for s in SIGNALS})
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        state.update({"torch default dtype": torch.get_default_dtype(), "torch threads": torch.get_num_threads(),
                      "torch grad enabled": torch.is_grad_enabled()})
    if "hydra.core.global_hydra" in sys.modules:
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.hydra_config import HydraConfig

        state["Hydra initialised"] = GlobalHydra.instance().is_initialized()
        state["HydraConfig set"] = HydraConfig.initialized()
    return state


def _restore(before: dict[str, object], changed: list[str]) -> None:
    for key in changed:
        value = before.get(key)
        if key == "env":
            kept = {name: os.environ[name] for name in LIBRARY_ENV if name in os.environ}
            os.environ.clear()
            os.environ.update({**value, **kept})
        elif key == "cwd":
            os.chdir(value)
        elif key.startswith("signal "):
            signal.signal(signal.Signals[key.split()[1]], value)
        elif key.startswith("torch "):
            torch = sys.modules["torch"]
            {"torch default dtype": torch.set_default_dtype, "torch threads": torch.set_num_threads,
             "torch grad enabled": torch.set_grad_enabled}[key](value)
        elif key == "Hydra initialised":
            from hydra.core.global_hydra import GlobalHydra

            GlobalHydra.instance().clear()
        elif key == "HydraConfig set":
            from hydra.core.hydra_config import HydraConfig

            HydraConfig.instance().cfg = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Setup, call and teardown of one test (module fixtures built for it included), then its leftovers undone."""
    before = _state()
    try:
        return (yield)
    finally:
        after = _state()
        changed = [key for key in after if key in before and after[key] != before[key]]
        if changed:
            env = before["env"], after["env"]
            LEFT_BEHIND[item.nodeid] = [key if key != "env" else "env " + ",".join(
                sorted(k for k in env[0].keys() | env[1].keys() if env[0].get(k) != env[1].get(k))) for key in changed]
            _restore(before, changed)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not LEFT_BEHIND:
        return
    tests: dict[str, list[str]] = {}  # what was left -> the tests that left it (in-process training: Lightning's seed)
    for nodeid, keys in LEFT_BEHIND.items():
        tests.setdefault("; ".join(keys), []).append(nodeid)
    terminalreporter.section("process state left by a test (restored before the next)")
    for left, nodeids in tests.items():
        more = f" and {len(nodeids) - 1} more" if len(nodeids) > 1 else ""
        terminalreporter.write_line(f"{left}: {nodeids[0]}{more}")
