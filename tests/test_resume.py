"""Checkpoint files and `resume=`: atomic writes and completion markers, a full disk, incomplete checkpoints
skipped with a note, every bad `resume=` a one-line checkpoint error (exit 4), another model's or method's
checkpoint refused with what differs, time-based checkpoints with keep-last pruning, and two jobs aimed at
one run directory (the second is refused, exit 2)."""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import make_cfg
from forkrun import fork_tunelab, wait_for
from procs import budget
from tunelab.checkpoint.io import CheckpointInfo, complete_checkpoints, marker_path, save_atomic
from tunelab.checkpoint.resume import Resume, find_resume, identity
from tunelab.errors import CheckpointError, ConfigError


def _checkpoint(step: int, ident: dict | None = None) -> dict:
    return {"global_step": step, "epoch": 0, "state_dict": {"model.w": torch.full((3, 2), float(step))},
            "tunelab": {"identity": ident or {}, "step_boundary": True, "resumable": True}}


@pytest.fixture(scope="module")
def identities() -> dict[str, dict]:
    return {name: identity(make_cfg(Path("/nonexistent"), overrides))
            for name, overrides in {"full": [], "lora": ["method=lora"], "moe": ["model=tiny_moe"]}.items()}


def test_atomic_save_writes_checkpoint_then_marker(tmp_path):
    path = tmp_path / "checkpoints" / "step3.ckpt"
    save_atomic(_checkpoint(3), path)
    marker = json.loads(marker_path(path).read_text())
    assert marker["bytes"] == path.stat().st_size and marker["step"] == 3
    assert torch.load(path, weights_only=True)["global_step"] == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["step3.ckpt", "step3.ckpt.done"]


