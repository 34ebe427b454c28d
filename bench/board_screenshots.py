"""Screenshots of `tunelab board`'s views for the README (docs/board/*.png), taken in Debian's headless Chromium.

    nice -n 19 bash bench/board_outputs.sh /tmp/board-outputs     # small real runs: minutes on 2 CPU cores
    nice -n 19 .venv/bin/python bench/board_screenshots.py /tmp/board-outputs

Starts `tunelab board` as a subprocess on a free port over the given outputs folder, opens each view (the runs list,
a run with its curves, a sweep, a compare, a pipeline, an eval's predictions) and saves one PNG per view.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[1]
VIEWS = {  # file name -> (page, the kind of job it shows, or None for the list)
    "runs": ("/", None),
    "run": ("/run", "run"),
    "sweep": ("/sweep", "sweep"),
    "compare": ("/compare", "compare"),
    "pipeline": ("/pipeline", "pipeline"),
    "predictions": ("/predictions", "eval"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outputs", type=Path)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "board")
    parser.add_argument("--views", nargs="*", default=list(VIEWS), choices=list(VIEWS), help="default: all")
    args = parser.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from tunelab.board.outputs import find_jobs

    jobs = find_jobs(args.outputs.resolve())
    first = {}
    # the first of each kind by path, a finished one where there is one (a pipeline shows its matrix mid-way), a
    # top-level run before a pipeline's stage (runs/demo has curves; a 20-step stage has one validation point)
    order = sorted(jobs, key=lambda j: (j.state != "finished", not j.rel.startswith("runs/"), j.rel.count("/"), j.rel))
    for job in order:
        if job.kind != "eval" or job.rel.startswith("evals/"):
            first.setdefault(job.kind, job.rel)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    board = subprocess.Popen(
        [sys.executable, "-m", "tunelab.cli", "board", f"dir={args.outputs}", "port=0"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    profile = tempfile.mkdtemp(prefix="board-shots-")
    try:
        url = re.search(r"on (http://127\.0\.0\.1:\d+)/", board.stdout.readline()).group(1)
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--window-size=1280,900",
            "--hide-scrollbars",
        ):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        args.out.mkdir(parents=True, exist_ok=True)
        try:
            for name in args.views:
                page, kind = VIEWS[name]
                if kind is not None and kind not in first:
                    print(f"skipped {name}: no finished {kind} under {args.outputs}")
                    continue
                driver.get(url + page + (f"?path={quote(first[kind])}" if kind else ""))
                height = driver.execute_script("return document.body.scrollHeight")
                driver.set_window_size(1280, min(max(height + 40, 600), 1600))  # the whole page, up to a point
                driver.save_screenshot(str(args.out / f"{name}.png"))
                print(args.out / f"{name}.png")
        finally:
            driver.quit()
    finally:
        board.terminate()
        board.wait()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
