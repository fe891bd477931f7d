"""The HTTP server: the official `openai` client over loopback, adapter management, metrics, and every fault
the API promises a status for (400, 401, 404, 429), a corrupt adapter, a client that leaves mid-stream."""

import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from lorakit.serve import Engine, EngineConfig, Request, SamplingParams
from lorakit.serve.server import build_app

from serve_helpers import load_model, make_adapter

KEY = "sekret"
BASE = "byte-llama"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn on 127.0.0.1 in a thread, serving an engine whose step loop runs in its own thread."""

    def __init__(self, engine, api_key=KEY):
        self.engine = engine.start()
        self.port = free_port()
        config = uvicorn.Config(build_app(engine, BASE, api_key), host="127.0.0.1", port=self.port, log_level="warning")
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
    server = LiveServer(make_engine(adapter_root))
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
        assert h.get("/health").json() == {"status": "ok"}
        auth = {"Authorization": f"Bearer {KEY}"}
        bad = h.post("/v1/completions", content=b"{not json", headers={**auth, "content-type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        for body in ({"prompt": "x"}, {"model": "a0", "prompt": "x", "max_tokens": "many"},
                     {"model": "a0", "prompt": "x", "temperature": -1}, {"model": "a0", "prompt": "x", "n": 2},
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
    with pytest.raises(openai.BadRequestError, match="adapter 'corrupt' cannot be loaded"):
        c.completions.create(model="corrupt", prompt="x", max_tokens=2)
    assert c.completions.create(model="a0", prompt="x", max_tokens=2).choices[0].finish_reason in ("length", "stop")
    make_adapter(tmp_path / "new", BASE, r=8, seed=9)
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {KEY}"}) as h:
        r = h.post("/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": str(tmp_path / "new")})
        assert r.status_code == 200, r.text
        assert h.post("/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": str(tmp_path / "new")}).status_code == 400
        r = h.post("/v1/load_lora_adapter", json={"lora_name": "broken", "lora_path": str(adapter_root / "corrupt")})
        assert r.status_code == 400 and "safetensors" in r.json()["error"]["message"]
        r = h.post("/v1/load_lora_adapter", json={"lora_name": "ghost", "lora_path": str(tmp_path / "none")})
        assert r.status_code == 400 and "no such adapter directory" in r.json()["error"]["message"]
        assert "fresh" in [m["id"] for m in h.get("/v1/models").json()["data"]]
        assert c.completions.create(model="fresh", prompt="x", max_tokens=3).usage.completion_tokens <= 3
        assert h.post("/v1/unload_lora_adapter", json={"lora_name": "fresh"}).status_code == 200
        assert h.post("/v1/unload_lora_adapter", json={"lora_name": "fresh"}).status_code == 404
        assert h.post("/v1/completions", json={"model": "fresh", "prompt": "x"}).status_code == 404


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
    with httpx.Client(base_url=live.url) as h:
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
    engine.stop()
