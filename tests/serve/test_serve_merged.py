"""Per-request merged adapters (LoRAX's ``merged_adapters``) over loopback HTTP: the answer equals serving the
adapter that ``lorakit.merging.combine`` writes, equal specs share one cached merge, every field is validated, and
the cache's policy keeps reused merges when a client floods it with one-off specs."""

import json

import httpx
import pytest
import torch

from lorakit import load_state, save_state
from lorakit.merging import combine
from lorakit.serve.combos import MergeCache, MergeSpec
from lorakit.serve.request import QueueFull

from test_serve_api import AUTH, metric_samples, ok, post, reference, refused, token_id
from serve_helpers import make_adapter
from test_serve_http import BASE, LiveServer, make_engine


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for i, r in enumerate([4, 8, 4]):
        make_adapter(root / f"a{i}", BASE, r=r, seed=10 + i)
    (root / "corrupt").mkdir()
    (root / "corrupt" / "adapter_config.json").write_text((root / "a0" / "adapter_config.json").read_text())
    (root / "corrupt" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    return root


@pytest.fixture(scope="module")
def live(root):
    server = LiveServer(make_engine(root))
    yield server
    server.close()


BODY = {"model": BASE, "prompt": "Merge", "max_tokens": 6, "temperature": 0, "logprobs": 2, "ignore_eos": True,
        "return_tokens_as_token_ids": True}


def merged(ids, weights=None, strategy="linear"):
    return {**BODY, "merged_adapters": {"ids": ids, "weights": weights, "merge_strategy": strategy}}


def tokens_and_logprobs(answer):
    lp = answer["choices"][0]["logprobs"]
    return [token_id(t) for t in lp["tokens"]], lp["token_logprobs"]


def test_a_merged_request_equals_serving_the_merged_adapter(live, root, tmp_path):
    """Catches: weights ignored or not normalised (linear), one adapter served instead of the merge, a merge of
    A and B separately (PEFT's linear, with cross terms), a scale applied twice."""
    for strategy, weights in (("linear", [0.3, 0.7]), ("task_arithmetic", [1.5, -0.5])):
        state = combine([load_state(root / "a0"), load_state(root / "a1")], strategy, weights)
        save_state(state, tmp_path / strategy)
        tokens, logprobs = tokens_and_logprobs(ok(live, merged(["a0", "a1"], weights, strategy)))
        ids = live.engine.tokenizer("Merge")["input_ids"]
        ref = reference(ids, tokens, tmp_path / strategy)
        assert tokens == ref[len(ids) - 1:-1].argmax(-1).tolist()  # greedy under the merged adapter
        expected = [ref[len(ids) - 1 + j, t].item() for j, t in enumerate(tokens)]
        assert logprobs == pytest.approx(expected, abs=1e-4), strategy
        alone = reference(ids, tokens, root / "a1")
        assert abs(alone[len(ids) - 1, tokens[0]].item() - logprobs[0]) > 1e-3
    # weight 1 on one adapter and 0 on the other is that adapter
    one_tokens, one_logprobs = tokens_and_logprobs(ok(live, merged(["a0", "a2"], [1.0, 0.0])))
    a0_tokens, a0_logprobs = tokens_and_logprobs(ok(live, {**BODY, "model": "a0"}))
    assert one_tokens == a0_tokens and one_logprobs == pytest.approx(a0_logprobs, abs=1e-5)


def test_equal_specs_share_one_cached_merge(live):
    """Catches: a merge rebuilt for every request, specs keyed by their spelling (order, scale of linear weights,
    strategy name) instead of their update."""
    before = metric_samples(live)
    first = ok(live, merged(["a1", "a2"], [1.0, 3.0]))
    same = [merged(["a2", "a1"], [3.0, 1.0]), merged(["a1", "a2"], [0.25, 0.75]),
            merged(["a1", "a2"], [0.25, 0.75], "task_arithmetic"), merged(["a2", "a1"], [0.75, 0.25], "cat")]
    for body in same:
        again = ok(live, body)
        assert tokens_and_logprobs(again)[0] == tokens_and_logprobs(first)[0]
        assert tokens_and_logprobs(again)[1] == pytest.approx(tokens_and_logprobs(first)[1], abs=1e-5)
    after = metric_samples(live)
    grew = {k: after[k] - before.get(k, 0) for k in after if k.startswith("lorakit_merged_adapter")}
    assert grew['lorakit_merged_adapter_cache_total{result="misses"}'] == 1
    assert grew['lorakit_merged_adapter_cache_total{result="hits"}'] == 4
    assert grew["lorakit_merged_adapter_builds_total"] == 1
    assert after['lorakit_adapter_requests_total{kind="merged",adapter=""}'] >= 5
    assert not any("a1" in k and "merged" in k for k in after)  # merged requests do not make labels per spec


def test_merged_adapters_are_validated(live):
    """Catches: unknown names, strategies that are not exact, unbounded or non-finite weights, too many adapters,
    duplicates, and a merge that names an adapter in model too."""
    refused(live, merged(["a0", "ghost"]), "ghost", status=404)
    refused(live, merged(["a0", "a1"], strategy="ties"), "merge_strategy")
    refused(live, merged(["a0", "a1"], strategy="svd"), "merge_strategy")
    refused(live, merged(["a0", "a1"], [1.0]), "weights")
    refused(live, merged(["a0", "a1"], [1.0, 1e9]), "weights")
    refused(live, merged(["a0", "a1"], [1.0, -1.0]), "weights")  # linear: divides by a zero sum
    refused(live, merged(["a0", "a0"]), "ids")
    refused(live, merged([f"a{i % 3}" for i in range(9)]), "ids")
    refused(live, merged([]), "ids")
    refused(live, {**merged(["a0", "a1"]), "model": "a0"}, "model")
    body = merged(["a0", "a1"])
    for extra, param in (({"density": 0.5}, "density"), ({"majority_sign_method": "frequency"}, "majority_sign_method"),
                         ({"adapter_source": "hub"}, "adapter_source")):
        refused(live, {**body, "merged_adapters": {**body["merged_adapters"], **extra}}, param)
    raw = json.dumps(body).replace('"weights": null', '"weights": [NaN, 1]').encode()
    r = httpx.post(live.url + "/v1/completions", content=raw, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 400 and "weights" in r.text
    failed = post(live, merged(["a0", "corrupt"]))
    assert failed.status_code == 400 and "adapter 'corrupt' cannot be loaded" in failed.json()["error"]["message"]
    assert ok(live, {**BODY, "model": "a0"})["choices"][0]["finish_reason"] == "length"  # the others keep serving


def test_evicted_merges_leave_the_store_and_the_pool(root):
    """Catches: an eviction that deadlocks the engine (it retires the merge while a submission runs), evicted
    merges kept in the host cache or the pool, an evicted spec that cannot be built again."""
    server = LiveServer(make_engine(root, max_merged=2))  # 1 place on probation, 1 protected
    try:
        specs = [(["a0", "a1"], [1.0, 2.0]), (["a0", "a2"], [1.0, 2.0]), (["a1", "a2"], [1.0, 2.0])]
        first = [tokens_and_logprobs(ok(server, merged(ids, w))) for ids, w in specs]
        engine = server.engine
        assert engine.merges.stats["evictions"] == 2 and len(engine.merges) == 1
        live_merges = {a for a in engine.pool.home if a.startswith("merge:")} | {a for a in engine.store.host if a.startswith("merge:")}
        assert live_merges <= set(engine.merges.probation) | set(engine.merges.protected)
        again = tokens_and_logprobs(ok(server, merged(*specs[0])))
        assert again[0] == first[0][0] and again[1] == pytest.approx(first[0][1], abs=1e-5)
        assert engine.merges.stats["builds"] == 4
    finally:
        server.close()


class FakeStore:
    dtype = torch.float32

    def __init__(self):
        self.derived, self.forgotten = set(), []

    def derive(self, aid, components, build):
        self.derived.add(aid)

    def forget(self, aid):
        self.derived.discard(aid)
        self.forgotten.append(aid)


def spec(i: int) -> MergeSpec:
    return MergeSpec(((f"x#{i}", 0.5), (f"y#{i}", 0.5)))


def test_cache_policy_protects_reused_merges_and_never_evicts_one_in_use():
    """Catches: plain LRU (a flood of one-off specs evicts the reused ones), eviction of a merge that queued or
    running requests use, an unbounded cache."""
    store, dropped = FakeStore(), []
    cache = MergeCache(store, capacity=8, on_evict=dropped.append)  # 2 on probation, 6 protected
    reused = [spec(i) for i in range(3)]
    for s in reused:  # each asked for again while still on probation
        cache.release(cache.acquire(s))
        cache.release(cache.acquire(s))
    for i in range(100, 300):  # one-off specs
        cache.release(cache.acquire(spec(i)))
        assert len(cache) <= 8
    assert all(s.aid in cache.protected for s in reused)
    assert not {s.aid for s in reused} & set(store.forgotten) and dropped == store.forgotten
    assert cache.stats["evictions"] == 198
    # in use: never evicted; when every probation entry is in use, a new spec is refused
    held = [cache.acquire(spec(i)) for i in (400, 401)]
    with pytest.raises(QueueFull):
        cache.acquire(spec(402))
    cache.release(held[0])
    third = cache.acquire(spec(402))
    assert held[0] in store.forgotten and held[1] in cache.probation
    cache.release(held[1])
    cache.release(third)
    # a full protected segment demotes its least recently used entry instead of dropping it
    for i in range(500, 506):
        s = spec(i)
        cache.release(cache.acquire(s))
        cache.release(cache.acquire(s))
    assert len(cache.protected) == 6 and len(cache) == 8
    assert reused[0].aid not in cache.protected and spec(505).aid in cache.protected
    with pytest.raises(ValueError):
        MergeCache(store, capacity=1)
