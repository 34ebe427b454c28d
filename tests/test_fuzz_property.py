"""Generated property tests (issue 21): random override strings and random run-directory damage, from fixed seeds.

Properties, for every generated case:
- an override string given to the CLI's pre-flight passes or is refused with a TunelabError whose exit code is in
  the README's table (2, 3, 4, 5); any other exception is a traceback. Nothing is written outside the tmp cwd.
- a damaged copy of one real trained run loads (`load_run`, what generate/eval/serve do first) and exports, or
  is refused with exit 4 (2 for a config-ish refusal); nothing is written outside the run copy and `out=`; each
  case takes under 20 s. Cases run in-process (hundreds of CLI processes would take an hour on 2 cores);
`test_console_script_*` runs one case of each through the real console script. A failure prints its replay.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from conftest import REPO, make_cfg
from procs import budget
from tunelab import paths
from tunelab.cli import VERBS, preflight
from tunelab.config.compose import compose
from tunelab.errors import TunelabError
from tunelab.models.load import load_run
from tunelab.verbs.export import export

SEED = 21  # issue 21
OVERRIDE_CASES = 500
DAMAGE_CASES = 200
TABLE = {2, 3, 4, 5}  # README "Errors and exit codes", without 0 (success), 1 (bug) and the signal codes
CASE_SECONDS = 20.0
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
# Tracebacks this generator once found (exit 1), kept as fixed cases after the random ones.
REGRESSIONS = (("train", ("hydra.sweeper.params.x=1",)), ("train", ("++hydra.sweeper.params.x=1",)),
               ("train", ("-m", "hydra.sweeper.params.x=1,2")), ("train", ("paths.output_dir=" + "x" * 300,)),
               ("generate", ("paths.cache_dir=" + "y" * 300,)),
               ("pipeline", ("pipeline.common='${hydra:runtime.cwd}'",)), ("pipeline", ("pipeline.common=abc",)))


# ---- what a case may touch: a listing of the repository and the home directory -------------------------------
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".cache", "wandb"}


def _listing(root: Path, depth: int) -> dict[str, tuple[int, int]]:
    """path -> (size, mtime) of the files under `root`, `depth` levels deep (caches and the venv left out)."""
    out: dict[str, tuple[int, int]] = {}
    base = len(root.parts)
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and len(Path(folder).parts) - base < depth]
        for name in files + dirs:
            path = Path(folder) / name
            try:
                stat = path.lstat()
            except OSError:
                continue
            out[str(path)] = (stat.st_size if name in files else 0, stat.st_mtime_ns if name in files else 0)
    return out


def _snapshot() -> dict[str, tuple[int, int]]:
    return {**_listing(REPO, 6), **_listing(Path.home(), 1)}  # home's own files and folders: a new ~/outputs


def _changed(before: dict, after: dict) -> list[str]:
    return sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))


# ---- override strings -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Override:
    verb: str
    config: str
    argv: tuple[str, ...]
    deep: bool
    check: str | None

    def repro(self) -> str:  # what replays the case
        return f"preflight({list(self.argv)!r}, {self.config!r}, deep={self.deep}, check={self.check!r})"


def _leaves(node: object, prefix: str = "") -> Iterator[str]:
    """The dotted key paths of `node`'s values (interpolations left unresolved)."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            if str(key) == "hydra" and not prefix:
                continue
            child = node._get_node(key)
            path = f"{prefix}{key}"
            if isinstance(child, DictConfig) and not child._is_none():
                yield from _leaves(child, path + ".")
            else:
                yield path


@cache
def _keys(config: str) -> tuple[str, ...]:
    cfg = compose([], config, return_hydra_config=False)
    GlobalHydra.instance().clear()
    return tuple(_leaves(cfg))


@cache
def _groups() -> dict[str, tuple[str, ...]]:
    """conf/ group -> its options (top-level groups only: nested ones are reached through typos and keys)."""
    conf = paths.conf_dir()
    return {d.name: tuple(sorted(f.stem for f in d.glob("*.yaml"))) for d in sorted(conf.iterdir())
            if d.is_dir() and d.name != "hydra" and any(d.glob("*.yaml"))}


def _typo(rng: random.Random, word: str) -> str:
    i = rng.randrange(max(1, len(word)))
    return rng.choice([word[:i] + word[i + 1:], word[:i] + "x" + word[i:], word + word[-1:], word.upper()]) or "x"


