"""The verb table and the job around every verb: each verb is a plain `(cfg, run)` function with a primary
config; a new verb is a function, a config and one table entry; the job's prologue masks the saved configs."""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import REPO
from tunelab import cli, paths
from tunelab.config.compose import compose
from tunelab.errors import ConfigError
from tunelab.job import Needs, RunContext, needs_of, sweeper_value, verb

SECRET = "sk-abcdefghijklmnopqrstuvwxyz0123"


@verb(run_dir=True)
def hello(cfg, run: RunContext) -> dict:
    """A test-local verb: writes one file into its run directory."""
    (run.run_dir / "hello.txt").write_text(f"{cfg.greeting} from {run.run_id}\n")
    return {"greeting": cfg.greeting}


@verb(run_dir=True, sweep_goes_on=True)
def boom(cfg, run: RunContext) -> dict:
    """A test-local verb whose trials fail unless x=0."""
    if cfg.x:
        raise ValueError(f"boom {cfg.x}")
    return {"val/loss": 0.5}


HELLO = ("# A test-local verb's primary config.\ndefaults:\n  - paths: default\n  - hydra: default\n  - _self_\n"
         "task_name: {name}\nrun_id: ${{tunelab_run_id:}}\ngreeting: hi\napi_key: null\nx: 0\n"
         "optimized_metric: val/loss\nhydra:\n  run:\n    dir: ${{paths.output_dir}}/{name}/${{run_id}}\n")


def _run_in_process(monkeypatch, tmp_path: Path, name: str, argv: list[str]) -> None:
    """`tunelab <name> argv` in this process, with real Hydra composition (as the console script runs it)."""
    monkeypatch.setattr(sys, "argv", ["tunelab"])
    monkeypatch.chdir(tmp_path)
    cli.run_verb(name, argv)


@pytest.mark.parametrize("entry", cli.VERBS, ids=[v.name for v in cli.VERBS])
def test_every_verb_is_a_plain_function_with_a_primary_config(entry):
    module, _, name = entry.function.partition(":")
    function = getattr(importlib.import_module(module), name)
    assert list(inspect.signature(function).parameters)[:2] == ["cfg", "run"]
    assert isinstance(needs_of(function), Needs)
    config = paths.conf_dir() / f"{entry.config}.yaml"
    assert config.is_file() and config.read_text().startswith("# "), config  # a one-line header first
    assert "run_id" in compose([], entry.config)  # the CLI pins every verb's run id


def test_the_table_lists_every_verb_module():
    """verbs/ holds verbs only: each of its modules is in the table (the layering test reads verbs/ too)."""
    modules = {p.stem for p in (REPO / "src" / "tunelab" / "verbs").glob("*.py")} - {"__init__"}
    assert modules and modules == {v.module.rsplit(".", 1)[-1] for v in cli.VERBS}


def test_a_new_verb_is_one_function_one_config_and_one_table_entry(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "hello.yaml").write_text(HELLO.format(name="hello"))
    monkeypatch.setattr(cli, "VERBS", (*cli.VERBS, cli.Verb("hello", "test_verbs:hello", "say hello", "hello")))
    _run_in_process(monkeypatch, tmp_path, "hello", ["--config-dir", str(conf), "greeting=bonjour",
                                                     f"paths.output_dir={tmp_path}", f"api_key={SECRET}"])
    (run_dir,) = (tmp_path / "hello").iterdir()
    assert (run_dir / "hello.txt").read_text() == f"bonjour from {run_dir.name}\n"
    saved = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert saved["greeting"] == "bonjour" and saved["api_key"] == "REDACTED"
    assert not [p for p in run_dir.rglob("*") if p.is_file() and SECRET in p.read_text()]
    assert "hello" in cli.usage()  # --help reads the same table


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "boom.yaml").write_text(HELLO.format(name="boom"))
    monkeypatch.setattr(cli, "VERBS", (*cli.VERBS, cli.Verb("boom", "test_verbs:boom", "fail", "boom")))
    _run_in_process(monkeypatch, tmp_path, "boom", ["--config-dir", str(conf), "-m", "x=1,0,2",
                                                    f"paths.output_dir={tmp_path}"])
    (sweep,) = (tmp_path / "multiruns").iterdir()
    errors = {p.name: (p / "error.txt").read_text() for p in sorted(sweep.iterdir()) if (p / "error.txt").is_file()}
    assert list(errors) == ["0", "2"] and "ValueError: boom 2" in errors["2"]  # trial 1 ran between them
    assert sweeper_value(OmegaConf.create({"optimized_metric": "val/loss"}), {"val/loss": 1}) == 1.0  # to Optuna


