"""The API users expect from vLLM and OpenAI, over loopback HTTP with a tiny random model: logprobs and
top_logprobs against a plain Hugging Face forward, n, echo, logit_bias, stream_options.include_usage,
response_format, /tokenize and /detokenize, per-adapter counters in /metrics. Each test names the wrong
implementation it catches."""

import json
import re

import httpx
import jsonschema
import pytest
import torch

from lorakit.serve.server import chat_prompt
from lorakit.serve.schema import ChatMessage

from serve_helpers import load_model, make_adapter
from test_serve_http import BASE, KEY, LiveServer, make_engine

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for i, r in enumerate([4, 8]):
        make_adapter(root / f"a{i}", BASE, r=r, seed=i)
    return root


@pytest.fixture(scope="module")
def live(root):
    server = LiveServer(make_engine(root), allow_runtime_lora=True, roots=[root])
    yield server
    server.close()


def post(live, body, path="/v1/completions"):
    return httpx.post(live.url + path, json=body, headers=AUTH, timeout=120)


def ok(live, body, path="/v1/completions"):
    r = post(live, body, path)
    assert r.status_code == 200, r.text
    return r.json()


def refused(live, body, param, path="/v1/completions", status=400):
    r = post(live, body, path)
    assert r.status_code == status, (body, r.text)
    assert param in r.json()["error"]["message"] or param == r.json()["error"]["param"], r.text
    return r.json()["error"]


def reference(ids, output, adapter_dir=None):
    """log_softmax of a plain forward (PEFT with the adapter) over prompt + output [len, vocab]."""
    model, _ = load_model(BASE)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    with torch.no_grad():
        return model(torch.tensor([ids + output])).logits[0].float().log_softmax(-1)


def token_id(s: str) -> int:
    assert s.startswith("token_id:"), s
    return int(s.split(":", 1)[1])


def prompt_ids(live, text):
    return live.engine.tokenizer(text)["input_ids"]


def test_completion_logprobs_equal_a_reference_forward_at_any_temperature(live, root):
    """Catches: logprobs of temperature-scaled or biased scores, top_logprobs unsorted or not the top ones, the
    adapter left out of the logprobs, the chosen token missing from top_logprobs."""
    ids = prompt_ids(live, "Hello")
    body = {"model": "a1", "prompt": "Hello", "max_tokens": 6, "temperature": 0.5, "seed": 3, "logprobs": 3,
            "ignore_eos": True, "return_tokens_as_token_ids": True, "logit_bias": {"50": 3.0}}
    lp = ok(live, body)["choices"][0]["logprobs"]
    out = [token_id(t) for t in lp["tokens"]]
    ref = reference(ids, out, root / "a1")
    assert len(out) == 6 and lp["text_offset"][0] == 0
    for j, tok in enumerate(out):
        row = ref[len(ids) - 1 + j]
        assert lp["token_logprobs"][j] == pytest.approx(row[tok].item(), abs=1e-4)
        top = lp["top_logprobs"][j]
        values = list(top.values())[:3]
        assert values == sorted(values, reverse=True)
        best = row.topk(3)
        assert [token_id(k) for k in list(top)[:3]] == best.indices.tolist()
        assert list(top.values())[:3] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert f"token_id:{tok}" in top  # the chosen token always, even outside the top 3
    # the base model's logprobs differ: the adapter is in them
    base = reference(ids, out)
    assert abs(base[len(ids) - 1, out[0]].item() - lp["token_logprobs"][0]) > 1e-3


def test_chat_logprobs_and_top_logprobs(live):
    """Catches: chat's shape (content list with bytes), an unsorted top list, top_logprobs without logprobs."""
    messages = [{"role": "user", "content": "Hi"}]
    body = {"model": BASE, "messages": messages, "max_tokens": 4, "temperature": 1.0, "seed": 0, "logprobs": True,
            "top_logprobs": 5, "ignore_eos": True, "return_tokens_as_token_ids": True}
    content = ok(live, body, "/v1/chat/completions")["choices"][0]["logprobs"]["content"]
    ids = chat_prompt(live.engine.tokenizer, [ChatMessage(**m) for m in messages])
    out = [token_id(c["token"]) for c in content]
    ref = reference(ids, out)
    for j, c in enumerate(content):
        row = ref[len(ids) - 1 + j]
        assert c["logprob"] == pytest.approx(row[out[j]].item(), abs=1e-4)
        assert [token_id(t["token"]) for t in c["top_logprobs"]] == row.topk(5).indices.tolist()
        values = [t["logprob"] for t in c["top_logprobs"]]
        assert values == sorted(values, reverse=True) and len(values) == 5
        assert isinstance(c["bytes"], list)
    plain = {**body, "return_tokens_as_token_ids": False, "temperature": 0}
    first = ok(live, plain, "/v1/chat/completions")["choices"][0]
    assert len(first["logprobs"]["content"]) == 4 and not first["logprobs"]["content"][0]["token"].startswith("token_id:")
    refused(live, {**body, "logprobs": False}, "top_logprobs", "/v1/chat/completions")
    refused(live, {**body, "top_logprobs": 21}, "top_logprobs", "/v1/chat/completions")
    assert ok(live, {**plain, "logprobs": False, "top_logprobs": 0}, "/v1/chat/completions")["choices"][0]["logprobs"] is None


