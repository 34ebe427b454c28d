"""Deploy: `tunelab serve` answers the official `openai` client like `tunelab generate`; every model/ and
export carries a model card; the W&B offline run holds the model artifact, and a reference to it resolves."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from conftest import REPO, make_cfg
from procs import budget
from tunelab.cli import literal
from tunelab.config.compose import compose
from tunelab.errors import CheckpointError, ConfigError
from tunelab.tracking.artifacts import offline_artifacts, parse_reference, resolve_run
from tunelab.verbs.export import export
from tunelab.verbs.serve import serve
from tunelab.verbs.train import train

pytestmark = pytest.mark.slow  # trains twice, then spawns a server and several CLI processes
openai = pytest.importorskip("openai", reason="the dev extra installs the openai client")

SECRET = "sk-" + "a1" * 12  # looks like an API key: must never reach the model card
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
ROW = json.loads((REPO / "data/reviews/test.jsonl").read_text().splitlines()[0])
PROMPT = f"Is the following review positive or negative?\n\nTitle: {ROW['title']}\nReview: {ROW['text']}"
MAX_TOKENS = 12


def _tunelab(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunelab.cli", *args], capture_output=True, text=True,
                          env=env or ENV, timeout=budget(300))



@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """The tiny model trained a few dozen steps, logged to an offline W&B run (the default logger)."""
    # A folder of its own around the run: the artifact test below searches the run's parent for model-served*
    # artifacts, and another test's copy of this run (with its own W&B files) must not be found there first.
    run_dir = tmp_path_factory.mktemp("served_root") / "served"
    train(make_cfg(run_dir, ["hyperparams.max_steps=16", "eval.baseline=false", "eval.generate_on_val=false",
                             "eval.max_eval_samples=16", f"tags=[{SECRET}]"]))
    return run_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("lora")
    train(make_cfg(run_dir, ["method=lora", "hyperparams.max_steps=2", "logger=none", "eval.test=false",
                             "eval.generate_on_val=false", "eval.max_eval_samples=4"]))
    return run_dir


@contextlib.contextmanager
def _serving(run: Path) -> Iterator[tuple[str, str, subprocess.Popen]]:
    """`tunelab serve` as a real subprocess on a free localhost port; yields (base url, model id, process)."""
    proc = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "serve", f"run={run}", "port=0",
                             f"max_tokens={MAX_TOKENS * 4}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    try:
        line = proc.stdout.readline()
        match = re.search(r"serving '([^']+)' on (http://127\.0\.0\.1:\d+/v1)", line)
        assert match, line + (proc.stderr.read()[-3000:] if proc.poll() is not None else "")
        model_id, base = match.group(1), match.group(2)
        _wait_healthy(base)
        yield base, model_id, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(run):
    with _serving(run) as served:
        yield served


def _wait_healthy(base: str) -> None:
    deadline = time.monotonic() + budget(60)  # the socket listens at once; uvicorn answers once the app started
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base.removesuffix("/v1") + "/health", timeout=2) as response:
                if json.load(response)["status"] == "ok":
                    return
        except (urllib.error.URLError, OSError):  # OSError: refused, reset, or timed out on a busy machine
            time.sleep(0.2)


def _client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base, api_key="unused-on-localhost", max_retries=0, timeout=120)


def test_chat_completion_equals_generate_through_an_artifact_reference(server, run):
    base, model_id, _ = server
    reply = _client(base).chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": PROMPT}], temperature=0, max_tokens=MAX_TOKENS)
    answer = reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1
    assert answer.strip()
    # `tunelab generate` with the same prompt and greedy settings, given the run as a W&B artifact reference
    ref = f"wandb-artifact://model-{run.name}:latest"
    done = _tunelab("generate", f"run={ref}", f"prompt={literal(PROMPT)}", f"decoding.max_new_tokens={MAX_TOKENS}",
                    env={**ENV, "TUNELAB_ARTIFACT_ROOTS": str(run.parent)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == answer.strip()


def test_streamed_chat_and_fields_match_the_plain_answer(server):
    base, model_id, _ = server
    client = _client(base)
    plain = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": PROMPT}],
                                           temperature=0, max_tokens=MAX_TOKENS).choices[0].message.content
    chunks = list(client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": PROMPT}],
                                                 temperature=0, max_tokens=MAX_TOKENS, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    # The run's training template renders raw fields into the same prompt (an extra body field).
    fields = {"title": ROW["title"], "text": ROW["text"]}
    templated = client.chat.completions.create(model=model_id, messages=[], temperature=0, max_tokens=MAX_TOKENS,
                                               extra_body={"fields": fields})
    assert templated.choices[0].message.content == plain
    text = client.completions.create(model=model_id, prompt="Title:", temperature=0, max_tokens=4)
    assert text.object == "text_completion" and 1 <= text.usage.completion_tokens <= 4  # EOS counts as a token
    assert [m.id for m in client.models.list().data] == [model_id]


def test_concurrent_clients_share_batches_and_get_the_sequential_greedy_answers(server, run):
    """Issue 22: eight clients at once (streams, stop strings and max_tokens of their own among them) share batches
    and each gets the answer it gets alone, and the answer plain generate gives in process without any prefix cache
    (the server caches the shared prompt prefix, and says so on /health)."""
    import torch

    from tunelab.data.encode import prompt_ids
    from tunelab.evaluation.evaluate import generate_tokens
    from tunelab.models.load import load_run
    from tunelab.serving.generation import cut_at_stop

    base, model_id, _ = server
    client = _client(base)
    rows = [json.loads(x) for x in (REPO / "data/reviews/test.jsonl").read_text().splitlines()[:8]]

    def ask(i: int) -> str:
        body = {"model": model_id, "temperature": 0, "max_tokens": MAX_TOKENS - i % 3,
                "stop": ["ega"] if i % 4 else None,
                "messages": [{"role": "user", "content": f"Is the following review positive or negative?\n\n"
                                                         f"Title: {rows[i]['title']}\nReview: {rows[i]['text']}"}]}
        if i % 2:
            chunks = client.chat.completions.create(**body, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks)
        return client.chat.completions.create(**body).choices[0].message.content

    alone = [ask(i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    assert together == alone and all(alone)
    with urllib.request.urlopen(base.removesuffix("/v1") + "/health", timeout=30) as response:
        health = json.load(response)
    assert health["largest_batch"] > 1 and health["prefix_cache"]["hits"] >= 1
    model, tokenizer, recipe = load_run(run)
    system = [{"role": "system", "content": recipe["system_prompt"]}] if recipe.get("system_prompt") else []
    for i in range(8):
        user = {"role": "user", "content": f"Is the following review positive or negative?\n\n"
                                           f"Title: {rows[i]['title']}\nReview: {rows[i]['text']}"}
        ids = torch.tensor([prompt_ids(tokenizer, [*system, user])])
        new = generate_tokens(model, tokenizer, ids, torch.ones_like(ids),
                              {"max_new_tokens": MAX_TOKENS - i % 3, "do_sample": False})[0]
        plain = cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), ["ega"] if i % 4 else [])[0]
        assert alone[i] == plain, i


def test_logprobs_usage_and_unsupported_fields_through_the_openai_client(server, run):
    """Issue 23: logprobs/top_logprobs (chat) and logprobs (completions), streamed and not, agree with each other;
    `stream_options.include_usage` ends a stream with the usage; a field not honoured is a 400 naming it."""
    base, model_id, _ = server
    client = _client(base)
    ask = {"model": model_id, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0,
           "max_tokens": MAX_TOKENS}
    reply = client.chat.completions.create(**ask, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert content and "".join(t.token for t in content).strip() == reply.choices[0].message.content.strip()
    for token in content:  # greedy: the chosen token is the most likely one, and its logprob is the top one
        assert len(token.top_logprobs) == 3 and token.top_logprobs[0].token == token.token
        assert token.logprob == token.top_logprobs[0].logprob <= 0 and bytes(token.bytes).decode() == token.token
        assert token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob >= token.top_logprobs[2].logprob
    chunks = list(client.chat.completions.create(**ask, logprobs=True, top_logprobs=3, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == reply.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    plain = client.chat.completions.create(**ask)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == reply.choices[0].message.content
    # /v1/completions: the legacy shape, the chosen token among each step's top ones, offsets from the prompt
    from tunelab.models.load import load_tokenizer

    raw = load_tokenizer(str(run / "model")).apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)  # the chat prompt as text
    text = client.completions.create(model=model_id, prompt=raw, temperature=0, max_tokens=4, logprobs=2)
    logprobs = text.choices[0].logprobs
    assert "".join(logprobs.tokens) == text.choices[0].text and len(logprobs.token_logprobs) == len(logprobs.tokens)
    assert logprobs.tokens and logprobs.text_offset[0] == len(raw)
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert len(top) == 2 and top[token] == logprob == max(top.values())
    pieces = list(client.completions.create(model=model_id, prompt=raw, temperature=0, max_tokens=4, logprobs=2,
                                            stream=True))
    assert [t for p in pieces if p.choices[0].logprobs for t in p.choices[0].logprobs.tokens] == logprobs.tokens
    # refused: a field not honoured, a value out of range or of the wrong type, top_logprobs without logprobs
    refusals = (({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                ({"response_format": {"type": "json_object"}}, "response_format"), ({"n": 2}, "n"),
                ({"logit_bias": {"5": 10}}, "logit_bias"), ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
                ({"top_logprobs": -1, "logprobs": True}, "top_logprobs"), ({"logprobs": "yes"}, "logprobs"),
                ({"top_logprobs": 2}, "top_logprobs"), ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
                ({"stream_options": {"include_usage": True}}, "stream_options"))
    for extra, field in refusals:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(**ask, **extra)
        assert refused.value.status_code == 400 and field in refused.value.message, (extra, refused.value.message)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model=model_id, prompt="Title:", max_tokens=2, logprobs=6)
    # a no-op at the value that asks for nothing is accepted: the answer is the plain one
    same = client.chat.completions.create(**ask, frequency_penalty=0, tool_choice="none", user="u1")
    assert same.choices[0].message.content == plain.choices[0].message.content


def test_errors_are_openai_json_with_status(server):
    base, model_id, _ = server
    client = _client(base)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert unknown.value.status_code == 404 and unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=10**6)
    assert too_long.value.code == "max_tokens_exceeded" and "over this server's limit" in too_long.value.message
    with pytest.raises(openai.BadRequestError, match="fields: 'text' is undefined"):
        client.chat.completions.create(model=model_id, messages=[], extra_body={"fields": {"title": "x"}})
    for body, status in ((b"{not json", 400), (b'{"messages": []}', 400), (b'{"model": 1, "messages": "x"}', 400)):
        request = urllib.request.Request(base + "/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=30)
        assert err.value.code == status
        assert set(json.loads(err.value.read())["error"]) == {"message", "type", "param", "code"}


def test_sigterm_drains_and_exits(run):
    with _serving(run) as (_, _, proc):  # its own server: the module's keeps serving the tests after this one
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=budget(60)) == -signal.SIGTERM  # uvicorn re-raises it once drained: 143 in a shell
        assert "Shutting down" in proc.stderr.read()


def _tiny_server(*overrides: str) -> tuple[subprocess.Popen, str]:
    """`tunelab serve model=tiny` (random init, nothing to train) on a free localhost port: (process, base url),
    once /health answers. The caller kills the process."""
    proc = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "serve", "model=tiny", "port=0",
                             "served_model_name=tiny", *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    line = proc.stdout.readline()
    match = re.search(r"on (http://127\.0\.0\.1:\d+/v1)", line)
    if not match:
        proc.kill()
        raise AssertionError(line + proc.communicate(timeout=60)[1][-3000:])
    _wait_healthy(match.group(1))
    return proc, match.group(1)


def test_limits_and_sigterm_drain_with_a_request_in_flight():
    """One generation at a time, none waiting: a second request is 429 while a long one streams; SIGTERM
    lets that stream finish, and the server exits as killed by SIGTERM."""
    proc, base = _tiny_server("max_concurrent=1", "max_waiting=0", "max_tokens=400")
    try:
        client = _client(base)
        # The random-init tiny model never says end-of-turn: 400 tokens keep its one slot busy for a while.
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=400, stream=True)
        first = next(iter(stream))
        with pytest.raises(openai.RateLimitError) as busy:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        assert busy.value.status_code == 429 and busy.value.response.headers["retry-after"] == "1"
        proc.send_signal(signal.SIGTERM)
        rest = list(stream)  # the request in flight is answered to the end
        assert rest[-1].choices[0].finish_reason == "length"
        text = (first.choices[0].delta.content or "") + "".join(c.choices[0].delta.content or "" for c in rest)
        assert text
        assert proc.wait(timeout=budget(60)) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


LIMIT = 8 << 20  # max_request_bytes of the server below: large enough that the server's fixed costs (uvicorn's read
# buffer of 64 KiB plus one socket read, the health probes' connections, malloc slack: ~1.2 MB measured) fit in the
# bound the issue sets, start + 2 x max_request_bytes, with nothing added. The unbounded body (8 x LIMIT, which
# FastAPI joined into one bytes object: 128 MiB at the peak) is far over it.


def _status_of(pid: int, field: str) -> int:
    """A memory figure of /proc/<pid>/status in bytes: VmRSS now, VmHWM the peak since clear_refs was reset."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _send_chunked(sock: socket.socket, total: int, sent: list[int]) -> None:
    """POST a `Transfer-Encoding: chunked` body of `total` bytes, 64 KiB a chunk: a JSON object left unclosed, so
    a server that read it all would fail to parse it cheaply rather than tokenize a 30 MB prompt."""
    head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    piece = b"x" * (64 << 10)
    try:
        sock.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
        opening = b'{"model": "tiny", "prompt": "'
        sock.sendall(b"%x\r\n%s\r\n" % (len(opening), opening))
        while sent[0] < total:
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent[0] += len(piece)
        sock.sendall(b"0\r\n\r\n")
    except OSError:  # the server may close the connection once it has answered
        pass


