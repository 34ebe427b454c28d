"""The command line answers without heavy imports: `_target_` signatures come from a cache keyed by the
code's version, and --cfg/--help never import the verb module. Timings live in bench/cli_latency.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from procs import budget, run
from tunelab.config.signatures import Signatures

PREFLIGHT = ("from tunelab.cli import preflight; preflight(['hyperparams.lr=1e-3'], deep=False); import sys; "
             "print(sorted(m for m in ('torch', 'transformers', 'peft', 'pytorch_lightning') if m in sys.modules))")


def _env(tmp_path) -> dict[str, str]:
    return {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


def test_validation_imports_no_framework_once_signatures_are_cached(tmp_path):
    env = _env(tmp_path)
    first = run([sys.executable, "-c", PREFLIGHT], 300, env=env)
    assert first.returncode == 0, first.stderr
    assert "torch" in first.stdout  # a cold cache imports the targets, as validation always did
    second = run([sys.executable, "-c", PREFLIGHT], 300, env=env)
    assert second.stdout.strip() == "[]", second.stdout + second.stderr
    # --cfg job composes, validates and prints without importing the training stack.
    shown = subprocess.run([sys.executable, "-X", "importtime", "-m", "tunelab.cli", "train", "--cfg", "job"],
                           env=env, capture_output=True, text=True, timeout=budget(300))
    assert shown.returncode == 0 and "task_name: train" in shown.stdout
    imported = {line.split("|")[-1].strip() for line in shown.stderr.splitlines() if line.startswith("import time")}
    assert not imported & {"torch", "pytorch_lightning", "transformers", "peft"}


def test_a_verb_that_trains_nothing_imports_no_framework(tmp_path):
    """The CLI's path to a verb (pre-flight, tunelab.prelaunch, resume checks) loads no torch or Lightning itself:
    `sweep-report` answers in about a second, where Lightning alone once took 6 s of every verb's start."""
    shown = subprocess.run([sys.executable, "-X", "importtime", "-m", "tunelab.cli", "sweep-report",
                            str(tmp_path / "nope")], env=_env(tmp_path), capture_output=True, text=True,
                           timeout=budget(300))
    assert shown.returncode == 2 and "tunelab: usage error: no multirun directory" in shown.stderr, shown.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in shown.stderr.splitlines() if line.startswith("import time")}
    assert not imported & {"torch", "pytorch_lightning", "transformers", "peft"}


def test_a_stale_or_damaged_cache_is_never_trusted(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    file = tmp_path / "tunelab" / "signatures-v1.json"
    file.parent.mkdir(parents=True)
    # An entry written for another version of the code (say, before a parameter was added) is refreshed.
    file.write_text(json.dumps({"tunelab.evaluation.metrics.exact_match": {"key": "old", "params": ["prediction"]}}))
    signatures = Signatures()
    assert signatures.params("tunelab.evaluation.metrics.exact_match") == ["prediction", "reference", "normalized"]
    signatures.save()
    assert json.loads(file.read_text())["tunelab.evaluation.metrics.exact_match"]["params"][-1] == "normalized"
    file.write_text("{not json")
    assert Signatures().params("torch.optim.AdamW")[:2] == ["params", "lr"]
    assert Signatures().params("tunelab.tracking.loggers.wandb_logger") is None  # **kwargs: any key is accepted
