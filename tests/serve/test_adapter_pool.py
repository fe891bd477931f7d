"""Residency: the active pool's byte budget, reference counts and LRU; the host cache and its prefetch thread."""

import random

import pytest
import torch

from lorakit.serve import AdapterPool, AdapterStore, PackedAdapter, PoolFull
from lorakit.serve.ops import pack_low_rank
from lorakit.serve.store import linear_shapes

from serve_helpers import load_model, make_adapter

MODULES = {"l0.q": (16, 16), "l0.v": (16, 8)}


def packed(aid, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    mods = {p: pack_low_rank(torch.randn(r, i, generator=g), torch.randn(o, r, generator=g), 2.0, torch.float32)
            for p, (i, o) in MODULES.items()}
    return PackedAdapter(aid, mods)


def assert_tables_hold(pool, adapters):
    """Every resident adapter's slot holds its own weights; the in-use ones are the prefix."""
    for aid, cls in pool.home.items():
        slot = cls.ids.index(aid)
        for path, (at, bt) in adapters[aid].modules().items():
            assert torch.equal(cls.tables[path][0][slot], at) and torch.equal(cls.tables[path][1][slot], bt)
        assert (slot < cls.active) == (pool.refs[aid] > 0)


def test_budget_refcounts_and_contents_under_random_traffic():
    one = {r: packed("x", r).nbytes for r in (4, 8, 16)}
    pool = AdapterPool(budget_bytes=one[8] * 6)
    adapters = {f"a{i}": packed(f"a{i}", random.Random(i).choice([4, 8, 16]), seed=i) for i in range(40)}
    rng = random.Random(0)
    held: list[str] = []
    for _ in range(400):
        if held and rng.random() < 0.45:
            pool.release(held.pop(rng.randrange(len(held))))
        else:
            a = adapters[rng.choice(list(adapters))]
            if not pool.fits(a):
                with pytest.raises(PoolFull):
                    pool.activate(a)
                continue
            pool.activate(a)
            pool.acquire(a.aid)
            held.append(a.aid)
        assert pool.used_bytes <= pool.budget
        assert all(aid in pool for aid in held), "an adapter in use was evicted"
        assert_tables_hold(pool, adapters)
    assert pool.stats["evictions"] > 10 and len({len(k) for k in pool.classes}) >= 1


def test_least_recently_used_idle_adapter_goes_first():
    pool = AdapterPool(budget_bytes=packed("x", 8).nbytes * 3)
    for name in ("a", "b", "c"):
        pool.activate(packed(name, 8))
    pool.acquire("a")
    pool.release("a")  # a is now the most recently used
    pool.activate(packed("d", 8))
    assert "b" not in pool and {"a", "c", "d"} <= set(pool.home)


def test_full_of_adapters_in_use_refuses_and_admission_says_so():
    pool = AdapterPool(budget_bytes=packed("x", 8).nbytes * 2)
    for name in ("a", "b"):
        pool.activate(packed(name, 8))
        pool.acquire(name)
    extra = packed("c", 8)
    assert not pool.fits(extra)
    with pytest.raises(PoolFull, match="adapters in use"):
        pool.activate(extra)
    pool.release("b")
    assert pool.fits(extra)
    pool.activate(extra)
    assert "b" not in pool and "c" in pool
    with pytest.raises(PoolFull, match="whole pool budget"):
        AdapterPool(budget_bytes=100).activate(extra)


def test_dropping_an_adapter_in_use_waits_for_its_last_request():
    pool = AdapterPool(budget_bytes=1 << 20)
    pool.activate(packed("a", 8))
    pool.acquire("a")
    pool.drop("a")
    assert "a" in pool
    pool.release("a")
    assert "a" not in pool and not pool.classes


def test_other_classes_shrink_to_make_room():
    small, big = packed("s", 4), packed("b", 16)
    pool = AdapterPool(budget_bytes=small.nbytes * 4 + big.nbytes)
    for i in range(4):
        pool.activate(packed(f"s{i}", 4))
    pool.activate(big)
    pool.acquire("b")  # in use, so the same-class victim rule cannot apply
    pool.activate(packed("b2", 16))  # needs a second rank-16 slot: rank-4 adapters are evicted, their table shrinks
    assert {"b", "b2"} <= set(pool.home) and pool.used_bytes <= pool.budget
    assert small.key not in pool.classes and pool.stats["evictions"] == 4  # a rank-16 slot costs four rank-4 ones


def test_store_prefetches_in_the_background_and_caps_the_host_cache(tmp_path):
    for i in range(3):
        make_adapter(tmp_path / f"a{i}", r=8, seed=i)
    model, _ = load_model("tiny-llama")
    store = AdapterStore(linear_shapes(model))
    assert store.scan(tmp_path) == ["a0", "a1", "a2"]
    aids = [store.entry(n).aid for n in store.names()]
    store.want(aids)
    with store.loaded:
        store.loaded.wait_for(lambda: all(a in store.host for a in aids), timeout=30)
    assert all(store.cached(a) is not None for a in aids) and store.stats["loads"] == 3
    store.host_budget = store.host[aids[0]].nbytes * 2
    store.register("a0", tmp_path / "a1")  # a new version of a0: its id changes
    store.load(store.entry("a0").aid)
    assert len(store.host) == 2 and store.stats["host_evictions"] >= 1
    assert store.entry("a0").aid not in aids
    store.close()
