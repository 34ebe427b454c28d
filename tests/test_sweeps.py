"""Sweeps: grid pre-flight, Optuna searches, W&B sweep specs, parallel isolation, W&B grouping, sweep-report."""

from __future__ import annotations

import csv
import itertools
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import shared_cache
from procs import budget
from tunelab import cli
from tunelab.config.compose import compose
from tunelab.config.validate import validate
from tunelab.errors import ConfigError
from tunelab.tracking.wandb_log import records as wandb_records
from tunelab.verbs.sweep_report import print_report, report

REPO = Path(__file__).resolve().parents[1]
TUNELAB = str(Path(sys.executable).with_name("tunelab"))
SPECS = sorted((REPO / "sweeps").glob("*.yaml"))
SEARCHES = sorted((REPO / "conf" / "hparams_search").glob("*.yaml"))
FOUR = {"hyperparams.lr", "hyperparams.batch_size", "hyperparams.epochs", "hyperparams.weight_decay"}
# A trial small enough for a test: 2 optimizer steps per epoch, 8 validation examples, no generation.
TINY = ["+trainer.limit_train_batches=2", "hyperparams.epochs=1", "eval.max_eval_samples=8", "eval.baseline=false",
        "eval.test=false", "eval.generate_on_val=false"]


def _compose_ok(overrides: list[str]) -> None:
    try:
        validate(compose(overrides))
    except ConfigError as err:
        pytest.fail(f"{overrides}: {err.message()}")


# ---- W&B sweep specs: every point of every spec composes ------------------------------------
def test_sweep_specs_are_discovered():
    assert {p.name for p in SPECS} >= {"grid.yaml", "random.yaml", "bayes.yaml"}