def test_echo_prepends_the_prompt_and_scores_it(live):
    """Catches: echo ignored, a first prompt token given a logprob, prompt logprobs off by one position."""
    ids = prompt_ids(live, "Echo me")
    plain = ok(live, {"model": BASE, "prompt": "Echo me", "max_tokens": 3, "temperature": 0, "ignore_eos": True})
    body = {"model": BASE, "prompt": "Echo me", "max_tokens": 3, "temperature": 0, "ignore_eos": True, "echo": True,
            "logprobs": 2, "return_tokens_as_token_ids": True}
    choice = ok(live, body)["choices"][0]
    assert choice["text"] == "Echo me" + plain["choices"][0]["text"]
    lp = choice["logprobs"]
    assert [token_id(t) for t in lp["tokens"][:len(ids)]] == ids and len(lp["tokens"]) == len(ids) + 3
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref = reference(ids, [token_id(t) for t in lp["tokens"][len(ids):]])
    for j in range(1, len(ids) + 3):
        tok = token_id(lp["tokens"][j])
        assert lp["token_logprobs"][j] == pytest.approx(ref[j - 1, tok].item(), abs=1e-4), j
        assert [token_id(k) for k in list(lp["top_logprobs"][j])[:2]] == ref[j - 1].topk(2).indices.tolist()
    assert lp["text_offset"][len(ids)] == len("Echo me")  # after the echoed prompt (<bos> has no text)
    streamed = stream(live, {**body, "stream": True, "logprobs": None})
    assert streamed[0]["choices"][0]["text"] == "Echo me"
    assert "".join(c["choices"][0]["text"] for c in streamed if c["choices"]) == choice["text"]