def _value(rng: random.Random, files: dict[str, Path]) -> str:
    """A value as typed on a command line: numbers of every range, strings, paths, interpolations, containers."""
    kind = rng.randrange(14)
    fixed = [[str(x) for x in (0, -1, 1, -7, 2**31, 2**63, -(2**64), 10**30, 3)],
             ["nan", "inf", "-inf", "1e-300", "-0.0", "1e308", "0.5", "1.5", "-1e-3", "1e9"],
             ["", "''", '""', "null", "true", "false", "None", "~"],
             ["héllo", "'日本語'", "emoji😀", "'\u202eevil'", "'a b c'", "tab\\t", "x" * 300],
             ["'quoted'", '"dq"', "'unterminated", 'a"b', "\\'", "'it\\'s'", "a=b", "k:v"],
             ["${oc.env:HOME}", "${paths.output_dir}", "${nope}", "${oc.env:NOPE_NOT_SET}", "${", "${now:%Y}",
              "'${hydra:runtime.cwd}'", "${oc.decode:'[1,2]'}", "${tunelab_run_id:}", "${oc.env:HOME}/x", "${..x}"],
             ["[]", "[1,2,3]", "[a,[b,c]]", "{}", "{a:1}", "{a:{b:[1,nan]}}", "[", "{a:", "[1,"],
             ["/proc/x", "/proc/self/status", "/sys/kernel", "../../x", "../../../etc/passwd", "/etc/passwd",
              "/nonexistent/dir", "/", ".", "..", "~/x", "/dev/null"]]
    if kind < len(fixed):
        return rng.choice(fixed[kind])
    if kind == 8:
        return str(rng.choice(list(files.values())))
    if kind == 9:
        return str(files["file"]) + "/sub"
    if kind == 10:
        return str(rng.uniform(-10, 10))
    if kind == 11:
        return str(rng.randint(-100, 100000))
    if kind == 12:
        return ",".join(str(rng.randint(-2, 3)) for _ in range(rng.randint(2, 3)))  # a sweep list
    return "".join(rng.choice("abc_-.:/0@%*?") for _ in range(rng.randint(1, 12)))


def _override(rng: random.Random, config: str, files: dict[str, Path]) -> str:
    roll = rng.random()
    keys = _keys(config)
    if roll < 0.45:  # a real key path, sometimes misspelt in one segment
        key = rng.choice(keys)
        if rng.random() < 0.2:
            parts = key.split(".")
            j = rng.randrange(len(parts))
            parts[j] = _typo(rng, parts[j])
            key = ".".join(parts)
        return f"{rng.choice(['', '', '', '+', '++', '~'])}{key}={_value(rng, files)}"
    if roll < 0.7:  # a group with a real, misspelt or made-up option
        groups = _groups()
        group = rng.choice(list(groups))
        options = groups[group]
        option = rng.choice([*options, *options, _typo(rng, rng.choice(options)), "nope", "../model/tiny", ""])
        return f"{group}={option}"
    if roll < 0.85:  # an unknown key
        key = rng.choice(["nope", "x.y.z", _typo(rng, rng.choice(keys))])
        return f"{rng.choice(['', '+'])}{key}={_value(rng, files)}"
    return rng.choice(["=", "==", "a", "+", "~", "-m", ".=1", "a..b=1", "a=b=c", "'a'=1", "a[0]=1", "@x=1",
                       "hydra.run.dir=" + _value(rng, files), "paths.output_dir=" + _value(rng, files),
                       "run=" + _value(rng, files), "run_id=" + _value(rng, files), "resume=" + _value(rng, files),
                       "dataset.source.path=" + _value(rng, files), "model.name_or_path=" + _value(rng, files),
                       "out=" + _value(rng, files), "dir=" + _value(rng, files), "pipeline=" + _value(rng, files),
                       "hydra/launcher=" + rng.choice(["local", "ray", "slurm", "nope", ""]), "hydra/sweeper=optuna",
                       "--config-dir=" + _value(rng, files), "--config-name=" + _value(rng, files), "--cfg=job",
                       "hydra.sweeper.params.x=" + _value(rng, files), "+hydra.job.chdir=" + _value(rng, files)])


