"""A bounded load test over loopback: concurrent clients (another process) cycle through 1,000 adapters (mixed
ranks) for a fixed number of requests or seconds, whichever comes first; no request may fail, and adapter memory
must stay within the pool and host budgets while the pool (room for about 64 of them) keeps evicting."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from lorakit import AdapterState, LoRAConfig, save_state
from test_serve_http import LiveServer, make_engine

CLIENTS = 48
MAX_SECONDS = 120
MODULES = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "k_proj", "v_proj", "o_proj")]


def write_adapters(root, n):
    """``n`` rank-{4,8,16} PEFT directories for byte-llama, written straight from random factors."""
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        r = (4, 8, 16)[i % 3]
        config = LoRAConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        tensors = {m: {"lora_A.weight": torch.randn(r, 64, generator=g) * 0.1,
                       "lora_B.weight": torch.randn(64 if m.endswith(("q_proj", "o_proj")) else 32, r, generator=g) * 0.1}
                   for m in MODULES}
        save_state(AdapterState(config, tensors), root / f"ad{i:04d}")


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("n_adapters,pool_room", [(200, 16), (1000, 64)])
def test_concurrent_clients_cycle_through_many_adapters(tmp_path, n_adapters, pool_room):
    """1,000 adapters through a 64-adapter pool (about a minute here), and 200 through a smaller one."""
    write_adapters(tmp_path, n_adapters)
    rank8 = sum(2 * 64 * 8 * 4 for _ in MODULES)  # one rank-8 adapter in table layout (upper bound: k, v are 32 wide)
    pool_budget, host_budget = pool_room * rank8, 2 * pool_room * rank8
    live = LiveServer(make_engine(tmp_path, max_batch=32, max_len=64, pool_bytes=pool_budget, host_bytes=host_budget,
                                  max_queue=4096), api_key=None)
    engine = live.engine
    peaks = {"pool": 0, "host": 0, "rss": 0}
    watching = threading.Event()

    def watch():  # the budgets hold at every moment, not only at the end
        while not watching.is_set():
            peaks["pool"] = max(peaks["pool"], engine.pool.used_bytes)
            peaks["host"] = max(peaks["host"], engine.store.host_bytes)
            peaks["rss"] = max(peaks["rss"], rss_bytes())
            time.sleep(0.002)

    warm = rss_bytes()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        done = subprocess.run([sys.executable, str(Path(__file__).with_name("load_client.py")), live.url, str(n_adapters),
                               str(CLIENTS), str(MAX_SECONDS)], capture_output=True, text=True, timeout=MAX_SECONDS + 120)
        metrics = httpx.get(live.url + "/metrics").text
    finally:
        watching.set()
        live.close()
    summary = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else pytest.fail(done.stderr[-2000:])
    assert not summary["failures"], summary["failures"][:3]
    assert summary["ok"] == n_adapters, f"{summary['ok']} of {n_adapters} adapters served in {summary['seconds']:.0f} s"
    assert peaks["pool"] <= pool_budget and peaks["host"] <= host_budget, (peaks, pool_budget, host_budget)
    stats = engine.pool.stats
    assert stats["activations"] >= n_adapters and stats["evictions"] == stats["activations"] - len(engine.pool.home)
    assert len(engine.pool.home) < 2 * pool_room and engine.stats["failed"] == 0
    assert "lorakit_pool_evictions_total" in metrics
    # the pool and host tiers are capped, so memory does not grow with the adapters cycled: the KV cache
    # (max_batch x max_len, under 1 MiB here) and step buffers are all that may appear after warm-up
    assert peaks["rss"] - warm < 64 << 20, (peaks["rss"] - warm) / 2**20