def stream(live, body, path="/v1/completions"):
    """The data events of a streamed answer, up to [DONE]."""
    events = []
    with httpx.stream("POST", live.url + path, json=body, headers=AUTH, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                if line == "data: [DONE]":
                    return events
                events.append(json.loads(line[6:]))
    raise AssertionError("no [DONE]")


def test_n_samples_are_independent_and_reproducible_with_a_seed(live):
    """Catches: n copies of one sample, a seed ignored for n > 1, usage of one choice only, choices mixed up."""
    body = {"model": "a0", "prompt": "Once", "max_tokens": 8, "temperature": 1.0, "seed": 42, "n": 3, "ignore_eos": True}
    first = ok(live, body)
    texts = [c["text"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2] and len(set(texts)) > 1
    assert [c["text"] for c in ok(live, body)["choices"]] == texts
    assert first["usage"]["completion_tokens"] == 24 and first["usage"]["prompt_tokens"] == len(prompt_ids(live, "Once"))
    # choice i is the request seeded with seed + i (vLLM's rule)
    assert ok(live, {**body, "n": 1, "seed": 43})["choices"][0]["text"] == texts[1]
    events = stream(live, {**body, "stream": True, "stream_options": {"include_usage": True}})
    parts = ["", "", ""]
    for e in events[:-1]:
        assert e["usage"] is None and len(e["choices"]) == 1
        parts[e["choices"][0]["index"]] += e["choices"][0]["text"]
    assert parts == texts
    assert events[-1]["choices"] == [] and events[-1]["usage"] == first["usage"]
    without = stream(live, {**body, "stream": True})
    assert all("usage" not in e for e in without) and all(e["choices"] for e in without)
    for n in (0, 17, True):
        refused(live, {**body, "n": n}, "n")


def test_streamed_logprobs_equal_the_whole_answer(live):
    """Catches: chunks that repeat or drop tokens' logprobs, text offsets that restart at every chunk."""
    body = {"model": "a1", "prompt": "Stream", "max_tokens": 7, "temperature": 0.9, "seed": 4, "logprobs": 2,
            "ignore_eos": True, "return_tokens_as_token_ids": True}
    whole = ok(live, body)["choices"][0]["logprobs"]
    events = stream(live, {**body, "stream": True})
    joined = {k: [v for e in events for v in e["choices"][0]["logprobs"][k]] for k in whole}
    assert joined == whole
    chat = {"model": "a1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0.9,
            "seed": 4, "logprobs": True, "top_logprobs": 2, "ignore_eos": True}
    content = ok(live, chat, "/v1/chat/completions")["choices"][0]["logprobs"]["content"]
    parts = stream(live, {**chat, "stream": True}, "/v1/chat/completions")
    assert [c for e in parts if e["choices"][0]["logprobs"] for c in e["choices"][0]["logprobs"]["content"]] == content


def test_stream_options_need_a_stream_and_a_boolean(live):
    """Catches: stream_options accepted (and ignored) on a non-streamed request, a non-boolean include_usage."""
    body = {"model": BASE, "prompt": "x", "max_tokens": 2}
    refused(live, {**body, "stream_options": {"include_usage": True}}, "stream_options")
    refused(live, {**body, "stream": True, "stream_options": {"include_usage": "yes"}}, "include_usage")


def test_logit_bias_forces_and_bans_tokens(live):
    """Catches: bias ignored, bias applied to greedy rows only (or sampled only), bias keys read as positions,
    bias leaking into the reported logprobs, out-of-range keys and values accepted."""
    body = {"model": "a0", "prompt": "Bias", "max_tokens": 6, "ignore_eos": True, "return_tokens_as_token_ids": True,
            "logprobs": 0}
    greedy = ok(live, {**body, "temperature": 0})["choices"][0]["logprobs"]
    greedy_ids = [token_id(t) for t in greedy["tokens"]]
    for temperature in (0, 1.0):
        forced = ok(live, {**body, "temperature": temperature, "seed": 1, "logit_bias": {"77": 100}})
        lp = forced["choices"][0]["logprobs"]
        assert [token_id(t) for t in lp["tokens"]] == [77] * 6
        assert lp["token_logprobs"][0] < -1  # the model's own logprob, not the biased one (~0)
        banned = ok(live, {**body, "temperature": temperature, "seed": 1,
                           "logit_bias": {str(t): -100 for t in set(greedy_ids)}})["choices"][0]["logprobs"]
        assert not set(token_id(t) for t in banned["tokens"]) & set(greedy_ids)
    for bias in ({"abc": 1}, {"-1": 1}, {"260": 1}, {"1" * 5000: 1}, {"5": 101}, {"5": -100.5},
                 {str(i): 1 for i in range(301)}):
        refused(live, {**body, "logit_bias": bias}, "logit_bias")
    r = httpx.post(live.url + "/v1/completions", content=b'{"model": "a0", "prompt": "x", "logit_bias": {"5": NaN}}',
                   headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 400 and "logit_bias" in r.text


SCHEMA = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "name": {"type": "string", "maxLength": 4},
                                           "ok": {"type": "boolean"}},
          "required": ["id", "name", "ok"], "additionalProperties": False}


def test_response_format_json_schema_output_validates(live):
    """Catches: response_format ignored, a mask that lets invalid tokens through, a request that runs on after the
    document is complete, bad schemas accepted."""
    fmt = {"type": "json_schema", "json_schema": {"name": "item", "schema": SCHEMA}}
    for seed in range(3):
        body = {"model": "a0", "prompt": "JSON:", "max_tokens": 80, "temperature": 1.0, "seed": seed}
        free = ok(live, {**body, "ignore_eos": True})["choices"][0]["text"]
        with pytest.raises(ValueError):
            json.loads(free)
        choice = ok(live, {**body, "response_format": fmt})["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["text"]), SCHEMA)
    chat = ok(live, {"model": BASE, "messages": [{"role": "user", "content": "give json"}], "max_tokens": 80,
                     "temperature": 0.8, "seed": 5, "response_format": fmt}, "/v1/chat/completions")
    jsonschema.validate(json.loads(chat["choices"][0]["message"]["content"]), SCHEMA)
    close = str(live.engine.tokenizer("}", add_special_tokens=False)["input_ids"][0])
    obj = ok(live, {"model": "a0", "prompt": "x", "max_tokens": 20, "temperature": 0, "ignore_eos": True,
                    "response_format": {"type": "json_object"}, "logit_bias": {close: 100}})["choices"][0]
    assert obj["text"] == "{}" and obj["finish_reason"] == "stop"  # the mask held '}' back until '{'; then stopped
    for bad in ({"type": "json_schema"}, {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}},
                {"type": "xml"}, {"type": "json_object", "json_schema": {"name": "x", "schema": {}}},
                {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "extra": 1}}):
        refused(live, {"model": "a0", "prompt": "x", "response_format": bad}, "response_format")