def override_cases(files: dict[str, Path]) -> list[Override]:
    rng = random.Random(SEED)
    verbs = {v.name: v for v in VERBS}
    names = ["train"] * 4 + [v.name for v in VERBS if v.name != "train"]
    cases: list[Override] = []
    while len(cases) < OVERRIDE_CASES:
        verb = verbs[rng.choice(names)]
        argv = tuple(_override(rng, verb.config, files) for _ in range(rng.choice([1, 1, 2, 3])))
        if rng.random() < 0.05:
            argv = ("-m", *argv)
        deep = rng.random() < 0.3
        cases.append(Override(verb.name, verb.config, argv, deep, verb.check if deep else None))
    for name, argv in REGRESSIONS:
        cases.append(Override(name, verbs[name].config, argv, True, verbs[name].check))
    return cases


@pytest.fixture(scope="module")
def fuzz_files(tmp_path_factory) -> dict[str, Path]:
    """Existing paths the values point at: a file, a directory, an empty file (all under a tmp dir)."""
    root = tmp_path_factory.mktemp("fuzzfiles")
    (root / "file.txt").write_text("not a directory\n"), (root / "empty.jsonl").write_bytes(b"")
    (root / "folder").mkdir()
    return {"file": root / "file.txt", "empty": root / "empty.jsonl", "folder": root / "folder"}


def _preflight(case: Override) -> tuple[str, str]:
    """('passed', ''), ('refused', 'code message') or ('crashed', exception) for one override case."""
    try:
        preflight(list(case.argv), case.config, deep=case.deep, check=case.check)
    except TunelabError as err:
        return ("refused" if err.exit_code in TABLE else "crashed"), f"{err.exit_code} {err.message()}"
    except SystemExit as err:  # argparse's usage error (an option among the overrides): a usage line, exit 2
        return ("refused" if err.code == 2 else "crashed"), f"{err.code} usage error (argparse)"
    except Exception as err:  # noqa: BLE001 - a traceback on the command line
        return "crashed", f"{type(err).__name__}: {str(err)[:300]}"
    finally:
        GlobalHydra.instance().clear()
    return "passed", ""


@pytest.mark.slow  # 500 compositions: minutes on 2 busy cores
def test_random_overrides_pass_or_exit_with_a_table_code(fuzz_files, tmp_path, monkeypatch):
    cases = override_cases(fuzz_files)
    monkeypatch.chdir(tmp_path)
    before = _snapshot()
    counts: dict[str, int] = {}
    failures, slowest = [], 0.0
    for case in cases:
        start = time.monotonic()
        outcome, detail = _preflight(case)
        slowest = max(slowest, time.monotonic() - start)
        counts[outcome] = counts.get(outcome, 0) + 1
        if outcome == "refused":
            code = detail.split()[0]
            counts[f"exit {code}"] = counts.get(f"exit {code}", 0) + 1
        if outcome == "crashed":
            failures.append(f"{case.repro()}  ->  {detail}")
    print(f"\n{len(cases)} override cases: {counts}; slowest {slowest:.1f} s")
    assert not failures, f"{len(failures)} tracebacks:\n" + "\n".join(failures)
    assert _changed(before, _snapshot()) == [], "files written outside the temporary directory"


# ---- run-directory damage ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One real run of the tiny model, a handful of steps, as `tunelab train` writes it."""
    from tunelab.verbs.train import train

    run = tmp_path_factory.mktemp("trained")
    train(make_cfg(run, ["eval.baseline=false", "eval.test=false", "eval.generate_on_val=false",
                         "eval.max_eval_samples=4", "logger=none", "hyperparams.max_steps=2",
                         "+trainer.limit_val_batches=1"]))
    assert (run / "model" / "config.json").is_file()
    return run


def _targets(run: Path) -> list[Path]:
    """The files and folders a damage may hit: model/ and .hydra/ (and the run's other top-level files)."""
    found = [p for top in ("model", ".hydra") for p in sorted((run / top).rglob("*"))]
    return found + sorted(p for p in run.iterdir() if p.is_file())  # sorted: the seed replays the same case


def _random_json(rng: random.Random, depth: int = 0) -> object:
    choice = rng.randrange(8 if depth < 3 else 5)
    scalar = [None, True, -1, 2**63, 1e308, "x", "日本", float("nan")]
    if choice < 5:
        return rng.choice(scalar)
    if choice == 5:
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["model_type", "vocab_size", "hidden_size", "_target_", "a", ""]): _random_json(rng, depth + 1)
            for _ in range(rng.randint(0, 3))}


