"""One client cannot make others fail or wait: odd values, unsupported parameters, bad adapters, huge bodies and
disconnects each get an answer (served, or a 4xx in OpenAI's error shape), and the others' answers do not change.
The engine gives the user's model back as it was."""

import asyncio
import json
import shutil
import socket
import threading
import time

import httpx
import pytest
import torch

from lorakit.serve import Engine, EngineConfig, SamplingParams
from lorakit.serve.server import build_app

from serve_helpers import hostile_adapters, load_model
from test_serve_http import BASE, KEY, LiveServer, make_engine

AUTH = {"Authorization": f"Bearer {KEY}"}
GREEDY = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return hostile_adapters(tmp_path_factory.mktemp("adapters"), BASE, "a0")


@pytest.fixture(scope="module")
def live(root):
    server = LiveServer(make_engine(root))
    yield server
    server.close()


def post(live, body, path="/v1/completions", raw=None):
    headers = {**AUTH, "content-type": "application/json"}
    return httpx.post(live.url + path, content=raw if raw is not None else json.dumps(body), headers=headers, timeout=60)


def assert_openai_error(r, status, *words):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    for w in words:
        assert w in err["message"], (w, err["message"])


def test_unsupported_parameters_are_named_and_neutral_values_accepted(live):
    r = post(live, {"model": "a0", "prompt": "hi", "suffix": "x", "presence_penalty": 0.5, "tools": [{"type": "x"}],
                    "best_of": True, **GREEDY})
    assert_openai_error(r, 400, "suffix", "presence_penalty", "tools", "best_of")
    neutral = {"logprobs": None, "presence_penalty": 0.0, "frequency_penalty": 0, "echo": False, "best_of": 1,
               "user": None, "n": 1, "logit_bias": {}, "response_format": {"type": "text"}}
    assert post(live, {"model": "a0", "prompt": "hi", **neutral, **GREEDY}).status_code == 200
    chat = {"model": "a0", **GREEDY}
    assert_openai_error(post(live, {**chat, "messages": [{"role": "user", "content": "hi", "name": "bob"}]},
                             "/v1/chat/completions"), 400, "messages[0].name")
    assert_openai_error(post(live, {**chat, "messages": [{"role": "tool", "content": "hi"}]}, "/v1/chat/completions"),
                        400, "messages[0].role")
    assert_openai_error(post(live, {**chat, "messages": [{"role": "user", "content": "hi"}], "echo": True},
                             "/v1/chat/completions"), 400, "echo")
    assert_openai_error(post(live, {**chat, "messages": [{"role": "user", "content": "hi"}], "stream": True,
                                    "stream_options": {"continuous_usage_stats": True}}, "/v1/chat/completions"),
                        400, "stream_options.continuous_usage_stats")


def test_extreme_sampling_values_are_exact_or_refused(live):
    greedy = post(live, {"model": "a0", "prompt": "hi", **GREEDY}).json()["choices"][0]["text"]
    for odd in ({"temperature": 1e-300}, {"temperature": 5e-324}, {"temperature": 0.5, "top_p": 0},
                {"temperature": 1.0, "top_k": 1}, {"temperature": 1e-30, "top_k": 10**18}):
        r = post(live, {"model": "a0", "prompt": "hi", **GREEDY, **odd})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy, (odd, r.text)  # the argmax limit
    for seed in (2**64 - 1, -(2**63), 0):
        assert post(live, {"model": "a0", "prompt": "hi", **GREEDY, "temperature": 1, "seed": seed}).status_code == 200
    refused = [({"seed": 2**64}, "seed"), ({"seed": 2**100}, "seed"), ({"seed": -(2**63) - 1}, "seed"),
               ({"temperature": 2.5}, "temperature"), ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"),
               ({"max_tokens": 10**30}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"n": 17}, "n"),
               ({"seed": 1.5}, "seed"), ({"max_tokens": "8"}, "max_tokens"), ({"stop": [1, 2]}, "stop")]
    for change, param in refused:
        assert_openai_error(post(live, {"model": "a0", "prompt": "hi", **GREEDY, **change}), 400, param)
    for literal in ("NaN", "Infinity", "-Infinity", "1e999"):
        raw = f'{{"model": "a0", "prompt": "hi", "max_tokens": 4, "temperature": {literal}}}'.encode()
        assert_openai_error(post(live, None, raw=raw), 400, "temperature")


