"""An adversarial probe of `lorakit serve` as a user runs it (a process on 127.0.0.1): while a well-formed client
keeps asking for the same greedy completion, hostile and odd requests arrive in bounded bursts; each must get its
documented status in OpenAI's error shape, and every well-formed answer must stay 200 and unchanged. It ends with
SIGTERM during running requests: they finish, the process exits 0. The cases are listed in docs/serving.md."""

import asyncio
import json
import shutil
import signal
import threading
import time

import httpx
import pytest


from serve_helpers import ServeProcess, hostile_adapters, raw_request

KEY = "probe-key"
MODEL = "tiny-llama"
STEADY = {"model": "mine", "prompt": "steady as she goes", "max_tokens": 4, "temperature": 0, "ignore_eos": True}


def body(**fields):
    return {"model": "mine", "prompt": "hi", "max_tokens": 3, "temperature": 0, **fields}


# (name, path, JSON body or raw bytes, expected status)
CASES = [
    ("unsupported parameter", "/v1/completions", body(logprobs=5, frequency_penalty=1.0), 400),
    ("token id beyond the vocabulary", "/v1/completions", body(prompt=[5, 1000]), 400),
    ("negative token id", "/v1/completions", body(prompt=[-3]), 400),
    ("token id of 80 bits", "/v1/completions", body(prompt=[2**80]), 400),
    ("tiny temperature", "/v1/completions", body(temperature=1e-300), 200),
    ("temperature above 2", "/v1/completions", body(temperature=1e6), 400),
    ("top_p 0", "/v1/completions", body(temperature=0.8, top_p=0), 200),
    ("seed of 64 bits", "/v1/completions", body(temperature=1, seed=2**64 - 1), 200),
    ("seed beyond 64 bits", "/v1/completions", body(temperature=1, seed=2**64), 400),
    ("NaN temperature", "/v1/completions", b'{"model": "mine", "prompt": "x", "temperature": NaN}', 400),
    ("lone surrogate", "/v1/completions", b'{"model": "mine", "prompt": "\\udc00", "max_tokens": 2}', 400),
    ("non-string content part", "/v1/chat/completions",
     {"model": "mine", "messages": [{"role": "user", "content": [{"type": "text", "text": {"x": 1}}]}]}, 400),
    ("image content part", "/v1/chat/completions",
     {"model": "mine", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, 400),
    ("thousands of stop strings", "/v1/completions", body(stop=[f"stop{i}" for i in range(3000)]), 400),
    ("prompt of megabytes", "/v1/completions", body(prompt="z" * (3 << 20)), 413),
    ("adapter with huge weights", "/v1/completions", body(model="huge", max_tokens=8), 400),
    ("adapter with NaN weights", "/v1/completions", body(model="nan"), 400),
    ("unknown adapter", "/v1/completions", body(model="../mine"), 404),
    ("body that is not JSON", "/v1/completions", b"\x00\xff{{", 400),
    ("logit_bias key of 5,000 digits", "/v1/completions", body(logit_bias={"9" * 5000: 1}), 400),
    ("logit_bias beyond the vocabulary", "/v1/completions", body(logit_bias={"1000": 1}), 400),
    ("a million choices", "/v1/completions", body(n=10**6), 400),
    ("a million top_logprobs", "/v1/chat/completions",
     {"model": "mine", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 10**6}, 400),
    ("echo with logprobs", "/v1/completions", body(echo=True, logprobs=5), 200),
    ("a JSON object", "/v1/completions", body(response_format={"type": "json_object"}), 200),
    ("a schema nested 300 deep", "/v1/completions",
     body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": json.loads(
         '{"type": "array", "items": ' * 300 + "{}" + "}" * 300)}}), 400),
    ("a merge with an unknown adapter", "/v1/completions", body(model=MODEL, merged_adapters={"ids": ["mine", "../x"]}), 404),
    ("a merge with the NaN adapter", "/v1/completions", body(model=MODEL, merged_adapters={"ids": ["mine", "nan"]}), 400),
    ("a merge with a weight of 1e300", "/v1/completions",
     body(model=MODEL, merged_adapters={"ids": ["mine", "huge"], "weights": [1e300, 1]}), 400),
    ("a merge by TIES", "/v1/completions", body(model=MODEL, merged_adapters={"ids": ["mine"], "merge_strategy": "ties"}), 400),
    ("tokenize megabytes", "/tokenize", {"prompt": "z" * (3 << 20)}, 413),
    ("detokenize an id of 100 bits", "/detokenize", {"tokens": [2**100]}, 400),
    ("load from outside the roots", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/etc"}, 400),
    ("load through ..", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "mine/../../outside"}, 400),
    ("load through a symlink out", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "link-out"}, 400),
]
NO_KEY = ["/v1/models", "//v1/models", "/v1/../v1/models", "/v1/%2e%2e/v1/models", "/V1/MODELS", "/v1/models/",
          "/health", "/metrics"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe")
    adapters = tmp / "adapters"
    hostile_adapters(adapters, MODEL, "mine", r=8)
    shutil.copytree(adapters / "mine", tmp / "outside")
    (adapters / "link-out").symlink_to(tmp / "outside")
    proc = ServeProcess(["--model", MODEL, "--adapters", adapters, "--allow-runtime-lora", "--max-model-len", "128",
                         "--max-batch", "8", "--drain-timeout", "30", "--log-level", "warning"], api_key=KEY)
    proc.adapters, proc.tmp = adapters, tmp
    yield proc
    proc.close()


class SteadyClient(threading.Thread):
    """Asks for the same greedy completion again and again; records every status and text."""

    def __init__(self, url, headers):
        super().__init__(daemon=True)
        self.url, self.headers, self.answers, self.done = url, headers, [], threading.Event()

    def run(self):
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=60) as h:
            while not self.done.is_set():
                r = h.post("/v1/completions", json=STEADY)
                self.answers.append((r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text))