def _mutate_json(rng: random.Random, path: Path) -> str:
    """One value of a JSON object file set to a random value of another type or range."""
    try:
        data = json.loads(path.read_text())
    except (ValueError, OSError):
        return "not json"
    if not isinstance(data, dict) or not data:
        return "not an object"
    key = rng.choice(sorted(data))
    data[key] = rng.choice([None, -1, 0, 2**40, "nope", [], {}, 1.5, rng.randint(1, 5000), "../../x"])
    path.write_text(json.dumps(data))
    return f"set {key}={data[key]!r}"


def damage(rng: random.Random, run: Path, outside: Path) -> str:
    """Apply one random damage to the run copy `run`; `outside` is a folder beside it holding a victim file."""
    target = rng.choice(_targets(run))
    rel = target.relative_to(run)
    kind = rng.choice(["truncate", "append", "flip", "delete", "link_out", "link_in", "link_dir", "dir", "json",
                       "yaml", "header", "empty", "mutate_json", "loop"])
    is_file = target.is_file() and not target.is_symlink()
    size = target.stat().st_size if is_file else 0
    if kind == "truncate" and is_file:
        with target.open("r+b") as handle:
            handle.truncate(rng.randrange(size + 1))
    elif kind == "append" and is_file:
        with target.open("ab") as handle:
            handle.write(bytes(rng.randrange(256) for _ in range(rng.randint(1, 4096))))
    elif kind == "flip" and is_file and size:
        data = bytearray(target.read_bytes())
        for _ in range(rng.randint(1, 16)):
            i = rng.randrange(min(size, 4096) if rng.random() < 0.7 else size)  # headers are at the start
            data[i] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(data))
    elif kind == "header" and target.suffix == ".safetensors":
        data = bytearray(target.read_bytes())
        length = rng.choice([2**62, 2**64 - 1, size, size - 8, 10**11, 0, 1])
        data[:8] = length.to_bytes(8, "little")
        target.write_bytes(bytes(data))
        return f"{rel}: header length {length}"
    elif kind in ("delete", "link_out", "link_in", "link_dir", "dir", "loop"):
        shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
        if kind == "link_out":
            target.symlink_to(rng.choice([outside / "victim.txt", Path("/etc/passwd"), Path("/proc/self/status"),
                                          outside / "missing"]))
        elif kind == "link_in":
            others = [p for p in _targets(run) if p != target and p.is_file()]
            target.symlink_to(rng.choice(others) if others else run)
        elif kind == "link_dir":
            target.symlink_to(rng.choice([outside, run, run / "model"]), target_is_directory=True)
        elif kind == "dir":
            target.mkdir()
            (target / "inner").write_text("x")
        elif kind == "loop":
            target.symlink_to(target)
    elif kind == "json":
        target.write_text(json.dumps(_random_json(rng)) if rng.random() < 0.8 else "[" * 100000)
    elif kind == "yaml":
        target.write_text(rng.choice(["a: [", "- 1\n- 2", f"!!python/object/apply:os.system ['touch {outside}/pwned']",
                                      "model: {trust_remote_code: true}\nmethod: {quantization: {_target_: "
                                      "torch.distributed.FileStore, file_name: " + str(outside / 'store') + "}}",
                                      "method: {peft: 5, quantization: [1]}", "x: ${oc.env:HOME}", "\x00\xff",
                                      "a: &a [1]\nb: *a", "method: {quantization: {_target_: builtins.print}}"]))
    elif kind == "empty" and is_file:
        target.write_bytes(b"")
    elif kind == "mutate_json" and target.suffix == ".json" and is_file:
        return f"{rel}: {_mutate_json(rng, target)}"
    else:
        return damage(rng, run, outside)  # this damage does not apply to this target: draw another
    return f"{rel}: {kind}"


def _load_and_export(run: Path, out: Path, export_cfg: DictConfig) -> tuple[str, str]:
    try:
        load_run(run)
        cfg = export_cfg.copy()
        cfg.run, cfg.out = str(run), str(out)
        export(cfg)
    except TunelabError as err:
        return ("refused" if err.exit_code in (2, 4) else "crashed"), f"{err.exit_code} {err.message()}"
    except Exception as err:  # noqa: BLE001 - a traceback on the command line
        return "crashed", f"{type(err).__name__}: {str(err)[:300]}"
    finally:
        GlobalHydra.instance().clear()
    return "passed", ""


def damage_cases() -> Iterator[tuple[int, random.Random]]:
    """One generator per case, seeded from SEED and the case number: `damage(random.Random(...))` replays case i."""
    yield from ((i, random.Random(f"{SEED}-{i}")) for i in range(DAMAGE_CASES))


