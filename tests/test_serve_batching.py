"""Batched serving, in process: concurrent requests share one generate call and get the answers they get alone;
per-request max_tokens, seeds and streams survive batching; leaner inference (bfloat16, int8) and its refusals;
the engine switch's pre-flight refusal. The HTTP side (concurrent clients of a real server) is in test_serve.py."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import REPO
from tunelab.data.encode import prompt_ids
from tunelab.errors import ConfigError
from tunelab.evaluation.evaluate import generate_tokens, left_pad
from tunelab.models.load import for_inference, load_causal_lm, load_tokenizer
from tunelab.serving.batching import Batcher
from tunelab.serving.generation import run_generate
from tunelab.serving.requests import Served

INSTRUCT = str(REPO / "src" / "tunelab" / "assets" / "tiny-instruct")
QUESTIONS = ["Is this review positive or negative? Great product, works well.", "Name a colour.",
             "What is two plus two?", "Summarise: the battery died after a week.", "hi", "Translate 'cat' to French.",
             "Is this review positive or negative? Broke on day one.", "List three fruits."]


@pytest.fixture(scope="module")
def served() -> Served:
    tokenizer = load_tokenizer(INSTRUCT)
    return Served(model=load_causal_lm(INSTRUCT).eval(), tokenizer=tokenizer, model_id="tiny-instruct")


def _ids(served: Served, text: str) -> list[int]:
    return list(prompt_ids(served.tokenizer, [{"role": "user", "content": text}]))


def test_concurrent_greedy_requests_share_batches_and_equal_the_sequential_answers(served):
    """Eight clients at once, each with its own max_tokens: one batch (or a few), the answers of one at a time."""
    limits = [3, 24, 8, 16, 24, 1, 12, 20]
    alone = [run_generate(served, _ids(served, q), {"max_new_tokens": n, "do_sample": False})
             for q, n in zip(QUESTIONS, limits, strict=True)]
    batcher = Batcher(served, max_batch_size=8, window_s=0.5)
    futures: list = [None] * len(QUESTIONS)

    def client(i: int) -> None:
        futures[i] = batcher.submit(_ids(served, QUESTIONS[i]), {"max_new_tokens": limits[i], "do_sample": False})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(QUESTIONS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    together = [f.result(timeout=300) for f in futures]
    assert together == alone  # the same tokens and finish reasons
    assert batcher.largest > 1  # they did share a batch
    assert all(len(new) <= n for (new, _), n in zip(together, limits, strict=True))


def test_requests_that_trickle_in_still_share_one_batch(served):
    """The window runs from the latest arrival: clients that come back one by one, each within the window of the
    last but together over it, share one batch instead of being cut into a batch and a straggler (8 HTTP clients
    came back over ~6 ms; a 5 ms window from the first cut 16 of 68 batches short)."""
    sizes: list[int] = []

    class Counting(Batcher):
        def _generate(self, batch: list) -> None:
            sizes.append(len(batch))
            super()._generate(batch)

    batcher = Counting(served, max_batch_size=8, window_s=0.5)
    settings = {"max_new_tokens": 2, "do_sample": False}
    first = [batcher.submit(_ids(served, q), settings) for q in QUESTIONS[:4]]  # four clients at once
    for future in first:
        future.result(timeout=300)
    sizes.clear()
    trickled = []
    for question in QUESTIONS[4:8]:  # the same four clients back, 0.2 s apart: 0.6 s in all, over the window
        trickled.append(batcher.submit(_ids(served, question), settings))
        time.sleep(0.2)
    for future in trickled:
        future.result(timeout=300)
    assert sizes == [4]


def _forward_logprobs(served: Served, prompt: list[int], new: list[int], temperature: float = 1.0) -> torch.Tensor:
    """Each new token's log-softmax over one plain forward pass of prompt + answer (no generate, no cache)."""
    with torch.no_grad():
        logits = served.model(torch.tensor([prompt + new])).logits[0, len(prompt) - 1:-1]
    return torch.log_softmax(logits / temperature, -1)


