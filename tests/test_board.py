"""`tunelab board`: a real run and eval on disk, the board as a real subprocess, its pages in headless Chromium.

The browser tests skip (with the reason) where Debian's chromium and chromedriver are not installed; the HTTP
checks (paths outside the outputs folder, damaged run directories) run everywhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from forkrun import run_forked
from procs import budget
from procs import run as run_child

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
# A few steps, two validations, every step's loss logged: a curve of real points in seconds.
TRAIN = [
    "hyperparams.max_steps=6",
    "hyperparams.batch_size=4",
    "trainer.val_check_interval=3",
    "trainer.log_every_n_steps=1",
    "eval.baseline=false",
    "eval.test=false",
    "eval.generate_on_val=false",
    "eval.max_eval_samples=8",
    "logger=csv",
    "callbacks.progress.refresh_rate=0",
]
EVIL = '<img src=x onerror="document.title=1">'  # a run name: a directory name may hold anything but "/"
EVIL_TEXT = "</pre><script>document.title='pwned'</script><b>bold</b>"


def _tunelab(verb: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`tunelab <verb>` forked from the fork server (forkrun: a real child, no fresh imports of torch and
    Lightning); the board itself, and its refusals, run as new interpreters below."""
    out = run_forked(verb, list(args), cwd, ENV, seconds=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    """An outputs folder as the verbs write it: a trained run, an eval of it, and two damaged directories."""
    root, cwd = tmp_path_factory.mktemp("outputs"), tmp_path_factory.mktemp("cwd")
    _tunelab("train", *TRAIN, f"paths.output_dir={root}", "run_id=demo", cwd=cwd)
    _tunelab(
        "eval",
        f"run={root / 'runs' / 'demo'}",
        f"paths.output_dir={root}",
        "run_id=demo-eval",
        "max_samples=3",
        "decoding.max_new_tokens=3",
        "logger=none",
        cwd=cwd,
    )
    evil = root / "runs" / EVIL  # a run whose name and predictions are markup: they must show as text
    evil.mkdir()
    (evil / "metrics.json").write_text(json.dumps({"val/loss": 1.5}))
    rows = [{"prompt": EVIL_TEXT, "reference": "<i>ref</i>", "answer": EVIL_TEXT, "exact_match": 0.0}]
    (evil / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{torn line\n")
    broken = root / "runs" / "broken"  # killed mid-write: a torn metrics.json, a config that is not YAML
    (broken / ".hydra").mkdir(parents=True)
    (broken / "metrics.json").write_text('{"val/loss": 1.')
    (broken / ".hydra" / "config.yaml").write_text("task_name: [unclosed\n")
    (root / "escape").symlink_to("/etc", target_is_directory=True)  # a link out of the folder
    return root


@contextlib.contextmanager
def _board(root: Path, *args: str) -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunelab.cli", "board", f"dir={root}", "port=0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        line = proc.stdout.readline()
        match = re.search(r"on (http://127\.0\.0\.1:\d+)/", line)
        assert match, line + (proc.stderr.read()[-3000:] if proc.poll() is not None else "")
        yield match.group(1)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=budget(10))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def board(outputs) -> Iterator[str]:
    with _board(outputs) as url:
        yield url


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=budget(30)) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip(
            "needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver); "
            ".ci/run installs them with apt-get"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="the dev extra installs selenium")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="board-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # Headless, and nothing that reaches the network on its own (updates, sync, field trials).
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1280,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(budget(60))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_board_shows_the_run_its_curve_and_its_predictions(board, browser):
    from selenium.webdriver.common.by import By

    browser.get(board + "/")
    links = {a.text: a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "table.jobs a")}
    assert "runs/demo" in links and "evals/demo-eval" in links, links
    rows = browser.find_elements(By.CSS_SELECTOR, "table.jobs tr")
    demo = next(r.text for r in rows if r.text.startswith("runs/demo "))
    assert "finished" in demo and "model=tiny" in demo, demo

    browser.get(links["runs/demo"])
    lines = {
        p.get_attribute("data-series"): p.get_attribute("points")
        for p in browser.find_elements(By.CSS_SELECTOR, "svg.chart polyline.series")
    }
    # train/loss from the CSV logger at each of the 6 steps, val/loss from history.jsonl at its 2 validations
    assert len(lines["train/loss"].split()) == 6 and len(lines["val/loss"].split()) == 2, lines
    assert "task_name: train" in browser.find_element(By.CSS_SELECTOR, "pre.config").text

    browser.get(links["evals/demo-eval"])
    browser.find_element(By.CSS_SELECTOR, "a.predictions").click()
    cells = browser.find_elements(By.CSS_SELECTOR, "table.predictions tbody tr")
    assert len(cells) == 3
    first = cells[0].find_elements(By.TAG_NAME, "td")
    assert first[3].text in ("positive", "negative") and "accuracy" in first[5].text, [c.text for c in first]


