"""The HTTP server: the official `openai` client over loopback, adapter management, metrics, and every fault
the API promises a status for (400, 401, 404, 429), a corrupt adapter, a client that leaves mid-stream."""

import asyncio
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from lorakit.serve import Engine, EngineConfig, SamplingParams
from lorakit.serve.server import build_app

from serve_helpers import load_model, make_adapter, raw_request

KEY = "sekret"
BASE = "byte-llama"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn on 127.0.0.1 in a thread, serving an engine whose step loop runs in its own thread."""

    def __init__(self, engine, api_key=KEY, start=True, **app_options):
        self.engine = engine.start() if start else engine
        self.port = free_port()
        # keep-alive 60 s, not uvicorn's 5: on a starved machine a client can reuse a kept-alive connection just as
        # the server closes it, and the request dies with a connection reset (the load test saw it 4 runs in 7)
        config = uvicorn.Config(build_app(engine, BASE, api_key, **app_options), host="127.0.0.1", port=self.port,
                                log_level="warning", timeout_keep_alive=60)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.stop()


def make_engine(root, **config):
    model, tok = load_model(BASE)
    engine = Engine(model, tok, EngineConfig(**{"max_batch": 4, "max_len": 128, "pool_bytes": 1 << 20, **config}))
    engine.store.scan(root)
    return engine


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for i, r in enumerate([4, 8, 16]):
        make_adapter(root / f"a{i}", BASE, r=r, seed=i)
    (root / "corrupt").mkdir()
    (root / "corrupt" / "adapter_config.json").write_text((root / "a0" / "adapter_config.json").read_text())
    (root / "corrupt" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    return root


@pytest.fixture(scope="module")
def live(adapter_root):
    server = LiveServer(make_engine(adapter_root), allow_runtime_lora=True, roots=[adapter_root])
    yield server
    server.close()


def client(live, key=KEY):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_openai_client_completions_chat_and_streams(live):
    c = client(live)
    ids = [m.id for m in c.models.list().data]
    assert ids[0] == BASE and {"a0", "a1", "a2"} <= set(ids)
    done = c.completions.create(model="a1", prompt="Hello", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    expected = live.engine.generate(live.engine.tokenizer("Hello")["input_ids"], "a1",
                                    SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert done.choices[0].text == expected.text and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 12 and done.usage.prompt_tokens == 6
    streamed = c.completions.create(model="a1", prompt="Hello", max_tokens=12, temperature=0, stream=True,
                                    extra_body={"ignore_eos": True})
    chunks = list(streamed)
    assert "".join(ch.choices[0].text for ch in chunks) == expected.text and chunks[-1].choices[0].finish_reason == "length"
    messages = [{"role": "user", "content": "Hi there"}]
    chat = c.chat.completions.create(model=BASE, messages=messages, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 8
    parts = list(c.chat.completions.create(model=BASE, messages=messages, max_tokens=8, temperature=0, stream=True,
                                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    assert text == chat.choices[0].message.content and parts[-1].usage.completion_tokens == 8


def test_auth_and_status_codes(live):
    with pytest.raises(openai.AuthenticationError):
        client(live, key="wrong").models.list()
    with httpx.Client(base_url=live.url) as h:
        assert h.get("/v1/models").status_code == 401
        auth = {"Authorization": f"Bearer {KEY}"}
        assert h.get("/health").status_code == 401 and h.get("/health", headers=auth).json() == {"status": "ok"}
        bad = h.post("/v1/completions", content=b"{not json", headers={**auth, "content-type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        for body in ({"prompt": "x"}, {"model": "a0", "prompt": "x", "max_tokens": "many"},
                     {"model": "a0", "prompt": "x", "temperature": -1}, {"model": "a0", "prompt": "x", "n": 0},
                     {"model": "a0", "messages": []}):
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            r = h.post(path, json=body, headers=auth)
            assert r.status_code == 400, (body, r.text)
            assert r.json()["error"]["message"]
        r = h.post("/v1/completions", json={"model": "nope", "prompt": "x"}, headers=auth)
        assert r.status_code == 404 and "'nope' does not exist" in r.json()["error"]["message"]
        r = h.post("/v1/completions", json={"model": "a0", "prompt": "x" * 500}, headers=auth)
        assert r.status_code == 400 and "prompt has 501 tokens" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client(live).completions.create(model="missing", prompt="x", max_tokens=2)


def test_corrupt_adapter_fails_alone_and_adapters_load_and_unload(live, adapter_root, tmp_path):
    c = client(live)
    with pytest.raises(openai.BadRequestError, match="adapter 'corrupt' cannot be loaded") as failed:
        c.completions.create(model="corrupt", prompt="x", max_tokens=2)
    assert str(adapter_root) not in str(failed.value)  # no server paths in answers
    assert c.completions.create(model="a0", prompt="x", max_tokens=2).choices[0].finish_reason in ("length", "stop")
    make_adapter(adapter_root / "new", BASE, r=8, seed=9)
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {KEY}"}) as h:
        r = h.post("/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": str(adapter_root / "new")})
        assert r.status_code == 200, r.text
        assert h.post("/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": "new"}).status_code == 400
        assert h.post("/v1/load_lora_adapter", json={"lora_name": "fresh2", "lora_path": "new"}).status_code == 200
        r = h.post("/v1/load_lora_adapter", json={"lora_name": "broken", "lora_path": str(adapter_root / "corrupt")})
        assert r.status_code == 400 and "safetensors" in r.json()["error"]["message"]
        assert str(adapter_root) not in r.text
        models = h.get("/v1/models").json()["data"]
        assert {"fresh", "fresh2"} <= {m["id"] for m in models} and all(m["root"] == m["id"] for m in models)
        assert str(adapter_root) not in h.get("/v1/models").text
        assert c.completions.create(model="fresh", prompt="x", max_tokens=3).usage.completion_tokens <= 3
        assert h.post("/v1/unload_lora_adapter", json={"lora_name": "fresh"}).status_code == 200
        assert h.post("/v1/unload_lora_adapter", json={"lora_name": "fresh"}).status_code == 404
        assert h.post("/v1/completions", json={"model": "fresh", "prompt": "x"}).status_code == 404


def test_runtime_loading_stays_under_the_roots(live, adapter_root, tmp_path):
    """Outside the roots, `..`, symlinks out, missing and non-adapter paths: one answer, which reveals nothing."""
    make_adapter(tmp_path / "outside", BASE, r=4)
    (adapter_root / "link-out").symlink_to(tmp_path / "outside")
    (adapter_root / "files-out").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (adapter_root / "files-out" / name).symlink_to(tmp_path / "outside" / name)
    refused = [str(tmp_path / "outside"), str(adapter_root / ".." / tmp_path.name / "outside"), "../outside",
               "a0/../a1", "link-out", "files-out", str(adapter_root / "nope"), "nope", "/etc", "/", str(adapter_root),
               "a0/adapter_config.json", "a0\\..\\..", "a0\x00", ""]
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {KEY}"}) as h:
        messages = set()
        for path in refused:
            r = h.post("/v1/load_lora_adapter", json={"lora_name": "sneaky", "lora_path": path})
            assert r.status_code == 400, (path, r.text)
            messages.add(r.json()["error"]["message"].replace(repr(path)[1:-1], "PATH").replace(path, "PATH"))
        for name in ('"a\\ud800"', '"a\\u0000b"', '""'):  # a lone surrogate, a control character, nothing
            r = h.post("/v1/load_lora_adapter", content=b'{"lora_name": ' + name.encode() + b', "lora_path": "a0"}',
                       headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name", (name, r.text)
        models = h.get("/v1/models")
        assert models.status_code == 200 and "sneaky" not in {m["id"] for m in models.json()["data"]}
    assert len(messages) <= 2, messages  # the empty path fails validation; all others share one message


def test_runtime_loading_is_off_by_default(adapter_root):
    engine = make_engine(adapter_root)
    app = build_app(engine, BASE)

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as h:
            load = await h.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(adapter_root / "a0")})
            unload = await h.post("/v1/unload_lora_adapter", json={"lora_name": "a0"})
            return load, unload

    load, unload = asyncio.run(scenario())
    assert load.status_code == unload.status_code == 403 and "--allow-runtime-lora" in load.json()["error"]["message"]
    assert engine.store.entry("x") is None and engine.store.entry("a0") is not None
    engine.stop()


def test_client_disconnect_mid_stream_frees_the_slot(live):
    engine = live.engine
    before = engine.stats["cancelled"]
    body = {"model": "a2", "prompt": "Hello", "max_tokens": 120, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as h:
        with h.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
        # leaving the block closes the connection mid-stream
    deadline = time.time() + 30
    while (engine.stats["cancelled"] == before or engine.running) and time.time() < deadline:
        time.sleep(0.05)
    assert engine.stats["cancelled"] == before + 1 and not engine.running
    assert all(n == 0 for n in engine.pool.refs.values())


def test_metrics_in_prometheus_text(live):
    client(live).completions.create(model="a0", prompt="x", max_tokens=2)
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {KEY}"}) as h:
        text = h.get("/metrics").text
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and not line.startswith("#")}
    for name in ("lorakit_queue_length", "lorakit_pool_hits_total", "lorakit_pool_evictions_total",
                 "lorakit_load_stall_seconds_total", "lorakit_tokens_per_second", 'lorakit_pool_bytes{kind="budget"}'):
        assert name in samples, name
    assert samples["lorakit_generation_tokens_total"] >= 2 and samples['lorakit_requests_total{outcome="finished"}'] >= 1


def test_queue_full_is_429(adapter_root):
    engine = make_engine(adapter_root, max_queue=1)  # its step loop is not started: requests stay queued
    app = build_app(engine, BASE)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as h:
            first = asyncio.create_task(h.post("/v1/completions", json={"model": "a0", "prompt": "x"}))
            while engine.queue_length == 0:
                await asyncio.sleep(0.01)
            second = await h.post("/v1/completions", json={"model": "a0", "prompt": "y"})
            first.cancel()
            return second

    r = asyncio.run(scenario())
    assert r.status_code == 429 and "queue is full" in r.json()["error"]["message"]
    assert r.headers["retry-after"] == "1"
    engine.stop()


TRICKS = ["/v1/models", "//v1/models", "/v1//models", "/v1/../v1/models", "/v1/./models", "/v1/%2e%2e/v1/models",
          "/%2e/v1/models", "/%76%31/models", "/V1/MODELS", "/v1/Models", "/v1/models/", "/v1/models?x=1",
          "/v1/models#f", "/v1/models%00", "/v1/models%2F", "/x/../v1/models", "/health", "/metrics", "/docs",
          "/openapi.json", "/nowhere", "/v1/completions", "/v1/load_lora_adapter", "*",
          "http://127.0.0.1/v1/models"]
BAD_AUTH = [None, "Bearer wrong", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", f"Basic {KEY}", KEY, "Bearer", f"Bearer  {KEY}x",
            f"Token {KEY}"]


def test_every_route_needs_the_key_whatever_the_path_or_method(live):
    """Path-normalisation tricks, methods and malformed Host headers: 401 without the right key, always."""
    for path in TRICKS:
        for method in ("GET", "HEAD", "OPTIONS", "POST", "DELETE"):
            for host in ("127.0.0.1", "evil/../v1/models", "a b"):
                for auth in (None, "Bearer wrong"):
                    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
                    head += f"Authorization: {auth}\r\n" if auth else ""
                    body = b'{"model": "a0", "prompt": "x"}' if method == "POST" else b""
                    status, data = raw_request(live.port, (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
                    assert status == 401, (method, path, host, status, data[:200])
    for auth in BAD_AUTH:
        r = httpx.get(live.url + "/v1/models", headers={"Authorization": auth} if auth else {})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", auth
    two = [("Authorization", f"Bearer {KEY}"), ("Authorization", "Bearer wrong")]
    assert httpx.get(live.url + "/v1/models", headers=two).status_code == 401
    for scheme in ("Bearer", "bearer", "BEARER"):
        assert httpx.get(live.url + "/v1/models", headers={"Authorization": f"{scheme} {KEY}"}).status_code == 200
    ok, data = raw_request(live.port, f"GET //v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                                      "Connection: close\r\n\r\n".encode())
    assert ok in (200, 404)  # with the key, a trick path is an ordinary (possibly unknown) route