def test_probe_while_a_well_formed_client_keeps_succeeding(server):
    h = httpx.Client(base_url=server.url, headers=server.headers, timeout=60)
    models = h.get("/v1/models")
    assert [m["id"] for m in models.json()["data"]][:2] == [MODEL, "huge"] and "mine" in models.text
    assert str(server.tmp) not in models.text  # names, not server paths
    expected = h.post("/v1/completions", json=STEADY).json()["choices"][0]["text"]
    steady = SteadyClient(server.url, server.headers)
    steady.start()
    try:
        async def burst():
            async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as a:
                async def one(path, payload):
                    if isinstance(payload, bytes):
                        return await a.post(path, content=payload, headers={"content-type": "application/json"})
                    return await a.post(path, json=payload)
                return await asyncio.gather(*(one(path, payload) for _, path, payload, _ in CASES for _ in range(2)))

        answers = asyncio.run(burst())
        for (name, _, _, status), r in zip([c for c in CASES for _ in range(2)], answers):
            assert r.status_code == status, (name, r.status_code, r.text[:300])
            if status != 200:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}, name
            assert str(server.tmp) not in r.text, name
        for path in NO_KEY:
            for method in ("GET", "HEAD", "OPTIONS"):
                head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
                assert raw_request(server.port, head)[0] == 401, (method, path)
        # clients that send a long non-streamed request and leave at once: their work is cancelled
        long = json.dumps(body(max_tokens=120, ignore_eos=True)).encode()
        for _ in range(4):
            raw_request(server.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(long)}\r\n\r\n".encode() + long, read=False)
        # an adapter that failed to load loads once its file is fixed
        assert h.post("/v1/completions", json=body(model="later")).status_code == 400
        shutil.copy(server.adapters / "mine" / "adapter_model.safetensors", server.adapters / "later")
        assert h.post("/v1/completions", json=body(model="later")).status_code == 200
        deadline = time.time() + 30
        while time.time() < deadline and 'outcome="cancelled"} 0' in h.get("/metrics").text:
            time.sleep(0.2)
        assert 'outcome="cancelled"} 0' not in h.get("/metrics").text
    finally:
        steady.done.set()
        steady.join(timeout=60)
    assert len(steady.answers) >= 3 and all(a == (200, expected) for a in steady.answers), steady.answers[:5]


def test_sigterm_drains_running_requests_and_exits_0(server):
    def ask(out, stream):
        payload = body(max_tokens=120, ignore_eos=True, stream=stream)
        with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as c:
            r = c.post("/v1/completions", json=payload)
            out.append((r.status_code, r.text))

    results = []
    clients = [threading.Thread(target=ask, args=(results, s)) for s in (False, True)]
    for t in clients:
        t.start()
    deadline, running = time.time() + 30, False
    while time.time() < deadline and not running:  # both are running before the signal
        running = "lorakit_running_requests 2" in httpx.get(server.url + "/metrics", headers=server.headers).text
    server.proc.send_signal(signal.SIGTERM)
    for t in clients:
        t.join(timeout=60)
    assert server.proc.wait(timeout=60) == 0, server.output()
    assert len(results) == 2 and all(status == 200 for status, _ in results), results
    plain = next(text for text in (t for _, t in results) if not text.startswith("data:"))
    assert running and json.loads(plain)["usage"]["completion_tokens"] == 120
    assert any(t.rstrip().endswith("data: [DONE]") for _, t in results)
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health", headers=server.headers, timeout=5)
