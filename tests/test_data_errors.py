"""Bad data through the real command line: `tunelab: data error: <file>:<line>: <field>: <problem>`, exit 3,
before any training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from forkrun import run_forked
from procs import budget

GOOD = {"title": "Fine", "text": "It works.", "sentiment": "positive", "category": "kettle", "product": "K1",
        "rating": 5}


def _dataset(folder: Path, bad_line: str, line: int = 3) -> Path:
    folder.mkdir(parents=True)
    rows = [json.dumps(GOOD)] * 6
    rows[line - 1] = bad_line
    (folder / "train.jsonl").write_text("\n".join(rows) + "\n")
    for split in ("validation", "test"):
        (folder / f"{split}.jsonl").write_text(json.dumps(GOOD) + "\n")
    return folder


CASES = {
    "invalid_json": ('{"title": "x", "text": ', r"train.jsonl:3: invalid JSON: Expecting value"),
    "missing_field": (json.dumps({k: v for k, v in GOOD.items() if k != "sentiment"}),
                      r"train.jsonl:3: completion template: 'sentiment' is undefined"),
    "empty_completion": (json.dumps({**GOOD, "sentiment": " "}), r"train.jsonl:3: completion: empty"),
    "not_an_object": ("[1, 2]", r"train.jsonl:3: expected a JSON object, got list"),
}


# One case through a new interpreter; the others are real processes forked from tests/forkrun.py's fork server,
# which has imported torch and Lightning once (each fresh start paid about 10 s of CPU for those imports).
FRESH = "invalid_json"


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_row_exits_3_with_file_line_and_field(tmp_path, case):
    bad_line, expected = CASES[case]
    folder = _dataset(tmp_path / "data", bad_line)
    argv = [f"dataset.source.path={folder}", "logger=none", f"paths.output_dir={tmp_path / 'out'}"]
    if case == FRESH:
        out = subprocess.run([sys.executable, "-m", "tunelab.cli", "train", *argv], capture_output=True, text=True,
                             timeout=budget(300))
    else:
        out = run_forked("train", argv, tmp_path, dict(os.environ), seconds=300)
    text = out.stdout + out.stderr
    assert out.returncode == 3, text[-2000:]
    assert "tunelab: data error: " in text
    assert str(folder) in text
    import re

    assert re.search(expected, text), text[-2000:]
    assert "Traceback" not in text
    assert not list((tmp_path / "out").glob("runs/*/checkpoints/*"))  # refused before any training


def test_chat_row_with_wrong_types_and_roles(tmp_path):
    folder = tmp_path / "chat"
    folder.mkdir()
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "hello"}]}
    (folder / "train.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    for split in ("validation", "test"):
        (folder / f"{split}.jsonl").write_text(json.dumps(good) + "\n")
    out = subprocess.run(
        [sys.executable, "-m", "tunelab.cli", "data", "preview", f"dataset.source.path={folder}",
         "dataset/format=chat", "dataset.templates=[]"],
        capture_output=True, text=True, timeout=budget(300), cwd=tmp_path,
    )
    assert out.returncode == 3, out.stdout + out.stderr
    assert f"{folder / 'train.jsonl'}:2: messages[0].content: expected a string, got int" in out.stdout + out.stderr
