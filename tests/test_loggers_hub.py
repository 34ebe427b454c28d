"""logger=tensorboard and logger=mlflow record what logger=wandb records; `tunelab export push_to_hub=<repo>` uploads
the export through huggingface_hub, and is refused offline with one line before the model loads."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra.core.global_hydra import GlobalHydra

from conftest import make_cfg
from procs import budget
from tunelab.cli import preflight
from tunelab.config import machine
from tunelab.config.compose import compose
from tunelab.errors import ConfigError
from tunelab.tracking.wandb_log import records

# Every figure reaches the loggers: train/* from the first step (log_every_n_steps=1), the baseline, val and test.
FAST = ["hyperparams.max_steps=3", "trainer.log_every_n_steps=1", "eval.max_eval_samples=4",
        "eval.generate_on_val=false", "callbacks.progress.refresh_rate=0"]
# W&B's own bookkeeping (_step, _runtime, _timestamp) and the step axis WandbLogger adds to each row.
WANDB_ONLY = {"trainer/global_step"}


def _wandb_keys(run: Path) -> set[str]:
    (file,) = run.glob("wandb/offline-run-*/*.wandb")
    keys: set[str] = set()
    for record in records(file):
        if record.WhichOneof("record_type") == "history":
            keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
    return {k for k in keys if not k.startswith("_")} - WANDB_ONLY


def _tensorboard_keys(run: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return set(events.Tags()["scalars"])


def _mlflow_keys(run: Path) -> set[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"file:{run}/mlruns")
    (found,) = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    return set(found.data.metrics)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    from tunelab.verbs.train import train

    done = {}
    for name, logger in (("wandb", "logger=wandb"), ("others", "logger=[tensorboard,mlflow]")):
        run = tmp_path_factory.mktemp(name)
        train(make_cfg(run, [logger, *FAST]))
        done[name] = run
    return done


@pytest.mark.slow  # two short trainings of the tiny model
def test_tensorboard_and_mlflow_hold_the_metric_keys_of_wandb(runs, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # reading the run's file store, as the logger wrote it
    wandb = _wandb_keys(runs["wandb"])
    assert {"train/loss", "train/pad_fraction", "val/loss", "test/loss", "baseline/test/loss"} <= wandb, wandb
    assert _tensorboard_keys(runs["others"]) == wandb
    assert _mlflow_keys(runs["others"]) == wandb
    assert (runs["others"] / "mlruns").is_dir() and not (Path.cwd() / "mlruns").exists()  # under the run dir


# ---- push_to_hub -------------------------------------------------------------------------------------------------
@pytest.fixture
def reachable_hub(monkeypatch):
    """A hub endpoint that accepts connections (a real local socket): the pre-flight's probe finds it online."""
    from huggingface_hub import constants

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(machine, "_probed", {})
    yield
    server.close()


@pytest.mark.slow  # a short training, then the export
def test_export_pushes_the_exported_folder(runs, tmp_path, reachable_hub, monkeypatch, capsys):
    """huggingface_hub's two calls are the boundary: create_repo, then upload_folder of the exported directory."""
    from huggingface_hub import HfApi

    from tunelab.verbs.export import export

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        assert (Path(kwargs["folder_path"]) / "model.safetensors").is_file()  # uploaded after the export is written
        return SimpleNamespace(commit_url=f"hub://{kwargs['repo_id']}/commit/1")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = tmp_path / "exported"
    cfg = compose([f"run={runs['wandb']}", f"out={out}", "push_to_hub=me/tiny-reviews"], "export",
                  return_hydra_config=False)
    GlobalHydra.instance().clear()
    export(cfg)
    assert [(c[0], c[1]) for c in calls] == [("create_repo", "me/tiny-reviews"), ("upload_folder", "me/tiny-reviews")]
    assert calls[0][2]["private"] is True and calls[0][2]["exist_ok"] is True
    assert Path(calls[1][2]["folder_path"]) == out
    assert "pushed" in capsys.readouterr().out


def test_push_is_refused_offline_and_a_bad_repo_id_at_once(tmp_path):
    with pytest.raises(ConfigError) as err:  # conftest sets HF_HUB_OFFLINE=1
        preflight([f"run={tmp_path}", "push_to_hub=me/tiny"], "export", check="tunelab.tracking.hub:check_push")
    assert err.value.exit_code == 2 and "push_to_hub=me/tiny needs the Hugging Face Hub" in err.value.message()
    with pytest.raises(ConfigError, match="is not a hub repository id"):
        preflight([f"run={tmp_path}", "push_to_hub='a b/c'"], "export", check="tunelab.tracking.hub:check_push")


def test_push_offline_on_the_command_line_is_one_line_exit_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "tunelab.cli", "export", f"run={tmp_path}", "push_to_hub=me/tiny"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=budget(120))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith("tunelab: config error: push_to_hub=me/tiny needs the Hugging Face Hub, and "
                               "HF_HUB_OFFLINE is set"), out.stderr
    assert len(lines) == 2 and lines[1].lstrip().startswith("hint: export without push_to_hub"), out.stderr