def test_logprobs_are_the_log_softmax_sampled_from_and_equal_batched_or_alone(served):
    """Issue 23: a token's logprob is the log-softmax of its step's logits (greedy: raw; sampled: at the request's
    temperature), its top alternatives the largest of them, and a batch gives the logprobs a request gets alone."""
    from tunelab.serving.logprobs import Logprobs

    greedy = {"max_new_tokens": 6, "do_sample": False}
    prompts = [_ids(served, q) for q in QUESTIONS[:4]]
    alone = []
    for prompt in prompts:
        sink = Logprobs(top=3)
        alone.append((run_generate(served, prompt, greedy, logprobs=sink), sink))
    (new, _), sink = alone[0]
    expected = _forward_logprobs(served, prompts[0], new)
    chosen = expected.gather(1, torch.tensor(new)[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor([lp for lp, _ in sink.tokens]), chosen, atol=1e-4)
    top = expected[0].topk(3)
    assert [t for t, _ in sink.tokens[0][1]] == top.indices.tolist() and sink.tokens[0][1][0][0] == new[0]  # greedy
    batcher = Batcher(served, max_batch_size=4, window_s=0.5)
    sinks = [Logprobs(top=2), None, Logprobs(top=0), Logprobs(top=3)]  # rows with and without logprobs share it
    futures = [batcher.submit(p, greedy, logprobs=s) for p, s in zip(prompts, sinks, strict=True)]
    results = [f.result(timeout=300) for f in futures]
    assert results == [result for result, _ in alone] and batcher.largest > 1
    for ((new, _), one), batched in zip(alone, sinks, strict=True):
        if batched is None:
            continue
        assert len(batched.tokens) >= len(new)  # rows past their end get padding entries, trimmed by the length
        for (lp, top), (lp_b, top_b) in zip(one.tokens, batched.tokens[:len(new)], strict=True):
            assert abs(lp - lp_b) < 1e-4 and [t for t, _ in top[:batched.top]] == [t for t, _ in top_b]
            assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(top, top_b, strict=False))
    # sampled at temperature 0.7: the log-softmax of logits / 0.7, before top-p cuts the tail
    sampled = {"max_new_tokens": 5, "do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 0.9, "seed": 3}
    sink = Logprobs(top=1)
    new, _ = run_generate(served, prompts[1], sampled, logprobs=sink)
    expected = _forward_logprobs(served, prompts[1], new, 0.7).gather(1, torch.tensor(new)[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor([lp for lp, _ in sink.tokens]), expected, atol=1e-4)


def test_streams_seeds_and_cancellation_in_a_batch(served):
    from transformers import TextIteratorStreamer

    from tunelab.serving.generation import Cancelled

    batcher = Batcher(served, max_batch_size=4, window_s=0.5)
    greedy = {"max_new_tokens": 16, "do_sample": False}
    streamer = TextIteratorStreamer(served.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
    gone = Cancelled()
    gone.event.set()  # a client that went away before its first token
    streamed = batcher.submit(_ids(served, QUESTIONS[1]), greedy, streamer)
    plain = batcher.submit(_ids(served, QUESTIONS[2]), greedy)
    cancelled = batcher.submit(_ids(served, QUESTIONS[3]), greedy, None, gone)
    text = "".join(streamer)
    new, _ = streamed.result(timeout=300)
    assert text == served.tokenizer.decode(new, skip_special_tokens=True)
    assert plain.result(timeout=300) == run_generate(served, _ids(served, QUESTIONS[2]), greedy)
    assert len(cancelled.result(timeout=300)[0]) == 1  # stopped after the step that saw the cancellation
    sampled = {"max_new_tokens": 12, "do_sample": True, "temperature": 1.0, "top_k": 0, "seed": 7}
    seeded = [batcher.submit(_ids(served, QUESTIONS[0]), sampled) for _ in range(3)]
    alone = run_generate(served, _ids(served, QUESTIONS[0]), sampled)
    assert [f.result(timeout=300) for f in seeded] == [alone] * 3  # a seed gives one answer, batched or not


def test_int8_and_bfloat16_inference_and_their_refusals(served):
    prompts = [_ids(served, q) for q in QUESTIONS[:4]]
    ids, mask = left_pad(prompts, served.tokenizer.pad_token_id)
    settings = {"max_new_tokens": 6, "do_sample": False}
    int8 = for_inference(load_causal_lm(INSTRUCT).eval(), {"dtype": "auto", "quantize": "int8"})
    assert type(int8.lm_head).__module__.startswith("torch.ao.nn.quantized")
    assert generate_tokens(int8, served.tokenizer, ids, mask, settings).shape[0] == 4
    bf16 = for_inference(load_causal_lm(INSTRUCT).eval(), {"dtype": "bfloat16", "quantize": "none"})
    assert next(bf16.parameters()).dtype == torch.bfloat16
    assert generate_tokens(bf16, served.tokenizer, ids, mask, settings).shape[0] == 4
    with pytest.raises(ConfigError, match="quantizes float32 weights"):
        for_inference(load_causal_lm(INSTRUCT).eval(), {"dtype": "bfloat16", "quantize": "int8"})
    with pytest.raises(ConfigError, match="did you mean|one of"):
        for_inference(served.model, {"dtype": "bf16"})
    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(load_causal_lm(INSTRUCT), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="unmerged adapter") as err:
        for_inference(adapted, {"quantize": "int8"})
    assert "tunelab export" in err.value.hint


def test_batching_keys_and_engine_are_checked_before_serving(tmp_path):
    from hydra.core.global_hydra import GlobalHydra

    from tunelab.config.compose import compose
    from tunelab.verbs.serve import check_command_line

    def _serve_cfg(overrides: list[str]):
        cfg = compose(overrides, config_name="serve", return_hydra_config=False)
        GlobalHydra.instance().clear()
        return cfg

    for override, message in (("max_batch_size=0", "max_batch_size"), ("batch_window_ms=-1", "batch_window_ms"),
                               ("engine=vlm", "did you mean 'vllm'"), ("threads=0", "threads"),
                               ("threads=true", "threads"), ("threads=two", "threads"),
                               ("prefix_cache=maybe", "prefix_cache")):
        with pytest.raises(ConfigError, match=message):
            check_command_line(_serve_cfg(["model=tiny", override]))
    if torch.cuda.is_available():
        return
    # On a CPU machine engine=vllm is refused by the pre-flight: exit 2, the extra named, no torch import.
    code = ("import sys\nfrom tunelab.cli import run_verb\ntry:\n    run_verb('serve', sys.argv[1:])\n"
            "except SystemExit as err:\n    print('exit', err.code, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, f"run={tmp_path}", "engine=vllm"],
                          capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "exit 2 False", done.stdout + done.stderr[-2000:]
    assert "engine=vllm serves on a CUDA GPU" in done.stderr and "tunelab[vllm]" in done.stderr


@pytest.mark.gpu
@pytest.mark.slow
def test_vllm_engine_serves_a_run_on_a_gpu(tmp_path):
    """Prepared for a GPU machine with `tunelab[vllm]`: `serve engine=vllm` answers the official client."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("vllm", reason="pip install 'tunelab[vllm]'")
    openai = pytest.importorskip("openai")
    import socket
    import time

    from conftest import make_cfg
    from tunelab.verbs.train import train

    run = tmp_path / "run"
    train(make_cfg(run, ["hyperparams.max_steps=4", "logger=none", "eval.test=false", "eval.baseline=false",
                         "eval.generate_on_val=false", "eval.max_eval_samples=4"]))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "serve", f"run={run}", "engine=vllm",
                             f"port={port}", "served_model_name=tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)
        deadline = time.monotonic() + 600  # vLLM profiles memory and captures graphs before it listens
        while True:
            try:
                reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                       max_tokens=4, temperature=0)
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
                time.sleep(2)
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=120)


SYSTEM = "You are a careful assistant. Read the question, think, and answer it in one short sentence."


def _with_system(served: Served, text: str) -> list[int]:
    """A prompt whose first ~30 tokens (template header and system prompt) every other one shares."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
    return list(prompt_ids(served.tokenizer, messages))


def test_prefix_cache_batched_streamed_and_alone_answers_equal_plain_generate(served):
    """With prefix caching, eight concurrent greedy requests (their own max_tokens, a stream, logprobs) and then
    lone requests get the tokens, finish reasons and logprobs (within 1e-4) that plain generate gives without any
    cache; the cache was used (a prefix computed, then hit)."""
    from transformers import TextIteratorStreamer

    from tunelab.serving.logprobs import Logprobs
    from tunelab.serving.prefix_cache import PrefixCache, unsupported

    assert unsupported(served.model) is None
    limits = [3, 24, 8, 16, 24, 1, 12, 20]
    prompts = [_with_system(served, q) for q in QUESTIONS]
    plain_sinks = [Logprobs(top=2) for _ in prompts]
    plain = [run_generate(served, p, {"max_new_tokens": n, "do_sample": False}, logprobs=s)
             for p, n, s in zip(prompts, limits, plain_sinks, strict=True)]
    prefixes = PrefixCache(served.model)
    batcher = Batcher(served, max_batch_size=8, window_s=0.5, prefixes=prefixes)
    streamer = TextIteratorStreamer(served.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
    sinks = [Logprobs(top=2) if i % 3 == 0 else None for i in range(len(prompts))]
    futures = [batcher.submit(p, {"max_new_tokens": n, "do_sample": False}, streamer if i == 1 else None,
                              logprobs=sinks[i]) for i, (p, n) in enumerate(zip(prompts, limits, strict=True))]
    text = "".join(streamer)
    together = [f.result(timeout=300) for f in futures]
    assert together == plain and batcher.largest > 1
    assert text == served.tokenizer.decode(together[1][0], skip_special_tokens=True)
    assert prefixes.computed >= 1 and len(next(iter(prefixes.store))) >= 8
    for (new, _), batched, alone in zip(plain, sinks, plain_sinks, strict=True):
        for (lp, top), (lp_b, top_b) in zip(alone.tokens, (batched or alone).tokens[:len(new)], strict=True):
            assert abs(lp - lp_b) < 1e-4 and [t for t, _ in top] == [t for t, _ in top_b]
    # lone requests, one after the other: the cached prefix serves them (and the sequential path, batching=false)
    lone = PrefixCache(served.model)
    alone = [run_generate(served, p, {"max_new_tokens": n, "do_sample": False}, prefixes=lone)
             for p, n in zip(prompts, limits, strict=True)]
    assert alone == plain and lone.computed >= 1 and lone.hits >= 5
    sink = Logprobs(top=3)
    assert run_generate(served, prompts[2], {"max_new_tokens": 8, "do_sample": False}, logprobs=sink,
                        prefixes=lone) == plain[2]
    assert all(abs(a - b) < 1e-4 for (a, _), (b, _) in zip(sink.tokens, plain_sinks[2].tokens, strict=True))
    # a seeded request never reads the cache (its answer must not depend on what was served before it)
    sampled = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.0, "top_k": 0, "seed": 5}
    hits = lone.hits
    assert run_generate(served, prompts[0], sampled, prefixes=lone) == run_generate(served, prompts[0], sampled)
    assert lone.hits == hits


def test_prefix_cache_lookup_rules(served):
    """Bounded LRU; a prefix shorter than the minimum is not cached; every row keeps a token of its own."""
    from tunelab.serving.prefix_cache import PrefixCache, common_prefix

    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2 and common_prefix([[5], [6]]) == 0
    cache = PrefixCache(served.model, entries=2, min_tokens=4)
    base = list(range(10, 30))
    assert cache.lookup([base + [1], [9] + base]) is None  # nothing shared
    assert cache.lookup([base[:3] + [1], base[:3] + [2]]) is None  # 3 < min_tokens
    hit = cache.lookup([base + [1], base + [2]])
    assert hit is not None and hit.ids == tuple(base) and cache.computed == 1
    assert cache.lookup([base + [7]]).ids == tuple(base) and cache.hits == 1
    # the cached 20 tokens are this whole prompt (a row keeps a token of its own to prefill), so the 19 it shares
    # with the previous lone prompt are cached
    assert cache.lookup([base]).ids == tuple(base[:-1]) and cache.computed == 2
    for first in (1, 2, 3):
        cache.lookup([[first] * 9 + [4], [first] * 9 + [5]])
    assert len(cache.store) == 2 and tuple(base) not in cache.store  # the least recently used went first


def test_models_that_cannot_use_a_prefix_cache_fall_back_and_answer_right(served):
    """bfloat16, int8, routed experts (tiny_moe, tiny_mot) and prompt tuning get no prefix cache (a capability
    check names why) and their batched answers are still their sequential ones."""
    from peft import PromptTuningConfig, get_peft_model

    from tunelab.serving.prefix_cache import prefix_cache_for, unsupported

    assets = REPO / "src" / "tunelab" / "assets"
    moe = load_causal_lm(str(assets / "tiny-moe"), str(assets / "tiny-llama"), random_init=True).eval()
    mot = load_causal_lm(str(assets / "tiny-mot"), str(assets / "tiny-llama"), random_init=True).eval()
    bf16 = for_inference(load_causal_lm(INSTRUCT).eval(), {"dtype": "bfloat16", "quantize": "none"})
    int8 = for_inference(load_causal_lm(INSTRUCT).eval(), {"dtype": "auto", "quantize": "int8"})
    prompt = get_peft_model(load_causal_lm(INSTRUCT), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    for model, why in ((moe, "routed experts"), (mot, "routed experts"), (bf16, "float32"), (int8, "int8"),
                       (prompt, "prompt learning")):
        assert why in (unsupported(model) or ""), type(model).__name__
        assert prefix_cache_for(model, True)[0] is None
    assert prefix_cache_for(served.model, False) == (None, None)
    lean = Served(model=bf16, tokenizer=served.tokenizer, model_id="bf16")
    greedy = {"max_new_tokens": 6, "do_sample": False}
    prompts = [_with_system(served, q) for q in QUESTIONS[:4]]
    alone = [run_generate(lean, p, greedy) for p in prompts]
    batcher = Batcher(lean, max_batch_size=4, window_s=0.5, prefixes=prefix_cache_for(bf16, True)[0])
    assert [f.result(timeout=300) for f in [batcher.submit(p, greedy) for p in prompts]] == alone


def test_prompt_ids_take_the_fast_tokenizer_path_with_the_same_ids():
    """`data.encode._ids` calls the Rust tokenizer directly: the ids `tokenizer(...)` gives, for every bundled
    tokenizer, special tokens in the text included; a backend left truncating falls back to `tokenizer(...)`."""
    from tunelab.data import encode

    texts = ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "Title: Café ünïcode — ok?\n\n  spaces  ",
             "", "Is the following review positive or negative?\n\nTitle: x\nReview: y</s><s>"]
    for name in ("tiny-instruct", "tiny-llama"):
        tokenizer = load_tokenizer(str(REPO / "src" / "tunelab" / "assets" / name))
        for text in texts:
            assert encode._ids(tokenizer, text) == tokenizer(text, add_special_tokens=False)["input_ids"]
        tokenizer.backend_tokenizer.enable_truncation(max_length=3)
        assert encode._ids(tokenizer, texts[1]) == tokenizer(texts[1], add_special_tokens=False)["input_ids"]
        assert len(encode._ids(tokenizer, texts[1])) > 3


def test_api_key_and_draining_answers_are_unchanged_by_the_pure_asgi_guard(served):
    """401 without the key and 503 with Retry-After while draining: the status, headers and body bytes that the
    former BaseHTTPMiddleware's JSONResponse sent; /health passes both; the body limit still answers 413."""
    from fastapi.responses import JSONResponse
    from fastapi.testclient import TestClient

    from tunelab.serving.app import build_app
    from tunelab.serving.requests import APIError

    keyed = Served(model=served.model, tokenizer=served.tokenizer, model_id="tiny-instruct", api_key="s3cret",
                   max_request_bytes=1000)
    app = build_app(keyed)
    client = TestClient(app)
    body = {"model": "tiny-instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    missing = client.post("/v1/chat/completions", json=body)
    expected = JSONResponse(APIError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                                     code="invalid_api_key", kind="authentication_error").body(), 401)
    assert missing.status_code == 401 and missing.content == expected.body
    assert missing.headers["content-type"] == "application/json"
    assert client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
    good = client.post("/v1/chat/completions", json=body, headers={"Authorization": "bearer  s3cret"})
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] >= 1
    assert client.post("/v1/chat/completions", content=b"x" * 2000,
                       headers={"Authorization": "Bearer s3cret"}).status_code == 413
    assert client.get("/health").status_code == 200
    app.state.draining = True
    gone = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer s3cret"})
    expected = JSONResponse(APIError(503, "the server is shutting down", kind="server_error").body(), 503)
    assert gone.status_code == 503 and gone.content == expected.body and gone.headers["retry-after"] == "5"
    assert client.get("/health").json()["status"] == "draining"
