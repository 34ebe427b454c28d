"""Extension points: a user's own dataset format without editing src/, and the layering of the package
(the module below the verbs, Hydra's global state read only at entry points)."""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from conftest import REPO
from tunelab.config.build import build
from tunelab.config.compose import compose
from tunelab.config.validate import validate
from tunelab.data.formats import Example, RowContext

SRC = REPO / "src" / "tunelab"


def question_answer(fields: Mapping[str, Any], row: RowContext) -> Example:
    """A test-local format: `q` and `a` columns, the question shouted."""
    return Example(row.origin, messages=[{"role": "user", "content": str(fields["q"]).upper()},
                                         {"role": "assistant", "content": str(fields["a"])}])


def test_a_new_format_is_one_function_and_one_yaml(tmp_path):
    data = tmp_path / "qa"
    data.mkdir()
    for split in ("train", "validation", "test"):
        rows = [{"q": f"what is {i} plus one?", "a": str(i + 1)} for i in range(4)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    conf = tmp_path / "conf"
    (conf / "dataset" / "format").mkdir(parents=True)
    (conf / "dataset" / "format" / "qa.yaml").write_text(
        "# A test-local format.\n_target_: test_extend.question_answer\n_partial_: true\n")
    (conf / "dataset" / "arith.yaml").write_text(
        f"# Arithmetic questions.\ndefaults:\n  - format: qa\n  - _self_\nname: arith\nsource:\n  path: {data}\n"
        "  splits: {train: train, validation: validation, test: test}\n"
        "metrics:\n  accuracy:\n    _target_: tunelab.evaluation.metrics.exact_match\n    _partial_: true\n")
    cfg = compose(["dataset=arith", f"paths.output_dir={tmp_path}", f"paths.run_dir={tmp_path}"],
                  config_dir=str(conf))
    validate(cfg)
    tokenizer = build(cfg.tokenizer)
    datamodule = build(cfg.datamodule, tokenizer=tokenizer, _convert_="all")
    datamodule.setup("fit")
    first = datamodule.splits["arith"]["train"][0]
    assert "WHAT IS 0 PLUS ONE?" in tokenizer.decode(first.input_ids)
    assert first.reference == "1"
    assert datamodule.dataset.format["_target_"] == "test_extend.question_answer"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_nothing_below_the_verbs_imports_a_verb():
    """The verbs stand on top: no module outside verbs/ (the command line aside) imports one, function-level
    imports included. The lists come from the tree itself, so a new verb or module is covered."""
    verbs = {f"tunelab.verbs.{p.stem}" for p in (SRC / "verbs").glob("*.py") if p.stem != "__init__"}
    assert {"tunelab.verbs.train", "tunelab.verbs.eval"} <= verbs
    below = [p for p in SRC.rglob("*.py") if "verbs" not in p.relative_to(SRC).parts and p.name != "cli.py"]
    assert len(below) > 20
    for path in below:
        imported = {name for name in _imports(path) if name.startswith("tunelab.verbs")}
        assert not imported, f"{path.relative_to(SRC)} imports {sorted(imported)}"


def test_hydra_global_state_is_read_only_at_the_entry_point():
    readers = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if "HydraConfig.get(" in p.read_text())
    assert readers == ["job.py"]
