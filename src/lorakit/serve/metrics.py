"""The engine's state in Prometheus' text exposition format (version 0.0.4), for ``GET /metrics``."""
from __future__ import annotations

import time


def tokens_per_second(engine, window: float = 10.0) -> float:
    """Generated tokens per second over the last ``window`` seconds."""
    now = time.perf_counter()
    recent = [(t, n) for t, n in list(engine.token_log) if now - t <= window]
    return sum(n for _, n in recent) / window if recent else 0.0


def render(engine) -> str:
    """Queue, batch, adapter residency (pool and host tiers), loads and throughput of ``engine``."""
    s, pool, store = engine.stats, engine.pool, engine.store
    rows = [
        ("queue_length", "gauge", "Requests waiting for a slot.", {(): engine.queue_length}),
        ("running_requests", "gauge", "Requests in the running batch.", {(): len(engine.running)}),
        ("requests_total", "counter", "Requests by outcome.",
         {(("outcome", k),): s[k] for k in ("finished", "failed", "cancelled", "rejected")}),
        ("prompt_tokens_total", "counter", "Prompt tokens prefilled.", {(): s["prompt_tokens"]}),
        ("generation_tokens_total", "counter", "Tokens generated.", {(): s["generated_tokens"]}),
        ("tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.", {(): tokens_per_second(engine)}),
        ("steps_total", "counter", "Forward passes by kind.",
         {(("kind", "prefill"),): s["prefill_steps"], (("kind", "decode"),): s["decode_steps"]}),
        ("step_seconds_total", "counter", "Time spent in steps that ran a forward.", {(): s["step_seconds"]}),
        ("pool_hits_total", "counter", "Admissions whose adapter was already in the active pool.", {(): s["pool_hits"]}),
        ("pool_misses_total", "counter", "Admissions that copied their adapter into the active pool.", {(): s["pool_misses"]}),
        ("pool_evictions_total", "counter", "Adapters evicted from the active pool.", {(): pool.stats["evictions"]}),
        ("pool_bytes", "gauge", "Active pool bytes: budget, table capacity, resident adapters, adapters in use.",
         {(("kind", "budget"),): pool.budget, (("kind", "capacity"),): pool.used_bytes,
          (("kind", "resident"),): pool.resident_bytes, (("kind", "in_use"),): pool.in_use_bytes()}),
        ("pool_adapters", "gauge", "Adapters resident in the active pool.", {(): len(pool.home)}),
        ("host_cache_bytes", "gauge", "Bytes of packed adapters in the host cache.", {(): store.host_bytes}),
        ("host_cache_adapters", "gauge", "Adapters in the host cache.", {(): len(store.host)}),
        ("adapter_loads_total", "counter", "Adapters read from disk.", {(): store.stats["loads"]}),
        ("adapter_load_failures_total", "counter", "Adapter files that failed to load.", {(): store.stats["failures"]}),
        ("adapter_load_seconds_total", "counter", "Time spent reading adapters from disk.", {(): store.stats["load_seconds"]}),
        ("load_stall_seconds_total", "counter", "Time the step loop waited for adapter files with requests queued.",
         {(): s["load_stall_seconds"]}),
        ("sync_loads_total", "counter", "Adapter files read inside the step loop (prefetch off).", {(): s["sync_loads"]}),
        ("kv_cache_bytes", "gauge", "Bytes allocated for the KV cache.", {(): engine.runner.cache.nbytes}),
        ("registered_adapters", "gauge", "Adapters the server knows by name.", {(): len(store.names())}),
    ]
    out = []
    for name, kind, doc, samples in rows:
        out += [f"# HELP lorakit_{name} {doc}", f"# TYPE lorakit_{name} {kind}"]
        for labels, value in samples.items():
            label = "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else ""
            out.append(f"lorakit_{name}{label} {float(value):.6g}" if isinstance(value, float) else f"lorakit_{name}{label} {value}")
    return "\n".join(out) + "\n"
