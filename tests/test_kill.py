"""Kill harness: real processes interrupted at 12 points, each resumed with `resume=auto` in place; each
chain ends bitwise equal (max abs difference 0.0) to an uninterrupted run, for full fine-tuning and LoRA
(dropout 0.05), with gradient accumulation; and two DPO chains (4 more SIGKILLs, full fine-tuning against its frozen
reference copy; 3 more with the reference log-probs cached in the run). 10 SIGKILLs (mid-accumulation, right after a
checkpoint, epoch boundaries, validation, inside checkpoint writes, after training) lose at most the checkpoint
interval; SIGTERM exits 143 and SIGINT 130 after finishing the step and writing a checkpoint (lose nothing).

Runs are real processes (SIGKILL ends one with no cleanup; each exits with its own status) forked from a fork
server that imported torch and Lightning once (tests/forkrun.py), so they are not imported again per run; the
SIGTERM run goes through the installed `tunelab` console script, so its exit status is the interpreter's own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from forkrun import fork_tunelab
from procs import budget
from tunelab.checkpoint.io import complete_checkpoints

pytestmark = pytest.mark.slow

EVERY = 2  # callbacks.checkpoint.every_n_steps: what any interruption may lose, in optimizer steps
# 7 micro-batches of 2 per epoch, 2 per optimizer step -> 4 steps per epoch (the last one a single
# micro-batch), 3 epochs, 12 steps, a validation after each epoch.
COMMON = ["eval.baseline=false", "eval.test=false", "eval.generate_on_val=false", "logger=none",
          "+trainer.limit_train_batches=7", "+trainer.limit_val_batches=1", "hyperparams.batch_size=2",
          "hyperparams.eval_batch_size=8", "eval.max_eval_samples=8", "hyperparams.accumulate_grad_batches=2",
          "hyperparams.epochs=3", f"callbacks.checkpoint.every_n_steps={EVERY}",
          "callbacks.checkpoint.every_minutes=null", "callbacks.progress.refresh_rate=0"]
WEIGHTS = {"full": "model.safetensors", "lora": "adapter_model.safetensors",  # LoRA with its default dropout 0.05
           "dpo": "model.safetensors", "dpo_cached": "model.safetensors"}
# Each chain's run: its method, and for `dpo` the preference objective on the bundled pairs (full fine-tuning, so
# the reference is the frozen copy a resumed run must take again from the starting weights, not the restored ones).
# The DPO chains keep 16 of the 2,000 train pairs (7 micro-batches of 2 are drawn from them each epoch) and
# eval.max_eval_samples=8 of validation and test: the cached reference pass scores those 32 pairs, not 2,016
# (dpo_cached was 187 s of the suite's longest test, most of it that pass, once per process started before the
# cache existed).
DPO = ["method=full", "objective=dpo", "dataset=brand_replies", "objective.beta=0.5", "dataset.source.train_size=16"]
RUNS = {"full": ["method=full"], "lora": ["method=lora"], "dpo": DPO,
        # reference log-probs cached in the run before training: a resumed run reads them back (or, killed before
        # they were written, computes them again from the starting weights)
        "dpo_cached": [*DPO, "objective.reference=cached"]}
# Each entry interrupts one process of the chain; the next one resumes with resume=auto.
# ("kill", where, step, epoch, micro): SIGKILL at that point (see killpoints.KillAt).
# ("signal", signum, step, exit code): the signal in the 2nd micro-batch of `step`; the step finishes first.
CHAINS = {
    "full": [("kill", "batch_start", 1, 0, 1),    # mid-accumulation, before any checkpoint exists
             ("kill", "write_tmp", 4, 0, 0),      # step-4 checkpoint bytes written, not yet renamed
             ("kill", "epoch_start", 0, 1, 0),    # epoch boundary: epoch 1 starting, after epoch 0's validation
             ("kill", "write_marker", 6, 0, 0),   # step-6 checkpoint renamed, its completion marker not yet written
             ("kill", "validation", 0, 1, 0),     # inside epoch 1's validation
             ("signal", signal.SIGTERM, 9, 143)],  # through the real console script: step 10 finishes, exit 143
    "lora": [("kill", "batch_end", 2, 0, 0),      # right after the step-2 checkpoint
             ("signal", signal.SIGINT, 2, 130),   # Ctrl-C mid-accumulation: step 3 finishes, a checkpoint, exit 130
             ("kill", "epoch_start", 0, 2, 0),    # epoch boundary: epoch 2 starting
             ("kill", "batch_start", 9, 0, 1),    # mid-accumulation in epoch 2
             ("kill", "write_tmp", 10, 0, 0),     # inside the step-10 checkpoint write
             ("kill", "train_end", 0, 0, 0)],     # after training, before export: the final checkpoint carries it
    "dpo": [("kill", "batch_start", 1, 0, 1),     # mid-accumulation, before any checkpoint exists
            ("kill", "epoch_start", 0, 1, 0),     # epoch boundary
            ("kill", "write_tmp", 8, 0, 0),       # inside the step-8 checkpoint write
            ("kill", "batch_start", 9, 0, 1)],    # mid-accumulation in epoch 2
    "dpo_cached": [("kill", "batch_start", 1, 0, 1),  # the cache written, no checkpoint yet
                   ("kill", "write_tmp", 4, 0, 0),    # inside the step-4 checkpoint write
                   ("kill", "batch_start", 9, 0, 1)],  # mid-accumulation in epoch 2
}


def run_args(tmp: Path, chain: str, name: str) -> list[str]:
    return [*COMMON, *RUNS[chain], f"paths.output_dir={tmp}", f"paths.cache_dir={tmp.parent}/cache",
            f"run_id={name}"]


def weights(run_dir: Path, method: str) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model" / WEIGHTS[method])


def max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Callable[[str], dict[str, torch.Tensor]]:
    """The uninterrupted run of a chain, made when a test first asks for it (`-k dpo` runs only DPO's)."""
    import peft  # noqa: F401 - imported once here rather than in every forked run
    import transformers.modeling_utils  # noqa: F401

    import tunelab.verbs.train  # noqa: F401

    tmp = tmp_path_factory.mktemp("reference")
    out: dict[str, dict[str, torch.Tensor]] = {}

    def get(method: str) -> dict[str, torch.Tensor]:
        if method not in out:
            log = tmp / f"{method}.log"
            code = fork_tunelab(run_args(tmp, method, method), log)
            assert code == 0, log.read_text()[-3000:]
            out[method] = weights(tmp / "runs" / method, method)
        return out[method]

    return get


def run_console_script(args: list[str], log: Path) -> int:
    """`tunelab train args` as a user runs it: a new interpreter through the installed console script."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    with log.open("w") as out:
        return subprocess.run([str(Path(sys.executable).with_name("tunelab")), "train", *args], stdout=out,
                              stderr=subprocess.STDOUT, timeout=budget(600), env=env).returncode


@pytest.mark.parametrize("method", ["full", "lora"])  # the DPO chains: test_kill_dpo.py, run beside these
def test_interrupt_anywhere_then_resume_ends_bitwise_equal(tmp_path, reference, method):
    run_dir = tmp_path / "runs" / "chain"
    record = tmp_path / "killed.txt"
    base = run_args(tmp_path, method, "chain")
    for number, (kind, *point) in enumerate(CHAINS[method]):
        resume = ["resume=auto"] if number else []  # run_id=chain pins the directory, as a requeued job would
        log = tmp_path / f"run{number}.log"
        if kind == "kill":
            where, step, epoch, micro = point
            code = fork_tunelab([*base, *resume, "+callbacks.kill._target_=killpoints.KillAt",
                                 f"+callbacks.kill.where={where}", f"+callbacks.kill.step={step}",
                                 f"+callbacks.kill.epoch={epoch}", f"+callbacks.kill.micro={micro}",
                                 f"+callbacks.kill.record={record}"], log)
            assert code == -signal.SIGKILL, (where, code, log.read_text()[-3000:])
            killed_at = int(record.read_text().splitlines()[-1].split()[1])
        else:
            signum, step, expected = point
            args = [*base, *resume, "+callbacks.signal._target_=killpoints.SignalAt",
                    f"+callbacks.signal.signum={int(signum)}", f"+callbacks.signal.step={step}"]
            code = (run_console_script if signum == signal.SIGTERM else fork_tunelab)(args, log)
            text = log.read_text()
            assert code == expected, text[-3000:]
            killed_at = step + 1  # the step in progress when the signal came finishes first
            assert f"tunelab: interrupted by {signal.Signals(signum).name} at step {killed_at}" in text
            assert f"resume={run_dir}" in text and "Traceback" not in text  # says how to resume
            assert not (run_dir / "metrics.json").exists()  # not a finished run
        found, notes = complete_checkpoints(run_dir / "checkpoints")
        saved = found[-1][0]["step"] if found else 0
        assert killed_at - saved <= (0 if kind == "signal" else EVERY), (point, killed_at, saved)
        if kind == "kill" and point[0].startswith("write"):
            assert any(f"step{point[1]}.ckpt" in note for note in notes), notes  # a torn write never counts
    log = tmp_path / "final.log"
    code = fork_tunelab([*base, "resume=auto"], log)
    assert code == 0, log.read_text()[-3000:]
    text = "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.log")))
    assert "skipping" in text and "Traceback" not in text
    if method == "dpo_cached":  # resumed runs read the first run's log-probs; none found them stale
        assert "reference log-probs of" in text and " read from " in text and "computing them again" not in text
    assert max_abs_difference(weights(run_dir, method), reference(method)) == 0.0
