"""How long the command line takes to answer when no job runs: --help, --cfg job, a config typo.

Each command runs `--repeat` times as a real subprocess (the console script, as a user types it); the
table shows the median wall time beside a bare `python -c pass`, the interpreter's own start-up, measured
in the same loop. The first call warms the `_target_` signature cache (~/.cache/tunelab) and is not counted.

    .venv/bin/python bench/cli_latency.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

TUNELAB = str(Path(sys.executable).with_name("tunelab"))
COMMANDS = {
    "python -c pass (baseline)": [sys.executable, "-c", "pass"],
    "tunelab --help": [TUNELAB, "--help"],
    "tunelab train --help": [TUNELAB, "train", "--help"],
    "tunelab train --cfg job": [TUNELAB, "train", "--cfg", "job"],
    "tunelab train hyperparams.lrr=1 (typo)": [TUNELAB, "train", "hyperparams.lrr=1"],
    "tunelab train model=tinyy (unknown option)": [TUNELAB, "train", "model=tinyy"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    for command in COMMANDS.values():  # warm the signature cache and the OS page cache
        subprocess.run(command, capture_output=True)
    print("| command | median wall s | min s |\n|---|---|---|")
    for name, command in COMMANDS.items():
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            subprocess.run(command, capture_output=True)
            times.append(time.perf_counter() - start)
        print(f"| `{name}` | {statistics.median(times):.2f} | {min(times):.2f} |")


if __name__ == "__main__":
    main()
