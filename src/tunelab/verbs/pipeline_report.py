"""`tunelab pipeline-report dir=<multirun dir>`: the strategies of a pipeline multirun side by side.

Reads each pipeline's `summary.json` (`<multirun dir>/<job num>/`) and writes comparison.csv, .md and .png
into the multirun directory; the figures themselves come from pipeline/forgetting.py.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from tunelab.errors import ConfigError
from tunelab.job import RunContext, verb
from tunelab.pipeline import forgetting


@verb()
def pipeline_report(cfg: DictConfig, run: RunContext) -> list[Path]:
    """Compare the pipelines of a multirun (e.g. `tunelab pipeline -m strategy=...`); returns the files written."""
    sweep_dir = Path(str(cfg.dir)) if cfg.dir is not None else None
    if sweep_dir is None or not sweep_dir.is_dir():
        raise ConfigError(f"not a directory: {cfg.dir}", "key dir",
                          "give the multirun directory of `tunelab pipeline -m ...`: dir=outputs/multiruns/<id>")
    pipelines = forgetting.read_pipelines(sweep_dir)
    if not pipelines:
        raise ConfigError(f"no pipeline summary.json under {sweep_dir}/*/", "key dir",
                          "run `tunelab pipeline -m strategy=sequential,replay` first; a pipeline writes "
                          "summary.json after its baseline row")
    written = forgetting.compare(sweep_dir, pipelines)
    forgetting.print_comparison(pipelines, f"tunelab pipeline-report: {sweep_dir}")
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    from tunelab.cli import run_verb

    run_verb("pipeline-report")