def test_token_ids_text_and_content_parts(live):
    assert post(live, {"model": "a0", "prompt": [0, 5, 259], **GREEDY}).status_code == 200
    for ids in ([260], [-1], [2**70], [3, 10**9]):
        assert_openai_error(post(live, {"model": "a0", "prompt": ids, **GREEDY}), 400, "outside the vocabulary")
    for ids in ([True, 3], [1.5], [[1, 2]], []):
        assert post(live, {"model": "a0", "prompt": ids, **GREEDY}).status_code == 400, ids
    surrogate = b'"a\\ud800b"'
    for raw in (b'{"model": "a0", "max_tokens": 2, "prompt": ' + surrogate + b'}',
                b'{"model": "a0", "max_tokens": 2, "prompt": "x", "stop": [' + surrogate + b']}'):
        assert_openai_error(post(live, None, raw=raw), 400, "lone surrogate")
    for raw in (b'{"model": "a0", "max_tokens": 2, "messages": [{"role": "user", "content": ' + surrogate + b'}]}',
                b'{"model": "a0", "max_tokens": 2, "messages": [{"role": "user", "content": [{"type": "text", "text": '
                + surrogate + b'}]}]}'):
        assert_openai_error(post(live, None, "/v1/chat/completions", raw=raw), 400, "lone surrogate")
    raw = b'{"model": "a0", "max_tokens": 2, "messages": [{"role": ' + surrogate + b', "content": "x"}]}'
    assert_openai_error(post(live, None, "/v1/chat/completions", raw=raw), 400, "role")
    assert_openai_error(post(live, None, raw=b'{"model": ' + surrogate + b', "prompt": "x"}'), 400, "model")
    assert_openai_error(post(live, None, raw=b'{"model": "a\\\\ud800", "prompt": "x"}'), 404)  # an escaped name: ASCII
    chat = {"model": "a0", **GREEDY}
    for content in ([{"type": "text", "text": 5}], [5], ["hi"], [{"type": "image_url", "image_url": {"url": "x"}}],
                    [{"type": "text"}], {"text": "hi"}, 7):
        r = post(live, {**chat, "messages": [{"role": "user", "content": content}]}, "/v1/chat/completions")
        assert_openai_error(r, 400)
    ok = post(live, {**chat, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
              "/v1/chat/completions")
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 6
    for body in (b"[1, 2]", b"null", b'"x"', b"{", b'{"model": 5, "prompt": "x"}'):
        assert_openai_error(post(live, None, raw=body), 400)


def test_stop_strings_and_prompt_sizes_are_capped(live):
    assert post(live, {"model": "a0", "prompt": "hi", **GREEDY, "stop": [f"s{i}" for i in range(16)]}).status_code == 200
    for stop in ([f"s{i}" for i in range(17)], [f"s{i}" for i in range(5000)], ["x" * 10_000]):
        assert_openai_error(post(live, {"model": "a0", "prompt": "hi", **GREEDY, "stop": stop}), 400, "stop")
    assert_openai_error(post(live, {"model": "a0", "prompt": "é" * 40_000, **GREEDY}), 400, "80,000 bytes")
    start = time.perf_counter()
    big = post(live, {"model": "a0", "prompt": "x" * (4 << 20), **GREEDY})
    assert_openai_error(big, 413, "body is larger")
    chat = post(live, {"model": "a0", **GREEDY, "messages": [{"role": "user", "content": "y" * (2 << 20)}]},
                "/v1/chat/completions")
    assert_openai_error(chat, 413)

    def chunked():  # no Content-Length: the cap is counted while reading
        yield b'{"model": "a0", "prompt": "'
        for _ in range(64):
            yield b"w" * 65536
        yield b'"}'

    assert_openai_error(httpx.post(live.url + "/v1/completions", content=chunked(), headers=AUTH, timeout=60), 413)
    assert post(live, {"model": "a0", "prompt": "hi", **GREEDY}).status_code == 200
    assert time.perf_counter() - start < 60  # refused without tokenising megabytes


class ThreadRecorder:
    """A tokenizer that notes the thread each call to it runs on."""

    def __init__(self, inner):
        self.inner, self.threads = inner, []

    def __call__(self, *args, **kwargs):
        self.threads.append(threading.current_thread().name)
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_prompts_are_tokenised_off_the_event_loop(live):
    recorder = ThreadRecorder(live.engine.tokenizer)
    live.engine.tokenizer = recorder
    try:
        assert post(live, {"model": "a0", "prompt": "hi", **GREEDY}).status_code == 200
        assert post(live, {"model": "a0", "messages": [{"role": "user", "content": "hi"}], **GREEDY},
                    "/v1/chat/completions").status_code == 200
    finally:
        live.engine.tokenizer = recorder.inner
    assert len(recorder.threads) == 2 and all(t.startswith("lorakit-tokenize") for t in recorder.threads), recorder.threads


def test_bad_adapters_fail_alone_and_a_fixed_one_loads(live, root):
    alone = post(live, {"model": "a0", "prompt": "hello", **GREEDY}).json()["choices"][0]["text"]

    async def together():
        async with httpx.AsyncClient(base_url=live.url, headers=AUTH, timeout=60) as h:
            bodies = [{"model": m, "prompt": p, **GREEDY} for m, p in
                      [("huge", "x" * 100), ("a0", "hello"), ("nan", "x"), ("huge", "y"), ("a0", "hello")]]
            return await asyncio.gather(*(h.post("/v1/completions", json=b) for b in bodies))

    huge, first, nan, huge2, second = asyncio.run(together())
    assert_openai_error(huge, 400, "NaN or infinite logits", "'huge'")
    assert_openai_error(huge2, 400, "NaN or infinite logits")
    assert_openai_error(nan, 400, "NaN or inf")
    assert first.json()["choices"][0]["text"] == second.json()["choices"][0]["text"] == alone
    # a request in the slot the huge adapter used, beside a longer one, reads no stale NaN from its cache
    async def after():
        async with httpx.AsyncClient(base_url=live.url, headers=AUTH, timeout=60) as h:
            return await asyncio.gather(h.post("/v1/completions", json={"model": "a0", "prompt": "hello", **GREEDY}),
                                        h.post("/v1/completions", json={"model": "a0", "prompt": "z" * 110, **GREEDY}))

    short, _ = asyncio.run(after())
    assert short.json()["choices"][0]["text"] == alone
    assert_openai_error(post(live, {"model": "later", "prompt": "x", **GREEDY}), 400, "cannot be loaded")
    shutil.copy(root / "a0" / "adapter_model.safetensors", root / "later" / "adapter_model.safetensors")
    r = post(live, {"model": "later", "prompt": "hello", **GREEDY})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == alone


def test_non_streamed_client_that_leaves_cancels_its_request(root):
    engine = make_engine(root)  # its step loop is not started: the request stays queued until cancelled
    server = LiveServer(engine, start=False)
    try:
        body = json.dumps({"model": "a0", "prompt": "hello", "max_tokens": 50}).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            deadline = time.time() + 30
            while not engine._inbox and time.time() < deadline:
                time.sleep(0.02)
            queued = engine._inbox[0]
            assert not queued.cancelled
        deadline = time.time() + 30
        while not queued.cancelled and time.time() < deadline:
            time.sleep(0.05)
        assert queued.cancelled
    finally:
        server.close()


def test_stopped_engine_answers_503_with_retry_after(root):
    engine = make_engine(root)
    engine.stop()
    app = build_app(engine, BASE)

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as h:
            return await h.get("/health"), await h.post("/v1/completions", json={"model": "a0", "prompt": "x"})

    for r in asyncio.run(scenario()):
        assert_openai_error(r, 503)
        assert r.headers["retry-after"] == "1"


def test_engine_stop_gives_the_model_back_unchanged(root):
    model, tok = load_model(BASE)
    model.train()
    model.model.layers[0].train(False)  # mixed modes, each must come back as it was
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    modes = {n: m.training for n, m in model.named_modules()}
    types = {n: type(m) for n, m in model.named_modules()}
    with torch.no_grad():
        model.eval()
        before = model(ids).logits
        for n, m in model.named_modules():
            m.training = modes[n]
    engine = Engine(model, tok, EngineConfig(max_batch=2, max_len=64, pool_bytes=1 << 20))
    engine.store.scan(root)
    engine.start()
    assert engine.generate([5, 6, 7], "a0", SamplingParams(**GREEDY)).finish_reason == "length"
    assert any("forward" in vars(m) for m in model.modules())  # the LoRA term ran inside the layer calls
    assert any(not p.is_contiguous() for p in model.parameters())  # float32 on the CPU: the serving layout
    engine.stop()
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert not any(m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m) for m in model.modules())
    assert all(p.is_contiguous() for p in model.parameters())
    with torch.no_grad():
        model.eval()
        after = model(ids).logits
    assert torch.equal(before, after)
