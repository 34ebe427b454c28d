"""Refusals that need no heavy import come before any (issue 21 items 5, 6, 7, 8): the places and names a user gives
(output directories, run ids, local model and data paths, attention names), mixture weights, quoting hints, and the
row values a template cannot render as text."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.cli import preflight
from tunelab.config.compose import compose, new_run_id
from tunelab.config.validate import validate
from tunelab.errors import ConfigError, DataError

HEAVY = ("torch", "transformers", "peft", "pytorch_lightning")


def _refusal(overrides: list[str], verb: str = "train", launch: bool = True) -> ConfigError | DataError:
    with pytest.raises((ConfigError, DataError)) as caught:
        validate(compose(overrides, verb), deep=False, launch=launch)
    return caught.value


def test_attn_implementation_is_checked_against_transformers_names():
    err = _refusal(["model.attn_implementation=sdpx"])
    assert isinstance(err, ConfigError) and "unknown model.attn_implementation 'sdpx'" in err.what
    assert "override model.attn_implementation=sdpx" in err.where and "did you mean 'sdpa'" in err.hint
    for good in ("sdpa", "eager", "null", "flash_attention_2", "flex_attention", "paged|eager",
                 "kernels-community/flash-attn2"):
        validate(compose([f"model.attn_implementation={good}"]), deep=False, launch=True)


def test_local_model_and_data_paths_must_exist_at_launch(tmp_path):
    err = _refusal(["model.name_or_path=/nonexistent/model", "model.random_init=false"])
    assert isinstance(err, ConfigError) and err.what == "model directory not found: /nonexistent/model"
    assert err.where.startswith("key model.name_or_path (override")  # the key set, not the interpolated tokenizer's
    err = _refusal(["model.tokenizer_name_or_path=./no-such-tokenizer"])
    assert "key model.tokenizer_name_or_path" in err.where
    err = _refusal(["dataset.source.path=/nonexistent"])
    assert isinstance(err, DataError) and err.exit_code == 3 and err.what == "data path not found: /nonexistent"
    err = _refusal([f"dataset.source.path={tmp_path}/x.jsonl"])
    assert isinstance(err, DataError) and err.what == f"data file not found: {tmp_path}/x.jsonl"
    assert err.hint == "check dataset.source.path"
    err = _refusal(["dataset=reviews_mix", 'dataset.tasks.rating.source.path="~/no/such/reviews"'])
    assert "key dataset.tasks.rating.source.path" in err.where
    # A hub id is the loader's to find; a pipeline's later stages start from models not trained yet (no launch).
    validate(compose(["model.name_or_path=org/some-model", "model.random_init=false"]), deep=False, launch=True)
    validate(compose(["model.name_or_path=/nonexistent/model"]), deep=False, launch=False)


@pytest.mark.parametrize("key", ["paths.output_dir", "hydra.run.dir", "hydra.sweep.dir", "paths.cache_dir"])
def test_impossible_output_dirs_are_config_errors(key, tmp_path):
    file = tmp_path / "a_file"
    file.write_text("x")
    for value, problem in [(file, "is a file, not a directory"), (file / "sub", f"{file} is a file"),
                           ("/proc/tunelab", "/proc is the kernel's own file system"),
                           ("/sys/kernel/tunelab", "/sys is the kernel's own file system")]:
        err = _refusal([f"{key}={value}"])
        assert isinstance(err, ConfigError) and problem in err.what, err.message()
        assert err.where.startswith(f"key {key} (override {key}=")  # Hydra's own keys are found on the line too
    validate(compose([f"{key}={tmp_path / 'new' / 'dir'}"]), deep=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere the kernel allows")
def test_unwritable_output_dir(tmp_path):
    from tunelab.config.places import output_dir_problem

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert output_dir_problem(locked / "run") == f"{locked} is not writable"


@pytest.mark.parametrize("bad", ["../../x", "a/b", ".hidden", "x" * 129, "a b", "tab\there", "..", "/abs"])
def test_run_id_is_a_plain_name(bad):
    err = _refusal([f"run_id={json.dumps(bad)}"])
    assert isinstance(err, ConfigError) and err.what.startswith("run_id must be a plain name"), err.message()


def test_run_ids_tunelab_makes_are_plain():
    for good in (new_run_id(), "slurm-4242-0", "job42", "lr=1e-3_bs.8"):
        validate(compose([f"run_id={json.dumps(good)}"]), deep=False)


def test_mixture_weight_naming_an_unknown_task_is_a_config_error():
    err = _refusal(["dataset=reviews_mix", "+dataset.weights.sentimnt=1"])
    assert isinstance(err, ConfigError) and err.exit_code == 2
    assert "dataset.weights names an unknown task 'sentimnt'" in err.what and "did you mean 'sentiment'" in err.hint


@pytest.mark.parametrize("override", ["prompt=a=b, c", "prompt=hello, world", 'prompt=say "hi"', "run=/tmp/it's here"])
def test_unparsable_override_hint_shows_the_quoting(override):
    with pytest.raises(ConfigError) as caught:
        preflight([override], "generate", deep=False)
    hint = caught.value.hint
    assert "quote the value for Hydra and the whole override for the shell" in hint, hint
    assert f"override {override} on the command line" in caught.value.where
    from hydra.core.override_parser.overrides_parser import OverridesParser

    typed = shlex.split(hint.rsplit("the shell: ", 1)[1].split("; ")[0])  # what the user would paste
    assert len(typed) == 1 and OverridesParser.create().parse_override(typed[0]).value() == override.split("=", 1)[1]
    from tunelab.config.compose import quoting_hint

    assert quoting_hint(None).endswith("""'prompt="a=b, c"'""")


def _items(tmp_path: Path, rows: list[dict], prompt: str, completion: str):
    from tunelab.data.items import build_items

    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"name": "t", "source": {"path": str(tmp_path)}, "templates": [{"prompt": prompt, "completion": completion}]}
    return build_items(spec, 0, lambda fields, example: example)


def test_a_bad_completion_is_named_by_the_field_the_template_reads(tmp_path):
    good = {"rating": 4, "title": "Good", "sentiment": "positive"}
    with pytest.raises(DataError) as caught:  # rating holds the same int, and comes first in the row
        _items(tmp_path, [good, {**good, "sentiment": 4}], "Title: {{ title }}", "{{ sentiment }}")
    assert caught.value.what == f"{tmp_path}/train.jsonl:2: sentiment: the completion renders int 4, not a string"
    assert "{{ sentiment | string }}" in caught.value.hint


@pytest.mark.parametrize("value", [["Good", "fine"], {"text": "Good"}])
def test_a_list_or_dict_in_a_prompt_is_a_data_error(tmp_path, value):
    good = {"rating": 4, "title": "Good", "sentiment": "positive"}
    with pytest.raises(DataError) as caught:
        _items(tmp_path, [good, good, {**good, "title": value}], "Title: {{ title }} ({{ rating }})", "{{ sentiment }}")
    assert caught.value.exit_code == 3
    assert caught.value.what.startswith(f"{tmp_path}/train.jsonl:3: title: the prompt renders {type(value).__name__}")
    items = _items(tmp_path, [good], "Title: {{ title }} ({{ rating }})", "{{ sentiment }}")  # numbers read fine
    assert items["train"].items[0].messages[0]["content"] == "Title: Good (4)"


# The command line itself: each kind of refusal ends with its exit code and one message, and none of them waits
# for torch or transformers to load (seconds idle, minutes on a busy machine).
CLI_CASES = {
    "model.attn_implementation=nope": (2, "unknown model.attn_implementation 'nope'"),
    "model.name_or_path=/nonexistent model.random_init=false": (2, "model directory not found: /nonexistent"),
    "dataset.source.path=/nonexistent": (3, "data path not found: /nonexistent"),
    "hydra.run.dir={file}": (2, "{file} is a file, not a directory, key hydra.run.dir"),
    "paths.output_dir=/proc/tunelab": (2, "/proc is the kernel's own file system"),
    "run_id=../../x": (2, "run_id must be a plain name, got '../../x'"),
}
SCRIPT = """
import contextlib, io, json, sys
from tunelab.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    sys.argv = ["tunelab", "train", *argv]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main()
            code = 0
        except SystemExit as stop:
            code = stop.code
    out.append([code, err.getvalue()])