def test_board_shows_markup_from_disk_as_text(board, browser, outputs):
    from selenium.webdriver.common.by import By

    browser.get(board + "/")
    assert f"runs/{EVIL}" in browser.find_element(By.ID, "eval").text  # predictions.jsonl: listed as an eval
    assert not browser.find_elements(By.CSS_SELECTOR, "main img, script")
    browser.get(f"{board}/predictions?path={quote('runs/' + EVIL)}")
    row = browser.find_element(By.CSS_SELECTOR, "table.predictions tbody tr").text
    assert EVIL_TEXT in row and "<i>ref</i>" in row, row
    assert not browser.find_elements(By.CSS_SELECTOR, "script, main b, main i")
    assert "1 unreadable lines left out" in browser.find_element(By.TAG_NAME, "main").text
    assert browser.title.startswith("predictions runs/")  # no handler ran (document.title stays the board's)


def test_board_serves_nothing_outside_the_outputs_folder(board, outputs):
    for path in (
        "../../../etc/passwd",
        "/etc/passwd",
        "escape/passwd",
        "runs/demo/../../../etc/passwd",
        "runs/demo/model/model.safetensors",
        "runs/demo/checkpoints/last.ckpt",
    ):
        status, text = _get(f"{board}/file?path={quote(path)}")
        assert status == 403, (path, status, text[:300])
        assert "root:" not in text
    assert _get(f"{board}/run?path={quote('../..')}")[0] == 403
    assert _get(f"{board}/run?path=escape")[0] == 403
    assert _get(f"{board}/run?path=runs/nothing")[0] == 404
    assert _get(f"{board}/../../etc/passwd")[0] == 404
    status, text = _get(f"{board}/file?path=runs/demo/history.jsonl")
    assert status == 200 and '"val/loss"' in text
    with pytest.raises(urllib.error.HTTPError, match="405"):  # read-only
        urllib.request.urlopen(urllib.request.Request(board + "/", data=b"x", method="POST"), timeout=budget(30))


def test_board_shows_a_damaged_run_as_unreadable(board):
    status, page = _get(board + "/")
    assert status == 200
    row = next(r for r in page.split("<tr>") if ">runs/broken<" in r)
    assert "unreadable: " in row and ("not JSON" in row or "not YAML" in row), row
    status, page = _get(f"{board}/run?path=runs/broken")
    assert status == 200 and "unreadable: " in page


def test_board_refuses_an_exposed_host_unless_allowed(tmp_path):
    start = time.monotonic()
    out = run_child([sys.executable, "-m", "tunelab.cli", "board", f"dir={tmp_path}", "host=0.0.0.0"], 60, env=ENV)
    assert out.returncode == 2, out.stderr
    assert "tunelab: config error: host=0.0.0.0" in out.stderr and "allow_remote=true" in out.stderr
    assert "Traceback" not in out.stderr and time.monotonic() - start < budget(15)
    missing = run_child([sys.executable, "-m", "tunelab.cli", "board", f"dir={tmp_path / 'none'}"], 60, env=ENV)
    assert missing.returncode == 2 and "no outputs folder" in missing.stderr, missing.stderr


@pytest.mark.parametrize(("points", "ticks"), [([(20, 0.49)], ["19", "20", "21"]),
                                               ([(1, 2.0), (7, 1.0)], ["1", "2", "4", "6", "7"])])
def test_curve_ticks_are_whole_steps(points, ticks):
    from tunelab.board.pages import chart

    svg = chart({"val/loss": points}, "loss")
    x_ticks = re.findall(r'y="\d+" text-anchor="middle" class="tick">(\d[^<]*)<', svg)
    assert x_ticks == ticks  # a one-point run drew 19.5 and 20.5 before