@pytest.mark.slow  # 200 model loads and exports
def test_random_run_damage_loads_or_exits_4(trained_run, tmp_path, monkeypatch):
    export_cfg = compose(["run=x"], "export", return_hydra_config=False)
    GlobalHydra.instance().clear()
    monkeypatch.chdir(tmp_path)
    (outside := tmp_path / "outside").mkdir()
    (outside / "victim.txt").write_text("victim\n")
    before, outside_before = _snapshot(), _listing(outside, 4)
    counts: dict[str, int] = {}
    failures, slowest = [], 0.0
    for i, rng in damage_cases():
        run, out = tmp_path / "run", tmp_path / "out"
        shutil.copytree(trained_run, run, symlinks=True)
        what = damage(rng, run, outside)
        start = time.monotonic()
        outcome, detail = _load_and_export(run, out, export_cfg)
        seconds = time.monotonic() - start
        slowest = max(slowest, seconds)
        counts[outcome] = counts.get(outcome, 0) + 1
        if outcome == "refused":
            counts[f"exit {detail.split()[0]}"] = counts.get(f"exit {detail.split()[0]}", 0) + 1
        stray = sorted(set(os.listdir(tmp_path)) - {"run", "out", "outside"})
        stray += _changed(outside_before, _listing(outside, 4))
        if outcome == "crashed" or stray or seconds > budget(CASE_SECONDS):
            failures.append(f"case {i} ({what}): {outcome} {detail} stray={stray} {seconds:.1f} s")
        for folder in (run, out):
            shutil.rmtree(folder, ignore_errors=True)
            if folder.is_symlink() or folder.is_file():
                folder.unlink()
    print(f"\n{DAMAGE_CASES} damage cases: {counts}; slowest {slowest:.1f} s")
    assert not failures, f"{len(failures)} failures (replay: damage(random.Random(f'{SEED}-{{i}}'), ...)):\n" + \
        "\n".join(failures)
    assert _changed(before, _snapshot()) == [], "files written outside the run and out directories"


# ---- the real console script, one case of each property ---------------------------------------------------------
def _console(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "tunelab"
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "tunelab.cli"]
    return subprocess.run([*argv, *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=budget(300))


@pytest.mark.slow  # two console-script processes
def test_console_script_refuses_one_case_of_each(fuzz_files, trained_run, tmp_path):
    case = next(c for c in override_cases(fuzz_files) if c.verb == "train" and _preflight(c)[0] == "refused")
    code = int(_preflight(case)[1].split()[0])
    done = _console("train", *case.argv, cwd=tmp_path)
    assert "Traceback" not in done.stdout + done.stderr and done.returncode == code, (case.repro(), done.stderr[-2000:])
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, symlinks=True)
    (run / "model" / "model.safetensors").write_bytes((2**62).to_bytes(8, "little") + b"{}")
    done = _console("generate", f"run={run}", "prompt=hi", cwd=tmp_path)
    assert "Traceback" not in done.stdout + done.stderr and done.returncode == 4, done.stderr[-2000:]
    assert "tunelab: checkpoint error" in done.stderr


# ---- what the generator found, one test each (each was a TypeError or AttributeError before the fix) -------------
@pytest.mark.slow  # the module's trained run (~20 s) is built for the slow fuzz loops anyway
@pytest.mark.parametrize("name, content", [
    ("metrics.json", "null"),  # damage case 56: AttributeError in export's model card
    ("metrics.json", "1.5"),  # damage case 118
    ("metrics.json", '{"val/loss": "nope"}'),  # a value the card formats as a number
    ("metrics.json", '{"params/total": NaN, "params/trainable": 1}'),
    ("model/tunelab_recipe.json", '{"templates": 1099511627776}'),  # damage case 186: TypeError
    ("model/tunelab_recipe.json", '{"templates": [{"prompt": 5}]}'),
    ("model/tunelab_recipe.json", '{"templates": [], "system_prompt": ["x"]}'),
])
def test_damaged_metrics_or_recipe_is_exit_4(trained_run, tmp_path, name, content):
    from tunelab.errors import CheckpointError

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, symlinks=True)
    (run / name).write_text(content)
    export_cfg = compose([f"run={run}", f"out={tmp_path / 'out'}"], "export", return_hydra_config=False)
    GlobalHydra.instance().clear()
    with pytest.raises(CheckpointError, match=Path(name).name) as err:
        export(export_cfg)
    assert err.value.exit_code == 4 and not (tmp_path / "out").exists()