def test_tokenize_and_detokenize(live):
    """Catches: vLLM's shapes wrong, add_special_tokens or add_generation_prompt ignored, ids out of range
    accepted, unknown models accepted."""
    tok = live.engine.tokenizer
    r = ok(live, {"model": BASE, "prompt": "Héllo", "return_token_strs": True}, "/tokenize")
    assert r["tokens"] == tok("Héllo")["input_ids"] and r["count"] == len(r["tokens"]) and r["max_model_len"] == 128
    assert r["token_strs"] == tok.convert_ids_to_tokens(r["tokens"])
    assert ok(live, {"prompt": "Héllo", "add_special_tokens": False}, "/tokenize")["tokens"] == r["tokens"][1:]
    messages = [{"role": "user", "content": "Hi"}]
    chat = ok(live, {"model": "a0", "messages": messages}, "/tokenize")
    done = ok(live, {"model": "a0", "messages": messages, "max_tokens": 1}, "/v1/chat/completions")
    assert chat["count"] == done["usage"]["prompt_tokens"]
    assert ok(live, {"messages": messages, "add_generation_prompt": False}, "/tokenize")["count"] < chat["count"]
    assert ok(live, {"model": BASE, "tokens": r["tokens"]}, "/detokenize") == {"prompt": tok.decode(r["tokens"])}
    assert "Héllo" in ok(live, {"tokens": r["tokens"]}, "/detokenize")["prompt"]
    refused(live, {"model": "nope", "prompt": "x"}, "nope", "/tokenize", 404)
    refused(live, {"prompt": "x", "messages": messages}, "prompt", "/tokenize")
    refused(live, {"prompt": "x", "truncate": 5}, "truncate", "/tokenize")
    refused(live, {"tokens": [0, 260]}, "tokens", "/detokenize")
    refused(live, {"tokens": [-1]}, "tokens", "/detokenize")
    refused(live, {"tokens": [1.5]}, "tokens", "/detokenize")


def metric_samples(live) -> dict:
    text = httpx.get(live.url + "/metrics", headers=AUTH).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_per_adapter_counters_in_metrics(live, root):
    """Catches: counters not per adapter, token counts not matching usage, names of unknown adapters becoming
    labels, unescaped label values."""
    before = metric_samples(live)
    used = {"a0": 0, "a1": 0}
    for name in ("a0", "a0", "a1"):
        used[name] += ok(live, {"model": name, "prompt": "count me", "max_tokens": 3, "ignore_eos": True})["usage"]["completion_tokens"]
    assert post(live, {"model": "stranger", "prompt": "x"}).status_code == 404
    after = metric_samples(live)

    def delta(metric, name):
        key = f'lorakit_adapter_{metric}_total{{kind="adapter",adapter="{name}"}}'
        return after[key] - before.get(key, 0)

    assert delta("requests", "a0") == 2 and delta("requests", "a1") == 1
    assert delta("generation_tokens", "a0") == used["a0"] and delta("generation_tokens", "a1") == used["a1"]
    assert delta("prompt_tokens", "a0") == 2 * len(prompt_ids(live, "count me"))
    assert not any("stranger" in k for k in after)
    weird = 'we"ird\\name'
    r = httpx.post(live.url + "/v1/load_lora_adapter", json={"lora_name": weird, "lora_path": "a0"}, headers=AUTH)
    assert r.status_code == 200, r.text
    ok(live, {"model": weird, "prompt": "x", "max_tokens": 1})
    text = httpx.get(live.url + "/metrics", headers=AUTH).text
    assert 'adapter="we\\"ird\\\\name"' in text
    for line in text.splitlines():  # every sample line parses as name{labels} value
        assert line.startswith("#") or re.fullmatch(r'[a-z_]+(\{(\w+="([^"\\]|\\.)*",?)+\})? \S+', line), line


def test_adapter_labels_are_bounded(root):
    """Catches: one label per adapter without a bound (1,000 adapters, or clients loading names at will)."""
    engine = make_engine(root, max_adapter_labels=1)
    server = LiveServer(engine)
    try:
        for name in ("a0", "a1", "a1", BASE):
            ok(server, {"model": name, "prompt": "x", "max_tokens": 1})
        samples = metric_samples(server)
        assert samples['lorakit_adapter_requests_total{kind="adapter",adapter="a0"}'] == 1
        assert samples['lorakit_adapter_requests_total{kind="other",adapter=""}'] == 2
        assert samples['lorakit_adapter_requests_total{kind="base",adapter=""}'] == 1
        assert not any('adapter="a1"' in k for k in samples)
    finally:
        server.close()