def test_the_pipeline_masks_its_own_saved_config(tmp_path, monkeypatch):
    """The pipeline's prologue once skipped redaction: a W&B key given on its command line stayed in
    <pipeline dir>/.hydra/config.yaml. Stopped once the plan is made: nothing is scored or trained here."""
    import tunelab.verbs.pipeline as pipeline

    def stop(*args, **kwargs):
        raise ConfigError("stopped after the prologue", "test", "none")

    monkeypatch.setattr(pipeline, "_check_plan", stop)  # the first step after the plan
    with pytest.raises(SystemExit) as exit_:
        _run_in_process(monkeypatch, tmp_path, "pipeline", ["logger=wandb", f"+logger.wandb.api_key={SECRET}",
                                                            f"paths.output_dir={tmp_path}"])
    assert exit_.value.code == 2  # the stop above: the prologue ran to its end
    (run_dir,) = (tmp_path / "runs").iterdir()
    saved = (run_dir / ".hydra" / "config.yaml").read_text()
    assert SECRET not in saved and yaml.safe_load(saved)["logger"]["wandb"]["api_key"] == "REDACTED"
    assert SECRET not in (run_dir / ".hydra" / "overrides.yaml").read_text()


def test_old_argparse_spellings_become_overrides():
    report = next(v for v in cli.VERBS if v.name == "sweep-report")
    assert cli.old_spellings(report, ["out/multiruns/x", "--metric", "val/accuracy", "--mode=max"]) == [
        "dir=out/multiruns/x", "metric=val/accuracy", "mode=max"]
    assert cli.old_spellings(report, ["my sweeps/x"]) == ["dir='my sweeps/x'"]
    assert cli.old_spellings(report, ["dir=a", "--cfg", "job"]) == ["dir=a", "--cfg", "job"]


def test_pipeline_report_is_a_hydra_verb(tmp_path, monkeypatch, capsys):
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "summary.json").write_text(
        '{"pipeline": "p", "strategy": "sequential", "stages_total": 1, "stages_done": 1, "acc": 0.5}')
    _run_in_process(monkeypatch, tmp_path, "pipeline-report", [str(tmp_path)])  # the old positional spelling
    assert "comparison.csv" in capsys.readouterr().out and (tmp_path / "comparison.md").is_file()
    assert not list(tmp_path.glob("*.log"))  # no log file where it ran


def test_literal_values_compose_back_to_the_same_string():
    """`cli.literal` (used by `--prompt` and the old option spellings): any text, seeded random strings over the
    characters Hydra and OmegaConf treat specially, composes back to exactly itself, as a string."""
    import random

    from tunelab.config.compose import compose

    rng = random.Random(21)
    alphabet = "aZ1._/-,?:=\'\"\\${}[]() e\n"
    cases = ["Is this review positive or negative? Great product, works well.", "${oc.env:HOME}", "\\${x}", "42",
             "null", "true", ".5", "1e3", "", "ends with \\", "it's", "val/loss", "./a b"]
    cases += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(60)]
    for text in cases:
        value = compose(["run=/tmp", f"prompt={cli.literal(text)}"], config_name="generate",
                        return_hydra_config=False).prompt
        assert value == text and isinstance(value, str), (text, cli.literal(text), value)


@pytest.mark.parametrize("name", ["eval", "generate", "train"])
def test_ctrl_c_outside_trainings_handler_is_exit_130_without_a_traceback(name, monkeypatch, capsys):
    """A KeyboardInterrupt that reaches the console script (Ctrl-C during start-up, eval, generate, export) is one
    line and exit 130, as the exit-code table says; training's own handler checkpoints first and never gets here."""
    def interrupted(verb: cli.Verb, argv: list[str]) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_verb", interrupted)
    monkeypatch.setattr(sys, "argv", ["tunelab", name, "logger=none"])
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    assert stopped.value.code == 130
    assert capsys.readouterr().err == f"tunelab: {name} stopped by SIGINT\n"