def test_a_full_disk_is_a_checkpoint_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    save_atomic(_checkpoint(2), path)
    before = path.read_bytes()

    def save_half_then_fail(obj, file):  # what a filling disk does: some bytes land, then ENOSPC
        file.write(b"PK\x03\x04" + b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(CheckpointError) as err:
        save_atomic(_checkpoint(4), path)
    assert err.value.exit_code == 4 and "No space left on device" in err.value.message()
    assert str(path) in err.value.message()
    assert path.read_bytes() == before  # the previous checkpoint of that name is untouched and still complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.done"]
    assert complete_checkpoints(tmp_path)[0][0][0]["step"] == 2


def test_incomplete_checkpoints_are_skipped_with_a_note(tmp_path):
    run = tmp_path / "run"
    directory = run / "checkpoints"
    save_atomic(_checkpoint(2), directory / "step2.ckpt")
    save_atomic(_checkpoint(4), directory / "step4.ckpt")
    marker_path(directory / "step4.ckpt").unlink()  # killed between the rename and the marker
    save_atomic(_checkpoint(6), directory / "step6.ckpt")
    with open(directory / "step6.ckpt", "r+b") as file:  # truncated behind the marker's back
        file.truncate(100)
    (directory / ".step8.ckpt.tmp-123").write_bytes(b"PK")  # killed while writing
    found, notes = complete_checkpoints(directory)
    assert [p.name for _, p in found] == ["step2.ckpt"]
    assert len(notes) == 3 and all("skipping" in n for n in notes)
    plan = find_resume(str(run), run)
    assert plan.path == directory / "step2.ckpt" and plan.in_place and len(plan.notes) == 3
    assert find_resume("auto", run).path == directory / "step2.ckpt"
    assert find_resume("auto", tmp_path / "fresh").path is None  # auto in a new directory: start from scratch


BAD = {
    "missing": lambda d: d / "nope.ckpt",
    "empty": lambda d: (d / "empty.ckpt").write_bytes(b"") or d / "empty.ckpt",
    "text": lambda d: (d / "notes.ckpt").write_text("resume from here\n") or d / "notes.ckpt",
    "random bytes": lambda d: (d / "random.ckpt").write_bytes(os.urandom(4096)) or d / "random.ckpt",
    "truncated": lambda d: _truncated(d),
    "a torch file that is not a checkpoint": lambda d: torch.save({"w": torch.ones(2)}, d / "w.pt") or d / "w.pt",
    "a directory": lambda d: (d / "somewhere").mkdir() or d / "somewhere",
    "killed before any checkpoint": lambda d: _killed_early(d),
}


def _truncated(directory: Path) -> Path:
    path = directory / "step2.ckpt"
    save_atomic(_checkpoint(2), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    marker_path(path).unlink()
    return path


def _killed_early(directory: Path) -> Path:
    run = directory / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / ".step2.ckpt.tmp-77").write_bytes(b"PK\x03")
    return run


@pytest.mark.parametrize("kind", list(BAD))
def test_every_bad_resume_is_a_checkpoint_error(tmp_path, kind):
    value = BAD[kind](tmp_path)
    with pytest.raises(CheckpointError) as err:
        find_resume(str(value), tmp_path / "this-run")
    text = err.value.message()
    assert text.startswith("tunelab: checkpoint error: ") and str(value) in text and "\n  hint: " in text
    assert err.value.exit_code == 4


def test_an_empty_resume_is_a_usage_error(tmp_path, monkeypatch):
    """`resume=` (often a shell variable that expanded to nothing) was a ValueError traceback in the CLI's check
    before Hydra starts; find_resume took it for "start fresh". Both are exit 2 now, saying what resume= takes."""
    from tunelab.prelaunch import prepare_run_dir

    monkeypatch.chdir(tmp_path)
    calls = {"prepare_run_dir": lambda: prepare_run_dir(["resume=", f"paths.output_dir={tmp_path}/out"]),
             "find_resume ''": lambda: find_resume("", tmp_path),
             "find_resume '  '": lambda: find_resume("  ", tmp_path)}
    for name, call in calls.items():
        with pytest.raises(ConfigError) as err:
            call()
        assert err.value.exit_code == 2 and "resume=auto|<run dir>|<ckpt>" in err.value.message(), name
    assert not (tmp_path / "out").exists()
    assert find_resume(None, tmp_path).path is None and find_resume("null", tmp_path).path is None  # unset: fresh


@pytest.mark.parametrize(("saved", "here", "differs"), [
    ("lora", "full", "method.peft._target_: 'peft.LoraConfig' in the checkpoint, None here"),
    ("moe", "full", "model.name_or_path: '<assets>/tiny-moe' in the checkpoint, '<assets>/tiny-llama' here"),
])
def test_another_model_or_method_is_refused_saying_what_differs(tmp_path, identities, saved, here, differs):
    save_atomic(_checkpoint(2, identities[saved]), tmp_path / "step2.ckpt")
    assert find_resume(str(tmp_path / "step2.ckpt"), tmp_path, identities[saved]).info.step == 2
    with pytest.raises(CheckpointError) as err:
        find_resume(str(tmp_path / "step2.ckpt"), tmp_path, identities[here])
    assert "is of another model or method" in err.value.message() and differs in err.value.message()


def test_a_foreign_checkpoint_is_checked_tensor_by_tensor():
    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Linear(2, 3)

    plan = Resume(Path("x.ckpt"), CheckpointInfo(Path("x.ckpt"), 1, 0, {}, {"model.weight": (3, 2)}))
    with pytest.raises(CheckpointError, match=r"1 tensors missing \(e.g. model.bias\)"):
        plan.check_tensors(Tiny())
    plan.info.state_shapes = {"model.weight": (3, 2), "model.bias": (3,)}
    plan.check_tensors(Tiny())


def test_bad_resume_on_the_command_line_is_exit_4_before_anything_is_written(tmp_path):
    """The CLI path of the cases above (they share find_resume): a run killed before its first checkpoint."""
    value, log = _killed_early(tmp_path), tmp_path / "cli.log"
    code = fork_tunelab(["logger=none", f"paths.output_dir={tmp_path}/out", f"resume={value}"], log)
    text = log.read_text()
    assert code == 4, text[-2000:]
    assert text.startswith(f"tunelab: checkpoint error: no complete checkpoint in {value}/checkpoints")
    assert "Traceback" not in text and "partial" not in text
    assert not (tmp_path / "out").exists() and not (value / ".hydra" / "config.yaml").exists()  # nothing written


class Pause(pl.Callback):
    """Test-only: after the first optimizer step, say so (`started`) and wait for `release` (bounded)."""

    def __init__(self, started: str, release: str) -> None:
        self.started, self.release = Path(started), Path(release)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 1:
            self.started.touch()
            deadline = time.monotonic() + budget(300)
            while not self.release.exists() and time.monotonic() < deadline:
                time.sleep(0.05)


@pytest.mark.slow
def test_two_jobs_aimed_at_one_run_directory_and_time_based_checkpoints(tmp_path):
    """Job A holds its run directory; job B aimed at it is refused (exit 2) and writes nothing there.
    A's checkpoints: one per step by time (every_minutes tiny), the newest two kept, last.ckpt = the newest,
    each loadable with weights_only=True and holding RNG states, data position and identity."""
    args = ["logger=none", "eval.baseline=false", "eval.test=false", "eval.generate_on_val=false",
            "hyperparams.max_steps=3", "hyperparams.batch_size=4", "eval.max_eval_samples=4",
            "+trainer.limit_val_batches=1", "callbacks.checkpoint.every_n_steps=null",
            "callbacks.checkpoint.every_minutes=1e-9", "callbacks.checkpoint.keep_last=2",
            f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path.parent}/cache", "run_id=shared"]
    run_dir = tmp_path / "runs" / "shared"
    started, release = tmp_path / "started", tmp_path / "release"
    pause = [f"+callbacks.pause._target_={__name__}.Pause", f"+callbacks.pause.started={started}",
             f"+callbacks.pause.release={release}"]
    job_a = fork_tunelab([*args, *pause], tmp_path / "a.log", wait=False)
    deadline = time.monotonic() + budget(300)
    while not started.exists() and time.monotonic() < deadline:
        if os.waitpid(job_a, os.WNOHANG)[0]:
            pytest.fail("job A ended early: " + (tmp_path / "a.log").read_text()[-3000:])
        time.sleep(0.1)
    assert started.exists()
    overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
    code = fork_tunelab([*args, "hyperparams.lr=1e-4"], tmp_path / "b.log")
    text = (tmp_path / "b.log").read_text()
    assert code == 2, text[-2000:]
    assert "tunelab: config error: run directory" in text and "in use by another job (pid" in text
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == overrides  # B wrote nothing into A's directory
    release.touch()
    assert wait_for(job_a) == 0
    assert (run_dir / "metrics.json").is_file(), (tmp_path / "a.log").read_text()[-3000:]

    found, notes = complete_checkpoints(run_dir / "checkpoints")
    names = sorted(p.name for _, p in found)
    assert names == ["last.ckpt", "step2.ckpt", "step3.ckpt"] and not notes, (names, notes)
    assert os.path.samefile(run_dir / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / "step3.ckpt")
    saved = torch.load(run_dir / "checkpoints" / "step3.ckpt", weights_only=True)
    assert saved["global_step"] == 3
    assert set(saved["tunelab"]["rng"]) >= {"torch", "numpy", "python"}
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches": 3}]
    assert saved["tunelab"]["identity"]["method"] == {"peft": None}


# ---- a signal in any phase: exit 143/130 with the resume line, no metrics.json, nothing lost ----------------
SHORT = ["logger=none", "eval.baseline=false", "eval.generate_on_val=false", "hyperparams.batch_size=4",
         "hyperparams.eval_batch_size=8", "eval.max_eval_samples=4", "+trainer.limit_val_batches=1",
         "+trainer.limit_test_batches=1", "callbacks.checkpoint.every_n_steps=2",
         "callbacks.checkpoint.every_minutes=null", "callbacks.progress.refresh_rate=0"]
SIGNALLED = [*SHORT, "hyperparams.max_steps=6", "trainer.val_check_interval=3"]


@pytest.fixture
def unhandled_signals_fail():
    """Before tunelab's handler is armed (or after it is taken away), SIGTERM/SIGINT fail the test instead of
    ending pytest."""
    def fail(signum, frame):
        raise RuntimeError(f"{signal.Signals(signum).name} reached the test process unhandled")

    previous = {s: signal.signal(s, fail) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


def _train_signalled(run_dir: Path, capfd, extra: list[str], args: list[str] = SIGNALLED) -> tuple[int | None, str]:
    from tunelab.verbs.train import train

    with pytest.raises(SystemExit) as stopped:
        train(make_cfg(run_dir, [*args, *extra]))
    return stopped.value.code, capfd.readouterr().err


def _check_interrupted(run_dir: Path, code: int | None, text: str, signum: int, step: int) -> None:
    assert code == 128 + signum, text[-3000:]
    assert f"tunelab: interrupted by {signal.Signals(signum).name} at step {step}" in text, text[-3000:]
    assert f"resume with: tunelab train resume={run_dir}" in text
    assert not (run_dir / "metrics.json").exists()  # not a finished run: a scheduler must not read it as one
    found, _ = complete_checkpoints(run_dir / "checkpoints")
    assert found and found[-1][0]["step"] == step  # nothing trained is lost


def _signal_at(signum: int, where: str, step: int = 0) -> list[str]:
    return ["+callbacks.signal._target_=killpoints.SignalAt", f"+callbacks.signal.signum={int(signum)}",
            f"+callbacks.signal.where={where}", f"+callbacks.signal.step={step}"]


def test_sigterm_in_validation_then_inside_the_resumed_runs_checkpoint_write(tmp_path, capfd, unhandled_signals_fail):
    """Issue 21 item 3: SIGTERM while the resumed run writes a checkpoint that no validation follows (step 4;
    validations at 3 and 6) exited 0: Lightning's own SIGTERM exit won."""
    run_dir = tmp_path / "run"
    code, text = _train_signalled(run_dir, capfd, _signal_at(signal.SIGTERM, "validation", 3))
    _check_interrupted(run_dir, code, text, signal.SIGTERM, 3)  # written mid-validation: step 3 was not due
    code, text = _train_signalled(run_dir, capfd, ["resume=auto", *_signal_at(signal.SIGTERM, "write", 4)])
    _check_interrupted(run_dir, code, text, signal.SIGTERM, 4)


@pytest.mark.parametrize(("signum", "where"), [(signal.SIGINT, "test"), (signal.SIGTERM, "fit_end"),
                                               (signal.SIGTERM, "wandb_finish")])
def test_a_signal_after_training_exits_128_plus_signal(tmp_path, capfd, monkeypatch, unhandled_signals_fail,
                                                       signum, where):
    """The final evaluation, the model export and the loggers' finish: the run is not complete; the final
    checkpoint holds all the training, and the resume line says how to finish it."""
    import tunelab.verbs.train as train_verb

    if where == "wandb_finish":
        close = train_verb.close_loggers

        def signal_then_close(loggers, completed):
            os.kill(os.getpid(), signum)
            close(loggers, completed)

        monkeypatch.setattr(train_verb, "close_loggers", signal_then_close)
    run_dir = tmp_path / "run"
    extra = [] if where == "wandb_finish" else _signal_at(signum, where)
    code, text = _train_signalled(run_dir, capfd, extra)
    _check_interrupted(run_dir, code, text, signum, 6)
    monkeypatch.undo()
    train_verb.train(make_cfg(run_dir, [*SIGNALLED, "resume=auto"]))  # the resume line finishes it: nothing to train
    assert json.loads((run_dir / "metrics.json").read_text())["test/loss"] > 0


def test_a_resumed_run_keeps_one_best_checkpoint(tmp_path):
    """Issue 21 item 8: the step-4 checkpoint is written before the validation at step 4 writes best-step4, so a
    run resumed from it did not know that file and left it beside its own newer best."""
    from tunelab.verbs.train import train

    run_dir = tmp_path / "run"
    common = [*SHORT, "trainer.val_check_interval=2", "eval.test=false"]
    train(make_cfg(run_dir, [*common, "hyperparams.max_steps=4"]))
    assert len(list((run_dir / "checkpoints").glob("best-*.ckpt"))) == 1
    train(make_cfg(run_dir, [*common, "hyperparams.max_steps=6", "resume=auto"]))
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    best = min(rows, key=lambda row: row["val/loss"])["step"]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("best-*.ckpt")) == [f"best-step{best}.ckpt"], rows


def test_a_validation_interrupted_at_a_checkpointed_step_is_in_the_resumed_runs_history(tmp_path, capfd,
                                                                                       unhandled_signals_fail):
    """Issue 21 item 8: the step-4 checkpoint comes before the validation at step 4; interrupted there, the run
    resumes at step 4, where Lightning does not validate again: history.jsonl had no line for step 4."""
    from tunelab.verbs.train import train

    run_dir = tmp_path / "run"
    common = [*SHORT, "trainer.val_check_interval=2", "eval.test=false", "hyperparams.max_steps=6"]
    code, text = _train_signalled(run_dir, capfd, _signal_at(signal.SIGTERM, "validation", 4), common)
    _check_interrupted(run_dir, code, text, signal.SIGTERM, 4)
    train(make_cfg(run_dir, [*common, "resume=auto"]))
    train(make_cfg(tmp_path / "straight", common))
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4, 6]
    assert rows == [json.loads(line) for line in (tmp_path / "straight" / "history.jsonl").read_text().splitlines()]
    resumed, straight = (load_file(d / "model" / "model.safetensors") for d in (run_dir, tmp_path / "straight"))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)  # validating first changed no training