def _read_response(sock: socket.socket) -> tuple[int, dict]:
    """Status and JSON body of one HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _length(data):
        received = sock.recv(65536)
        assert received, f"the server closed the connection after {data[:300]!r}"
        data += received
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body[: _length(data)])


def _length(data: bytes) -> int:
    found = re.search(rb"(?i)\r\ncontent-length: *(\d+)", data.partition(b"\r\n\r\n")[0])
    return int(found.group(1)) if found else 0


def test_a_chunked_body_over_the_limit_is_refused_without_holding_it():
    """Issue 21 item 2: the 413 once read only Content-Length, so a chunked body of any size was read in whole.
    A chunked body of 8 x max_request_bytes (64 MiB) gets 413 OpenAI-style; the server's peak RSS stays under its
    start + 2 x max_request_bytes; /health answers within 1 s throughout; the next request is served."""
    proc, base = _tiny_server(f"max_request_bytes={LIMIT}", "max_tokens=2")
    try:
        client, port = _client(base), int(base.rsplit(":", 1)[1].split("/")[0])
        client.completions.create(model="tiny", prompt="hi", max_tokens=1)  # first-use allocations out of the way
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:  # a declared size: no body read
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % LIMIT**2)
            status, body = _read_response(sock)
        assert status == 413 and "over the limit" in body["error"]["message"]
        start = _status_of(proc.pid, "VmRSS")
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # VmHWM from here on: the peak of what follows
        sent, waits = [0], []
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sender = threading.Thread(target=_send_chunked, args=(sock, 8 * LIMIT, sent), daemon=True)
            sender.start()
            while sender.is_alive() or len(waits) < 5:  # probes while the body goes out, and after
                began = time.monotonic()
                with urllib.request.urlopen(base.removesuffix("/v1") + "/health", timeout=30) as response:
                    assert response.status == 200
                waits.append(time.monotonic() - began)
            status, body = _read_response(sock)
            sender.join(timeout=60)
        peak = _status_of(proc.pid, "VmHWM")
        assert status == 413 and set(body["error"]) == {"message", "type", "param", "code"}, body
        print(f"server peak RSS {peak - start} bytes over its start; limit {LIMIT}; slowest /health {max(waits):.3f} s")
        assert peak < start + 2 * LIMIT, (start, peak, sent)
        assert max(waits) < 1.0, waits
        assert client.completions.create(model="tiny", prompt="hi", max_tokens=1).usage.completion_tokens == 1
    finally:
        proc.kill()
        proc.wait()


def test_accepted_connections_turn_nagle_off():
    """The listening socket says it is TCP, so asyncio (which uvicorn serves it with) sets TCP_NODELAY on every
    accepted connection. Without it a keep-alive client (the OpenAI SDK) waited ~40 ms per request for its own
    delayed ACK before the response's body left the server (42 ms vs 0.6 ms for GET /health, BENCHMARKS.md)."""
    import asyncio

    from tunelab.verbs.serve import _bind

    async def accept_one() -> int:
        flags: asyncio.Future = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                conn = transport.get_extra_info("socket")
                flags.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        listening = _bind("127.0.0.1", 0)
        server = await asyncio.get_running_loop().create_server(Probe, sock=listening)
        try:
            _, writer = await asyncio.open_connection(*listening.getsockname()[:2])
            nodelay = await asyncio.wait_for(flags, 30)
            writer.close()
            return nodelay
        finally:
            server.close()

    assert asyncio.run(accept_one()) != 0