def _sample(name: str, spec: dict, rng: random.Random, i: int) -> object:
    """Point `i` of a W&B parameter: i=0 the low extreme, i=1 the high one, then seeded draws."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return spec["values"][i % len(spec["values"])]  # every categorical value appears
    kind, low, high = spec.get("distribution"), spec["min"], spec["max"]
    if kind == "int_uniform":
        return [low, high][i] if i < 2 else rng.randint(low, high)
    if kind == "uniform":
        return [low, high][i] if i < 2 else rng.uniform(low, high)
    if kind == "log_uniform_values":
        return [low, high][i] if i < 2 else math.exp(rng.uniform(math.log(low), math.log(high)))
    pytest.fail(f"parameter {name}: distribution {kind!r} is not covered by this test; add it here")


def expand_spec(spec: dict, seed: int = 0, draws: int = 4) -> list[list[str]]:
    """Override sets a W&B sweep spec can produce: grid in full, random/bayes as extremes + seeded draws."""
    params = spec["parameters"]
    if spec["method"] == "grid":
        axes = [[f"{k}={v}" for v in p.get("values", [p.get("value")])] for k, p in params.items()]
        return [list(combo) for combo in itertools.product(*axes)]
    rng = random.Random(seed)
    return [[f"{k}={_sample(k, p, rng, i)}" for k, p in params.items()] for i in range(2 + draws)]


@pytest.mark.parametrize("spec_file", SPECS, ids=lambda p: p.name)
def test_sweep_spec_expands_and_composes(spec_file):
    spec = yaml.safe_load(spec_file.read_text())
    assert spec["method"] in ("grid", "random", "bayes")
    assert spec["command"][-1] == "${args_no_hyphens}" and spec["command"][1:3] == ["tunelab", "train"]
    assert spec["metric"]["name"] in ("val/loss", "val/accuracy") and spec["metric"]["goal"] in ("minimize", "maximize")
    assert FOUR <= set(spec["parameters"])
    points = expand_spec(spec)
    if spec["method"] == "grid":
        assert len(points) == math.prod(len(p["values"]) for p in spec["parameters"].values())
    for overrides in points:
        _compose_ok(overrides)


def test_spec_with_unknown_key_is_caught():
    spec = {"method": "grid", "parameters": {"hyperparams.lrr": {"values": [1e-3]}}}
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        validate(compose(expand_spec(spec)[0]))


# ---- basic sweeper: grid, range(), glob() through the CLI pre-flight --------------------------
def test_grid_preflight_expands_every_combination():
    grid = ["hyperparams.lr=1e-4,3e-4,1e-3", "hyperparams.batch_size=8,16", "hyperparams.epochs=1,3",
            "hyperparams.weight_decay=0,0.01"]
    combos = cli._expand(grid, multirun=True)
    assert len(combos) == 24 and len({tuple(c) for c in combos}) == 24
    cli.preflight(["-m", *grid, "model=tiny"])


def test_glob_and_range_expand_to_group_options():
    combos = cli._expand(["method=glob(*)", "hyperparams.epochs=range(1,4)"], multirun=True)
    methods = sorted({c[0].split("=")[1] for c in combos})
    assert methods == sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))
    assert sorted({c[1] for c in combos}) == ["hyperparams.epochs=1", "hyperparams.epochs=2", "hyperparams.epochs=3"]
    assert cli._expand(["method=glob(lo*)"], multirun=True) == [["method=lora"]]
    cli.preflight(["-m", "method=glob(*,exclude=[qlora])", "dataset=glob(*)", "hyperparams.epochs=range(1,3)"])


def test_sweep_with_a_typo_fails_before_any_trial():
    result = subprocess.run([TUNELAB, "train", "-m", "hyperparams.lr=1e-3,1e-2", "hyperparams.wieght_decay=0,0.1"],
                            capture_output=True, text=True, cwd=REPO, timeout=budget(120))
    assert result.returncode == 2
    assert "unknown key 'wieght_decay'" in result.stderr and "did you mean 'weight_decay'" in result.stderr


# ---- Optuna searches --------------------------------------------------------------------------
def test_hparams_searches_are_discovered():
    assert {p.stem for p in SEARCHES} >= {"optuna_val_loss", "optuna_val_accuracy"}


@pytest.mark.parametrize("search", SEARCHES, ids=lambda p: p.stem)
def test_hparams_search_composes(search):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

    cfg = compose([f"hparams_search={search.stem}"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.sampler.seed is not None
    assert set(sweeper.params) == FOUR
    direction = {"val/loss": "minimize", "val/accuracy": "maximize"}[cfg.optimized_metric]
    assert sweeper.direction == direction
    cli.preflight([f"hparams_search={search.stem}"])  # validates hydra.sweeper.params keys
    parser = OverridesParser.create()
    dists = {k: create_optuna_distribution_from_override(parser.parse_override(f"{k}={v}"))
             for k, v in sweeper.params.items()}
    assert type(dists["hyperparams.lr"]).__name__ == "LogUniformDistribution"
    assert (dists["hyperparams.lr"].low, dists["hyperparams.lr"].high) == (1e-4, 1e-2)
    assert type(dists["hyperparams.epochs"]).__name__ == "IntUniformDistribution"
    assert (dists["hyperparams.epochs"].low, dists["hyperparams.epochs"].high) == (1, 3)
    assert dists["hyperparams.batch_size"].choices == (8, 16, 32)
    lows = [f"{k}={d.choices[0] if hasattr(d, 'choices') else d.low}" for k, d in dists.items()]
    highs = [f"{k}={d.choices[-1] if hasattr(d, 'choices') else d.high}" for k, d in dists.items()]
    for overrides in (lows, highs):  # the corners of the search space compose and validate
        _compose_ok([f"hparams_search={search.stem}", *overrides])


def test_hparams_search_with_unknown_key_fails(tmp_path):
    (tmp_path / "hparams_search").mkdir()
    bad = (REPO / "conf" / "hparams_search" / "optuna_val_loss.yaml").read_text()
    bad = bad.replace("hyperparams.lr:", "hyperparams.lrr:")
    (tmp_path / "hparams_search" / "bad.yaml").write_text(bad)
    with pytest.raises(ConfigError, match="(?s)the sweep searches an unknown key 'hyperparams.lrr'.*did you mean 'lr'"):
        cli.preflight(["--config-dir", str(tmp_path), "hparams_search=bad"])


@pytest.mark.slow  # six real trials, two at a time on joblib workers
def test_optuna_search_runs_and_best_trial_is_reported(tmp_path):
    result = subprocess.run(
        [TUNELAB, "train", "hparams_search=optuna_val_loss", "hydra.sweeper.n_trials=6", "hydra.sweeper.n_jobs=2",
         "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "logger=none",
         *[o for o in TINY if not o.startswith("hyperparams.epochs")], f"paths.output_dir={tmp_path}", shared_cache()],
        capture_output=True, text=True, cwd=tmp_path, timeout=budget(900))
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "multiruns").iterdir()
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    found = report(sweep)
    assert found["mode"] == "min" and found["metric"] == "val/loss" and len(found["ranked"]) == 6
    assert found["ranked"][0].metrics["val/loss"] == pytest.approx(best["best_value"], abs=1e-6)
    top = dict(o.split("=") for o in found["ranked"][0].overrides)
    assert float(top["hyperparams.lr"]) == pytest.approx(best["best_params"]["hyperparams.lr"])


# ---- a parallel sweep with W&B and one failing trial ------------------------------------------
@pytest.fixture(scope="module")
def joblib_sweep(tmp_path_factory) -> Path:
    """4 trials on 2 joblib workers, W&B offline; max_seq_len=8 makes trials 0 and 1 fail with a data error."""
    out = tmp_path_factory.mktemp("sweep")
    result = subprocess.run(
        [TUNELAB, "train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hyperparams.max_seq_len=8,256",
         "hyperparams.lr=1e-3,3e-3", *TINY, f"paths.output_dir={out}", shared_cache()],
        capture_output=True, text=True, cwd=out, timeout=budget(900))
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (out / "multiruns").iterdir()
    return sweep


def _wandb_run(trial_dir: Path) -> dict:
    (run_file,) = trial_dir.glob("wandb/offline-run-*/*.wandb")
    found: dict = {"config": {}, "summary": {}}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            found.update(id=record.run.run_id, group=record.run.run_group, name=record.run.display_name,
                         job_type=record.run.job_type)
        elif kind == "exit":
            found["exit_code"] = record.exit.exit_code
        elif kind == "config":
            found["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "summary":
            found["summary"].update({i.key: json.loads(i.value_json) for i in record.summary.update})
    return found


@pytest.mark.slow  # a 4-trial joblib sweep
def test_parallel_sweep_trials_never_share_a_directory(joblib_sweep):
    trials = sorted(p.name for p in joblib_sweep.iterdir() if p.name.isdigit())
    assert trials == ["0", "1", "2", "3"]
    for num in ("2", "3"):
        assert (joblib_sweep / num / "metrics.json").is_file()
        assert (joblib_sweep / num / "checkpoints" / "last.ckpt").is_file()
        assert len(list((joblib_sweep / num / "wandb").glob("offline-run-*"))) == 1
        lines = (joblib_sweep / num / "history.jsonl").read_text().splitlines()
        assert len(lines) == 1 and json.loads(lines[0])["step"] == 2
    for num in ("0", "1"):
        assert (joblib_sweep / num / "error.txt").read_text().startswith("tunelab: data error:")
        assert "over max_seq_len=8" in (joblib_sweep / num / "error.txt").read_text()
        assert not (joblib_sweep / num / "metrics.json").exists()


@pytest.mark.slow  # a 4-trial joblib sweep
def test_wandb_runs_grouped_by_sweep_and_failures_marked(joblib_sweep):
    runs = {num: _wandb_run(joblib_sweep / num) for num in ("0", "1", "2", "3")}
    assert {r["group"] for r in runs.values()} == {joblib_sweep.name}
    assert [r["id"] for r in runs.values()] == [f"{joblib_sweep.name}-{n}" for n in "0123"]
    assert {r["job_type"] for r in runs.values()} == {"train"}
    assert runs["2"]["name"].startswith("2:") and "hyperparams.lr=0.001" in runs["2"]["name"]
    assert [runs[n]["exit_code"] for n in "0123"] == [1, 1, 0, 0]
    assert runs["0"]["summary"]["error"].startswith("tunelab: data error:")
    assert runs["3"]["config"]["lr"] == 0.003 and runs["3"]["config"]["max_seq_len"] == 256  # top level
    assert runs["1"]["config"]["lr"] == 0.003 and runs["1"]["config"]["max_seq_len"] == 8


@pytest.mark.slow  # a 4-trial joblib sweep
def test_sweep_report_of_a_real_sweep(joblib_sweep, capsys):
    print_report(joblib_sweep)
    out = capsys.readouterr().out
    assert "ranked by val/loss (min)" in out and "trial 0: failed: tunelab: data error" in out
    rows = list(csv.DictReader((joblib_sweep / "report" / "trials.csv").open()))
    assert [(r["trial"], r["state"]) for r in rows] == [("0", "failed"), ("1", "failed"), ("2", "ok"), ("3", "ok")]
    metrics = {n: json.loads((joblib_sweep / n / "metrics.json").read_text())["val/loss"] for n in "23"}
    assert {r["trial"]: float(r["val/loss"]) for r in rows if r["state"] == "ok"} == metrics
    best = min(metrics, key=metrics.get)
    assert f"best: trial {best}, val/loss = {metrics[best]:.6g}" in out
    for png in ("val_loss_vs_hyperparams.lr.png", "val_loss_vs_hyperparams.max_seq_len.png", "val_loss_curves.png"):
        assert (joblib_sweep / "report" / png).read_bytes()[:4] == b"\x89PNG"
    experiment = yaml.safe_load((joblib_sweep / "report" / "conf" / "experiment" / "best.yaml").read_text())
    assert experiment["hyperparams"] == {"max_seq_len": 256, "lr": {"2": 0.001, "3": 0.003}[best], "epochs": 1}
    assert experiment["trainer"] == {"limit_train_batches": 2}
    assert "paths" not in experiment and "run_id" not in experiment


@pytest.mark.slow  # a joblib sweep and two reruns
def test_best_config_reruns_in_parallel_processes_with_same_metric(joblib_sweep, tmp_path):
    """Two `tunelab train` started in the same instant: distinct run dirs; both reproduce the best val/loss."""
    report(joblib_sweep)
    conf = joblib_sweep / "report" / "conf"
    command = [TUNELAB, "train", "--config-dir", str(conf), "experiment=best", "logger=none",
               f"paths.output_dir={tmp_path}", shared_cache()]
    procs = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=budget(600))
        assert proc.returncode == 0, err[-3000:]
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and runs[0].name != runs[1].name
    best = report(joblib_sweep)["ranked"][0].metrics["val/loss"]
    for run in runs:
        assert json.loads((run / "metrics.json").read_text())["val/loss"] == pytest.approx(best, abs=1e-4)


# ---- sweep-report on a synthetic multirun directory (no training) -------------------------------
def _trial(sweep: Path, num: int, overrides: list[str], metrics: dict | None = None, error: str | None = None,
           choices: dict | None = None, metric: str = "val/loss") -> None:
    trial = sweep / str(num)
    (trial / ".hydra").mkdir(parents=True)
    (trial / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (trial / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"optimized_metric": metric}) + "x: ***\n")
    runtime = {"choices": {"model": "tiny", "method": "full", "dataset": "reviews_sentiment", **(choices or {})}}
    (trial / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": runtime}}))
    if metrics is not None:
        (trial / "metrics.json").write_text(json.dumps(metrics))
    if error is not None:
        (trial / "error.txt").write_text(error)


def test_report_ranks_skips_running_and_lists_failed(tmp_path, capsys):
    sweep = tmp_path / "multiruns" / "sweep1"
    _trial(sweep, 0, ["method=full", "hyperparams.lr=0.001", "paths.output_dir=/x", "run_id=r"], {"val/loss": 2.0})
    _trial(sweep, 1, ["method=lora", "hyperparams.lr=0.003", "paths.output_dir=/x", "run_id=r"], {"val/loss": 1.5},
           choices={"method": "lora"})
    _trial(sweep, 2, ["method=lora", "hyperparams.lr=0.01", "paths.output_dir=/x", "run_id=r"],
           error="Traceback (most recent call last):\nRuntimeError: boom\n")
    _trial(sweep, 3, ["method=full", "hyperparams.lr=0.03", "paths.output_dir=/x", "run_id=r"])  # still running
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"sweeper": {"_target_": "BasicSweeper"}}}))
    print_report(sweep)
    out = capsys.readouterr().out
    assert "note: trial 3: no metrics.json yet" in out and "note: trial 2: failed: RuntimeError: boom" in out
    found = report(sweep)
    assert found["keys"] == ["method", "hyperparams.lr"]
    assert [t.num for t in found["ranked"]] == [1, 0] and found["mode"] == "min"
    assert "no validation history found" in " ".join(found["notes"])
    text = (sweep / "report" / "conf" / "experiment" / "best.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    assert yaml.safe_load(text) == {"defaults": [{"override /method": "lora"}, "_self_"],
                                    "hyperparams": {"lr": 0.003}}
    cfg = compose(["experiment=best"], config_dir=str(sweep / "report" / "conf"))
    assert cfg.hyperparams.lr == 0.003 and cfg.hydra.runtime.choices.method == "lora"
    assert report(sweep, mode="max")["ranked"][0].num == 0
    assert report(sweep, metric="val/accuracy")["ranked"] == []


def test_report_direction_follows_optuna_and_metric_name(tmp_path):
    sweep = tmp_path / "s"
    _trial(sweep, 0, ["method=lora", "hyperparams.lr=0.001"], {"val/loss": 2.0, "val/accuracy": 0.5},
           choices={"method": "lora"}, metric="val/accuracy")
    _trial(sweep, 1, ["method=lora", "hyperparams.lr=0.002", "experiment=sweep_smoke"],
           {"val/loss": 1.0, "val/accuracy": 0.25}, choices={"method": "lora", "experiment": "sweep_smoke"},
           metric="val/accuracy")
    found = report(sweep)  # no multirun.yaml: accuracy-like means max
    assert (found["metric"], found["mode"], found["ranked"][0].num) == ("val/accuracy", "max", 0)
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"sweeper": {
        "_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper", "direction": "minimize"}}}))
    assert report(sweep)["mode"] == "min" and report(sweep)["ranked"][0].num == 1
    best = yaml.safe_load((sweep / "report" / "conf" / "experiment" / "best.yaml").read_text())
    assert best == {"defaults": ["/experiment/sweep_smoke", {"override /method": "lora"}, "_self_"],
                    "hyperparams": {"lr": 0.002}}
    cfg = compose(["experiment=best"], config_dir=str(sweep / "report" / "conf"))  # the experiment it ran with
    assert (cfg.hyperparams.lr, cfg.trainer.limit_train_batches, cfg.hydra.runtime.choices.method) == (0.002, 2, "lora")


def test_report_of_a_missing_directory_is_a_usage_error(tmp_path):
    result = subprocess.run([TUNELAB, "sweep-report", str(tmp_path / "nope")], capture_output=True, text=True)
    assert result.returncode == 2 and "tunelab: usage error: no multirun directory" in result.stderr


# ---- the 16-run grid of the done-when -------------------------------------------------
@pytest.mark.slow  # 16 trials on two joblib workers: about 2 minutes on two CPU cores
def test_grid_of_sixteen_on_two_workers(tmp_path):
    result = subprocess.run(
        [TUNELAB, "train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "logger=csv",
         "hyperparams.lr=1e-3,3e-3", "hyperparams.batch_size=8,16", "hyperparams.epochs=1,2",
         "hyperparams.weight_decay=0,0.01", *[o for o in TINY if not o.startswith("hyperparams.epochs")],
         f"paths.output_dir={tmp_path}", shared_cache()], capture_output=True, text=True, cwd=tmp_path,
        timeout=budget(1200))
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "multiruns").iterdir()
    found = report(sweep)
    assert len(found["trials"]) == 16 and len(found["ranked"]) == 16
    assert found["keys"] == ["hyperparams.lr", "hyperparams.batch_size", "hyperparams.epochs",
                             "hyperparams.weight_decay"]
    assert len({tuple(t.overrides) for t in found["trials"]}) == 16
    for trial in found["trials"]:  # epochs=2 validated twice, every 2 steps
        epochs = int(dict(o.split("=") for o in trial.overrides)["hyperparams.epochs"])
        steps = [json.loads(x)["step"] for x in (trial.path / "history.jsonl").read_text().splitlines()]
        assert steps == [2 * (e + 1) for e in range(epochs)]
    assert len(list((sweep / "report").glob("*.png"))) == 5