print(json.dumps({"results": out, "heavy": [m for m in HEAVY if m in sys.modules]}))
""".replace("HEAVY", repr(HEAVY))


def test_light_refusals_on_the_command_line_import_nothing_heavy(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    validate(compose([]), deep=False)  # the `_target_` signature cache, warm as after any earlier command
    file = tmp_path / "a_file"
    file.write_text("x")
    cases = [[a.format(file=file) for a in c.split()] + ["logger=none", f"paths.output_dir={tmp_path / 'out'}"]
             if not c.startswith("paths.output_dir") else c.split() for c in CLI_CASES]
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cases)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for (case, (code, text)), (got, stderr) in zip(CLI_CASES.items(), report["results"], strict=True):
        assert got == code and text.format(file=file) in stderr, (case, got, stderr)
        assert stderr.startswith("tunelab: ") and "Traceback" not in stderr and "\n  hint: " in stderr, stderr
    assert report["heavy"] == [], report["heavy"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()  # nothing was started


def test_the_deep_checks_say_what_they_load_first(monkeypatch, capsys):
    """A refusal that needs torch says what it checks before the imports start, at a terminal."""
    import tunelab.cli

    monkeypatch.setattr(tunelab.cli, "_torch_loaded", lambda: False)  # as in a fresh `tunelab` process
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(tunelab.cli, "check_deep", lambda cfg: (_ for _ in ()).throw(ConfigError("deep refusal")))
    with pytest.raises(ConfigError, match="deep refusal"):
        preflight(["hyperparams.lr=1e-3"])
    assert capsys.readouterr().err == ("tunelab: checking the optimizer, scheduler and library option names "
                                       "(loading torch and transformers)...\n")
