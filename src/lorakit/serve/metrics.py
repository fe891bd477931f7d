"""The engine's state in Prometheus' text exposition format (version 0.0.4), for ``GET /metrics``.

Per-adapter counters (requests, prompt tokens, generated tokens) carry two labels, ``kind`` and ``adapter``:
``kind="base"`` for the base model, ``kind="adapter"`` with the adapter's name for the first ``limit`` registered
adapters that get a request (default 256), ``kind="other"`` for every later one, and ``kind="merged"`` for every
per-request merge whatever its adapters. A name a client sends that does not exist is refused (404) before it is
counted, and labels are never dropped, so the number of series is at most ``limit + 3`` per counter, however
many adapters are loaded, unloaded or made up. Label values are escaped (backslash, double quote, newline).
"""
from __future__ import annotations

import threading
import time

COUNTERS = ("requests", "prompt_tokens", "generation_tokens")


class AdapterCounters:
    """Per-adapter counters under a bounded label set (see the module docstring)."""

    def __init__(self, limit: int = 256):
        self.limit = limit
        self.rows: dict[tuple[str, str], list[int]] = {}
        self._named = 0
        self._lock = threading.Lock()

    def label(self, request) -> tuple[str, str]:
        """(kind, adapter) of a request whose adapter exists."""
        if request.merge is not None:
            return ("merged", "")
        if request.adapter is None:
            return ("base", "")
        key = ("adapter", request.adapter)
        with self._lock:
            if key in self.rows:
                return key
            if self._named < self.limit:
                self._named += 1
                self.rows[key] = [0, 0, 0]
                return key
        return ("other", "")

    def add(self, label: tuple[str, str], requests: int = 0, prompt: int = 0, generated: int = 0) -> None:
        with self._lock:
            row = self.rows.setdefault(label, [0, 0, 0])
            row[0] += requests
            row[1] += prompt
            row[2] += generated

    def samples(self, which: int) -> dict:
        with self._lock:
            return {(("kind", k), ("adapter", a)): row[which] for (k, a), row in sorted(self.rows.items())}


def escape(value) -> str:
    """A Prometheus label value: backslash, double quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


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
        ("adapter_requests_total", "counter", "Requests accepted, per adapter.", engine.counters.samples(0)),
        ("adapter_prompt_tokens_total", "counter", "Prompt tokens prefilled, per adapter.", engine.counters.samples(1)),
        ("adapter_generation_tokens_total", "counter", "Tokens generated, per adapter.", engine.counters.samples(2)),
        ("merged_adapter_cache_total", "counter", "Per-request merges: specs found in the cache, new specs, evictions.",
         {(("result", k),): engine.merges.stats[k] for k in ("hits", "misses", "evictions")}),
        ("merged_adapter_builds_total", "counter", "Merged adapters computed.", {(): engine.merges.stats["builds"]}),
        ("merged_adapters", "gauge", "Merged adapter specs the cache holds.", {(): len(engine.merges)}),
    ]
    out = []
    for name, kind, doc, samples in rows:
        out += [f"# HELP lorakit_{name} {doc}", f"# TYPE lorakit_{name} {kind}"]
        for labels, value in samples.items():
            label = "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels) + "}" if labels else ""
            out.append(f"lorakit_{name}{label} {float(value):.6g}" if isinstance(value, float) else f"lorakit_{name}{label} {value}")
    return "\n".join(out) + "\n"