def _serve_cfg(overrides: list[str]):
    cfg = compose(overrides, config_name="serve", return_hydra_config=False)
    GlobalHydra.instance().clear()
    return cfg


def test_bad_input_is_refused_before_serving(run, tmp_path, monkeypatch):
    monkeypatch.delenv("TUNELAB_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="no trained model in"):
        serve(_serve_cfg([f"run={tmp_path}", "port=0"]))
    with pytest.raises(ConfigError, match="without an API key"):
        serve(_serve_cfg([f"run={run}", "host=0.0.0.0", "port=0"]))
    with pytest.raises(ConfigError, match="over the limit|at least 1"):
        serve(_serve_cfg([f"run={run}", "max_concurrent=0"]))
    with pytest.raises(ConfigError, match="run directory not found"):
        serve(_serve_cfg(["run=/nonexistent/run", "port=0"]))
    with pytest.raises(ConfigError, match="give exactly one of run= and model="):
        serve(_serve_cfg(["port=0"]))
    # The command line: one `tunelab:` line and the documented exit code, never a traceback.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        in_use = _tunelab("serve", f"run={run}", f"port={busy.getsockname()[1]}")
    assert in_use.returncode == 2 and "tunelab: config error: cannot listen on 127.0.0.1" in in_use.stderr, \
        in_use.stderr[-2000:]
    broken = tmp_path / "broken"
    shutil.copytree(run / "model", broken / "model")
    weights = broken / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a truncated download or a full disk
    damaged = _tunelab("serve", f"run={broken}", "port=0")
    # Refused by the header check before anything loads (checkpoint/rundir.py), naming the damaged file.
    assert damaged.returncode == 4 and "tunelab: checkpoint error: model.safetensors has a header length" in \
        damaged.stderr, \
        damaged.stderr[-2000:]
    assert "Traceback" not in in_use.stderr + damaged.stderr


def test_an_exposed_host_without_a_key_is_refused_before_any_heavy_import(tmp_path):
    """Issue 21 item 8: `serve host=0.0.0.0` without a key was refused only after torch and transformers loaded
    (6 s idle, 45 s busy). Now the pre-flight refuses it: exit 2, its message, and neither library imported. The
    run directory holds no model, so a load attempted first would have said "no trained model" instead."""
    code = ("import sys\nfrom tunelab.cli import run_verb\ntry:\n    run_verb('serve', sys.argv[1:])\n"
            "except SystemExit as err:\n"
            "    print('exit', err.code, sorted({'torch', 'transformers'} & set(sys.modules)))")
    env = {k: v for k, v in ENV.items() if k != "TUNELAB_API_KEY"}
    done = subprocess.run([sys.executable, "-c", code, f"run={tmp_path}", "host=0.0.0.0", "port=0"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.stdout.strip() == "exit 2 []", done.stdout + done.stderr[-3000:]
    assert "tunelab: config error: host=0.0.0.0 would expose the model" in done.stderr, done.stderr[-3000:]
    assert "no trained model" not in done.stderr and "Traceback" not in done.stderr


def test_model_card_parses_and_holds_the_run(run):
    from huggingface_hub import ModelCard

    card = ModelCard.load(run / "model" / "README.md")
    metrics = json.loads((run / "metrics.json").read_text())
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["datasets"] == ["reviews_sentiment"]
    assert "base_model" not in data  # the tiny base is a local directory, not a hub id
    assert {"tunelab", "fine-tuned", "full-fine-tuning"} <= set(data["tags"])
    results = {m["type"]: m["value"] for m in data["model-index"][0]["results"][0]["metrics"]}
    assert results["accuracy"] == pytest.approx(metrics["test/accuracy"], abs=1e-6)
    assert results["loss"] == pytest.approx(metrics["test/loss"], abs=1e-6)
    assert f"trainable parameters: {int(metrics['params/trainable']):,}" in card.text
    assert "Title: {{ title }}" in card.text and "<|im_start|>" in card.text  # templates: recipe and chat
    assert "lr: " in card.text and "max_steps: 16" in card.text  # the composed training config
    assert "AutoModelForCausalLM.from_pretrained" in card.text
    assert SECRET not in card.content and "***" in card.content


def test_lora_model_card_and_export_card(lora_run, tmp_path):
    from huggingface_hub import ModelCard

    data = ModelCard.load(lora_run / "model" / "README.md").data.to_dict()
    assert data["library_name"] == "peft" and "lora" in data["tags"]
    assert "model-index" not in data  # eval.test was not run: no figures to claim
    cfg = compose([f"run={lora_run}", f"out={tmp_path / 'export'}"], config_name="export", return_hydra_config=False)
    GlobalHydra.instance().clear()
    out = export(cfg)
    exported = ModelCard.load(out / "README.md")
    assert exported.data.to_dict()["library_name"] == "transformers"  # merged: plain transformers loads it
    assert "merged the adapter into the base weights" in exported.text and "Title: {{ title }}" in exported.text


def test_wandb_offline_run_holds_the_model_artifact(run, tmp_path):
    logs = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1
    artifacts = list(offline_artifacts(logs[0]))
    assert [(a["name"], a["type"]) for a in artifacts] == [(f"model-{run.name}", "model")]
    metrics = json.loads((run / "metrics.json").read_text())
    assert artifacts[0]["metadata"]["test/accuracy"] == pytest.approx(metrics["test/accuracy"])
    assert {"latest", "final"} <= set(artifacts[0]["aliases"])
    assert "model/model.safetensors" in artifacts[0]["files"]
    # Resolution: by reference, offline, to the run that logged it; files checked against the manifest.
    os.environ["TUNELAB_ARTIFACT_ROOTS"] = str(run.parent)
    try:
        assert resolve_run(f"tunelab/model-{run.name}:final") == run
        assert parse_reference(str(run)) is None  # an existing path stays a path
        with pytest.raises(ConfigError, match="not among the local offline runs"):
            resolve_run("model-nope:latest")
        copy = tmp_path / "copy"
        shutil.copytree(run, copy)
        os.environ["TUNELAB_ARTIFACT_ROOTS"] = str(tmp_path)
        (copy / "model" / "tokenizer.json").write_text("{}")  # changed since it was logged
        with pytest.raises(CheckpointError, match="missing or changed"):
            resolve_run(f"wandb-artifact://model-{run.name}:latest")
    finally:
        os.environ.pop("TUNELAB_ARTIFACT_ROOTS", None)
