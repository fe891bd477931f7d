"""Serving benchmark: lorakit's engine against PEFT's mixed-batch forward, a merge-and-swap server and the base model.

Follows SERVING.md section 6.3. A ~25M-parameter Llama built from a config (``llama-25m``, seeded weights) and real
PEFT directories written under runs/bench-serve/adapters/: 1,000 rank-8 adapters and a mixed-rank set (ranks 8,
16, 32, 64 round-robin), LoRA on q/k/v/o with random seeded factors (B non-zero). Seeded traces (Poisson arrivals,
Zipf or uniform adapter popularity, prompt and output lengths uniform in ranges, EOS ignored) are saved as JSONL
and replayed open-loop, request by request at their timestamps, against every system in one process; each system
has its own copy of the same weights and runs in the same engine loop, KV cache and scheduler
(``lorakit.serve.baselines``), so only the way adapters are applied differs. The active pool holds about 64
adapters (a byte budget), so the 1,000-adapter traces swap. Systems take turns round by round (the order reverses
every round: ABBA), and every number is the median over repeats. Also measured: decode steps alone (interleaved), a torch.profiler
table of one decode step, and greedy outputs compared with ``peft`` running each adapter alone.

vLLM's CPU build joins as two more systems when its Python is there (``--vllm``, default
/work/cache/vllm-venv/bin/python or ``$LORAKIT_VLLM_PYTHON``): ``vllm`` (LoRA on, every request's adapter) and
``vllm-base`` (no LoRA, the base model), each a long-lived ``bench/serve_vllm.py`` process on the same model
(saved to runs/bench-serve/llama-25m-hf), the same PEFT directories, the same trace files, one compute thread, 32
sequences at most; it takes its turn in the same ABBA rounds. Also measured for vLLM and lorakit alike, each in a
fresh process: start-up (process spawn to ready: imports, model, adapter scan, and vLLM's compilation) and the
time to first serve an adapter the server has never seen.

    HF_HUB_OFFLINE=1 python bench/serve.py [--quick] [--report-only] [--threads 1] [--vllm PYTHON | --no-vllm]
        [--device cpu|cuda|mps|auto]

writes docs/benchmarks/serving.md, .png and .json (``--quick``: runs/bench-serve/quick/; another device than the
CPU: runs/bench-serve/<device>/, where every system runs on that device and the peak device memory is recorded). Finished runs are kept
in the JSON, so an interrupted run resumes where it stopped, and ``--report-only`` re-renders the page.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import lorakit  # noqa: E402
from lorakit import zoo  # noqa: E402
from lorakit.core.state import AdapterState  # noqa: E402
from lorakit.serve import AdapterStore, Engine, EngineConfig, Request, SamplingParams  # noqa: E402
from lorakit.serve.baselines import MergedRunner, MergeSwapEngine, PeftMixedRunner  # noqa: E402
from lorakit.serve.store import linear_shapes  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, interleaved, load_average, machine, read_json, status_kib, write_json  # noqa: E402
from serve_report import render  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "bench-serve"
MODEL, TARGETS, SLOTS, MAX_LEN = "llama-25m", ["q_proj", "k_proj", "v_proj", "o_proj"], 32, 256
RANKS = (8, 16, 32, 64)
FULL = dict(requests=96, rate=16.0, in_len=(8, 128), out_len=(8, 64), repeats=3, adapters=1000, mixed=128,
            pool_adapters=64, scale=(5, 100, 1000), merge_repeats=2, scale_repeats=5, check=24, micro=30)
DEVICE = torch.device("cpu")  # --device: every system's model, pool and KV cache
VLLM_PYTHON = os.environ.get("LORAKIT_VLLM_PYTHON", "/work/cache/vllm-venv/bin/python")
QUICK = dict(FULL, requests=32, repeats=1, scale=(5, 1000), merge_repeats=1, scale_repeats=1, check=6, micro=5)


# -- adapters and traces ---------------------------------------------------------------------------------
def write_adapters(folder: Path, prefix: str, ranks: list[int], shapes: dict, seed: int) -> list[str]:
    """Real PEFT directories with seeded random factors (B non-zero), written once and kept."""
    spec = dict(ranks=ranks, seed=seed, targets=TARGETS, model=MODEL)
    names = [f"{prefix}{i:04d}" for i in range(len(ranks))]
    if read_json(folder / "spec.json") == spec:
        return names
    paths = [p for p in shapes if p.rsplit(".", 1)[-1] in TARGETS]
    gen = torch.Generator().manual_seed(seed)
    for name, r in zip(names, ranks):
        tensors = {}
        for p in paths:
            d_in, d_out = shapes[p]
            # |scale · B A x| stays about a quarter of |W x| for every rank: B's spread shrinks as sqrt(8 / r)
            tensors[p] = {"lora_A.weight": torch.randn(r, d_in, generator=gen) / d_in ** 0.5,
                          "lora_B.weight": torch.randn(d_out, r, generator=gen) * 0.02 * (8 / r) ** 0.5}
        config = lorakit.LoRAConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS)
        lorakit.save_state(AdapterState(config, tensors), folder / name)
    write_json(folder / "spec.json", spec)
    return names


def make_trace(names: list[str], n: int, rate: float, zipf: float | None, in_len, out_len, seed: int) -> list[dict]:
    """Poisson arrivals, Zipf(``zipf``) or uniform popularity over ``names``, uniform lengths; arrivals and
    lengths come from their own streams, so traces over different adapter sets differ only in the adapters."""
    gaps = np.random.default_rng([seed, 1]).exponential(1 / rate, n)
    arrivals = np.cumsum(gaps) - gaps[0]
    lengths = np.random.default_rng([seed, 2])
    prompt_lens, out_lens = lengths.integers(in_len[0], in_len[1] + 1, n), lengths.integers(out_len[0], out_len[1] + 1, n)
    tokens = np.random.default_rng([seed, 3])
    pick = np.random.default_rng([seed, 4])
    order = pick.permutation(len(names))  # which adapter is the most popular is itself drawn
    p = None if zipf is None else (1 / np.arange(1, len(names) + 1) ** zipf)
    ranks = pick.choice(len(names), n, p=None if p is None else p / p.sum())
    return [dict(t=float(arrivals[i]), adapter=names[order[ranks[i]]], max_tokens=int(out_lens[i]),
                 prompt=tokens.integers(3, 259, prompt_lens[i]).tolist()) for i in range(n)]


def save_trace(path: Path, trace: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in trace))


# -- systems ---------------------------------------------------------------------------------------------
class Systems:
    """One copy of the same base weights per system, and an engine per run."""

    def __init__(self, dirs: dict[str, Path]):
        self.dirs = dirs
        self.models, self.tok = {}, None
        for system in ("lorakit", "base", "peft", "merge"):
            self.models[system], self.tok = zoo.load(MODEL, "causal_lm")
            self.models[system].to(DEVICE)
        ref = self.models["base"].state_dict()
        assert all(torch.equal(ref[k], v) for m in self.models.values() for k, v in m.state_dict().items())
        self.shapes = linear_shapes(self.models["base"])
        self.peft = None
        self.peft_load = dict(adapters=0, seconds=0.0)
        self.hosts: dict[str, object] = {}  # adapter folder -> lorakit's host cache of packed adapters
        self.vllm: dict[str, Child] = {}

    def peft_model(self, names: list[str]):
        """The PeftModel holding every adapter a run needs (loaded once, kept across runs)."""
        from peft import PeftModel

        start = time.perf_counter()
        for name in names:
            path = str(self.dirs[name[0]] / name)
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.models["peft"], path, adapter_name=name).eval()
            elif name not in self.peft.peft_config:
                self.peft.load_adapter(path, adapter_name=name)
            else:
                continue
            self.peft_load["adapters"] += 1
        self.peft_load["seconds"] += time.perf_counter() - start
        return self.peft

    def engine(self, system: str, folder: Path, pool_bytes: int, names: list[str], backend: str = "auto", model=None) -> Engine:
        config = EngineConfig(max_batch=SLOTS, max_len=MAX_LEN, pool_bytes=pool_bytes, backend=backend)
        store = AdapterStore(self.shapes, prefetch=system == "lorakit", device=DEVICE)
        store.scan(folder)
        if system == "lorakit":  # the host cache outlives a run, as in a long-running server (and vLLM's CPU LoRA cache)
            store.host = self.hosts.setdefault(str(folder), store.host)
        model = model or self.models[system]
        if system == "peft":
            pm = self.peft_model(sorted(set(names)))
            return Engine(pm, self.tok, config, store, PeftMixedRunner(pm, store, SLOTS, MAX_LEN))
        if system == "merge":
            return MergeSwapEngine(model, self.tok, config, store, MergedRunner(model, store, SLOTS, MAX_LEN))
        return Engine(model, self.tok, config, store)

    @staticmethod
    def close(system: str, engine: Engine) -> None:
        engine.stop()
        if system == "merge":
            engine.runner._switch(None)  # the original weights back
        engine.runner.close()


class Child:
    """A long-lived benchmark process that answers JSON commands with ``@@ {...}`` lines."""

    def __init__(self, argv: list[str], log: Path):
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True,
                                     env=env, cwd=ROOT)
        self.ready = self.read()
        self.ready["spawn_to_ready_s"] = time.perf_counter() - start

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                return json.loads(line[3:])
        raise RuntimeError(f"benchmark child {self.proc.args[:3]} exited ({self.proc.wait()}); see its log")

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write('{"op": "quit"}\n')
            self.proc.stdin.close()
            self.proc.wait(timeout=120)


def vllm_result(reply: dict, trace: list[dict]) -> dict:
    """A vLLM replay in the shape of ``measure``'s rows (the fields vLLM's driver can see)."""
    return dict(reply, tpot_p50=None, slo={str(th): None for th in SLO}, outputs=reply["outputs"])


def startup_probe(model_dir: str, adapters: str) -> int:
    """``--probe-startup``: lorakit's start-up in this fresh process (as a server: model, engine, adapter scan), then
    answers ``first`` commands (the time to first serve an adapter) as ``bench/serve_vllm.py`` does."""
    torch.set_num_threads(1)
    model, tok = zoo.load(model_dir, "causal_lm")
    store = AdapterStore(linear_shapes(model))
    store.scan(Path(adapters))
    engine = Engine(model, tok, EngineConfig(max_batch=SLOTS, max_len=MAX_LEN), store).start()
    print("@@ " + json.dumps(dict(ready=True, startup_cpu_s=time.process_time(), threads=torch.get_num_threads())), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] != "first":
            break
        t = time.perf_counter()
        engine.submit(Request([1, 5, 6, 7], cmd["adapter"], SamplingParams(max_tokens=1, temperature=0))).done.wait()
        print("@@ " + json.dumps(dict(first_s=time.perf_counter() - t)), flush=True)
    engine.stop()
    return 0


def startup(python: str, script: list[str], unseen: list[str], log: Path) -> dict:
    """Spawn-to-ready seconds, then the first serve of a never-seen adapter (after one other, which warms the
    process's first forward), in a fresh process."""
    child = Child([python, *script], log)
    try:
        return dict(child.ready, first_s=[child.ask(op="first", adapter=a)["first_s"] for a in unseen][-1])
    finally:
        child.close()


def instrument(runner, log: dict) -> None:
    """Record every forward of ``runner``: decode (batch, distinct adapters, seconds), prefill seconds."""
    decode, prefill = runner.decode, runner.prefill

    def timed_decode(tokens, lengths, adapters):
        start = time.perf_counter()
        out = decode(tokens, lengths, adapters)
        sync()
        log["decode"].append((len(adapters), len(set(adapters)), time.perf_counter() - start))
        return out

    def timed_prefill(prompts, start, adapters, *args, **kw):
        t = time.perf_counter()
        out = prefill(prompts, start, adapters, *args, **kw)
        sync()
        log["prefill"].append((len(prompts), time.perf_counter() - t))
        return out

    def timed_step(tokens, lengths, adapters, prompts, start, prompt_adapters, keep_hidden=()):
        t = time.perf_counter()
        out = step(tokens, lengths, adapters, prompts, start, prompt_adapters, keep_hidden)
        sync()
        t = time.perf_counter() - t
        if tokens:  # a step with prompts counts as prefill time; its decode rows still count for the batch sizes
            log["decode"].append((len(adapters), len(set(adapters)), 0.0 if prompts else t))
        if prompts:
            log["prefill"].append((len(prompts), t))
        return out

    step = runner.step
    runner.decode, runner.prefill, runner.step = timed_decode, timed_prefill, timed_step


def sync() -> None:
    """Wait for the device, so a step's time is its own (asynchronous CUDA kernels)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def replay(engine: Engine, trace: list[dict], base: bool) -> tuple[list[Request], float]:
    """Open loop: submit each request at its timestamp whatever the engine is doing; wait for all of them."""
    engine.start()
    t0 = time.perf_counter() + 0.05
    reqs = []
    for item in trace:
        delay = t0 + item["t"] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        req = Request(list(item["prompt"]), None if base else item["adapter"],
                      SamplingParams(max_tokens=item["max_tokens"], temperature=0, ignore_eos=True))
        req.arrival = t0 + item["t"]  # the scheduled time: a late client counts against the system
        reqs.append(engine.submit(req))
    for req in reqs:
        req.done.wait()
    return reqs, t0


SLO = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0)


def measure(reqs: list[Request], t0: float, log: dict, engine: Engine, rss: tuple[int, int], cpu: float) -> dict:
    ok = [r for r in reqs if r.finish_reason == "length"]
    span = max(r.finished_at for r in reqs) - t0
    ttft = np.array([r.first_token_at - r.arrival for r in ok])
    tpot = np.array([(r.finished_at - r.first_token_at) / (len(r.output) - 1) for r in ok if len(r.output) > 1])
    pct = lambda a, q: float(np.percentile(a, q)) if len(a) else float("nan")  # noqa: E731
    dec = np.array(log["decode"]) if log["decode"] else np.zeros((0, 3))
    s = engine.stats
    hits, misses = s["pool_hits"], s["pool_misses"]
    out = dict(
        seconds=span, requests=len(reqs), completed=len(ok), output_tokens=sum(len(r.output) for r in ok),
        prompt_tokens=sum(len(r.prompt) for r in ok), req_s=len(ok) / span, tok_s=sum(len(r.output) for r in ok) / span,
        ttft_p50=pct(ttft, 50), ttft_p99=pct(ttft, 99), tpot_p50=pct(tpot, 50), tpot_p99=pct(tpot, 99),
        e2e_p50=pct(np.array([r.finished_at - r.arrival for r in ok]), 50),
        slo={str(th): float(sum(ttft <= th)) / len(reqs) for th in SLO},  # unfinished requests count as misses
        decode_steps=len(dec), decode_seconds=float(dec[:, 2].sum()), prefill_seconds=sum(t for _, t in log["prefill"]),
        batch_mean=float(dec[:, 0].mean()) if len(dec) else 0.0, distinct_mean=float(dec[:, 1].mean()) if len(dec) else 0.0,
        full_steps=int((dec[:, 0] == SLOTS).sum()),
        distinct_full=float(dec[dec[:, 0] == SLOTS, 1].mean()) if (dec[:, 0] == SLOTS).any() else None,
        pool_hit_rate=hits / (hits + misses) if hits + misses else None, pool_evictions=engine.pool.stats["evictions"],
        disk_loads=engine.store.stats["loads"], load_stall_seconds=s["load_stall_seconds"],
        rss_peak=rss[1], rss_rise=rss[1] - rss[0], cpu_seconds=cpu, tok_cpu_s=sum(len(r.output) for r in ok) / cpu,
        outputs=[r.output for r in reqs],
        device=str(DEVICE), device_peak=torch.cuda.max_memory_allocated() if DEVICE.type == "cuda" else None,
    )
    runner = engine.runner
    if isinstance(runner, MergedRunner):
        out.update(switches=runner.stats["switches"], switch_seconds=runner.stats["switch_seconds"])
    return out


def run_once(systems: Systems, system: str, work: dict) -> dict:
    if system.startswith("vllm"):
        reply = systems.vllm[system].ask(op="replay", trace=str(work["trace_path"]), adapters=system == "vllm")
        return vllm_result(reply, work["trace"])
    engine = systems.engine(system, work["folder"], work["pool_bytes"], [t["adapter"] for t in work["trace"]])
    log = {"decode": [], "prefill": []}
    instrument(engine.runner, log)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before, cpu = status_kib("VmRSS") * 1024, time.process_time()
    try:
        reqs, t0 = replay(engine, work["trace"], system == "base")
        cpu = time.process_time() - cpu  # every thread of the process: engine loop, prefetch, client
        return measure(reqs, t0, log, engine, (before, status_kib("VmHWM") * 1024), cpu)
    finally:
        systems.close(system, engine)


# -- decode steps alone, and where their time goes ----------------------------------------------------------
def decode_micro(systems: Systems, folder: Path, names: list[str], reps: int, pool_bytes: int) -> dict:
    """Seconds per decode step at batch 1, 8 and 32 (a distinct adapter per row), systems interleaved; also lorakit
    with its ``grouped`` operator backend forced (on a model of its own: two runners' hooks must not share one)."""
    rng = np.random.default_rng(7)
    engines, fns = {}, {}
    for system in ("lorakit", "lorakit-grouped", "base", "peft"):
        grouped = system == "lorakit-grouped"
        e = engines[system] = systems.engine("lorakit" if grouped else system, folder, pool_bytes, names,
                                             "grouped" if grouped else "auto", zoo.load(MODEL, "causal_lm")[0].to(DEVICE) if grouped else None)
        reqs = [e.submit(Request(rng.integers(3, 259, 64).tolist(), None if system == "base" else n,
                                 SamplingParams(max_tokens=MAX_LEN - 65, temperature=0, ignore_eos=True))) for n in names]
        while len(e.running) < len(reqs):
            e.step() or e._wait_for_loads(0.05)
        tokens, lengths = [r.output[-1] for r in e.running], [len(r.prompt) + len(r.output) - 1 for r in e.running]
        aids = [r.aid for r in e.running]
        for b in (1, 8, 32) if system not in ("peft", "lorakit-grouped") else (8, 32):
            fns[f"{system}@{b}"] = (lambda e=e, b=b, t=tokens, ln=lengths, a=aids: (e.runner.decode(t[:b], ln[:b], a[:b]), sync()))
    times = interleaved(fns, warmup=2, n=reps)
    out = {k: float(np.median(v)) for k, v in times.items()}
    out["profile"] = {s: profile_steps(fns[f"{s}@32"]) for s in ("lorakit", "base")}
    for system, e in engines.items():
        for r in list(e.running):
            e.cancel(r)
        e.step()
        systems.close(system.split("-")[0], e)
    return out


def profile_steps(fn, steps: int = 5, top: int = 10) -> list[dict]:
    """torch.profiler's operators by self CPU time over ``steps`` calls, per call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in rows)
    return [dict(op=e.key, ms=e.self_cpu_time_total / 1e3 / steps, share=e.self_cpu_time_total / total,
                 calls=e.count // steps) for e in rows[:top]]


# -- correctness: each adapter alone through peft ----------------------------------------------------------
def check_outputs(systems: Systems, samples: list[dict]) -> list[dict]:
    """Greedy tokens of peft with only the request's adapter active (its own generate loop and cache), against
    lorakit's tokens from the trace run; also whether the adapter changed the base model's tokens at all."""
    pm = systems.peft_model(sorted({s["adapter"] for s in samples}))
    rows = []
    with torch.inference_mode():
        for s in samples:
            pm.set_adapter(s["adapter"])
            ids = torch.tensor([s["prompt"]], device=DEVICE)
            kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(s["lorakit"]),
                      do_sample=False, eos_token_id=None, pad_token_id=0)
            peft_out = pm.generate(**kw)[0, ids.shape[1]:].tolist()
            with pm.disable_adapter():
                base_out = pm.generate(**kw)[0, ids.shape[1]:].tolist()
            rows.append(dict(adapter=s["adapter"], rank=s["rank"], tokens=len(peft_out), identical=peft_out == s["lorakit"],
                             first_diff=next((i for i, (a, b) in enumerate(zip(peft_out, s["lorakit"])) if a != b), None),
                             differs_from_base=base_out != peft_out))
    return rows


# -- the run ---------------------------------------------------------------------------------------------
def compact(res: dict) -> dict:
    """Keep generated tokens for the first repeat only (the checks read them), one string per request."""
    for key, run in res["runs"].items():
        if "outputs" in run and not key.endswith("/0"):
            del run["outputs"]
        elif "outputs" in run:
            run["outputs"] = [o if isinstance(o, str) else " ".join(map(str, o)) for o in run["outputs"]]
    return res


def workloads(cfg: dict, names: dict[str, list[str]], ranks: dict[str, int], bytes_r8: int, vllm: bool) -> dict[str, dict]:
    """name -> trace, adapter folder, pool budget, systems; every trace has the same arrivals and lengths."""
    kw = dict(n=cfg["requests"], rate=cfg["rate"], in_len=cfg["in_len"], out_len=cfg["out_len"], seed=0)
    r8, mixed = names["a"], names["m"]
    mean_bytes = bytes_r8 * np.mean([ranks[n] / 8 for n in mixed])
    out = {}
    for n in cfg["scale"]:
        systems = ("lorakit", "base", "peft", "merge") + ("vllm", "vllm-base") * vllm if n == cfg["adapters"] else ("lorakit",)
        out[f"zipf-{n}"] = dict(trace=make_trace(r8[:n], zipf=1.0, **kw), folder="a", adapters=n, ranks="8",
                                pool_bytes=cfg["pool_adapters"] * bytes_r8, systems=systems, popularity="Zipf s=1")
    out["uniform-1000"] = dict(trace=make_trace(r8, zipf=None, **kw), folder="a", adapters=len(r8), ranks="8",
                               pool_bytes=cfg["pool_adapters"] * bytes_r8, systems=("lorakit", "peft") + ("vllm",) * vllm,
                               popularity="uniform")
    out["mixed"] = dict(trace=make_trace(mixed, zipf=1.0, **kw), folder="m", adapters=len(mixed), ranks="8/16/32/64",
                        pool_bytes=int(cfg["pool_adapters"] * mean_bytes), systems=("lorakit", "peft"), popularity="Zipf s=1")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short trace and one repeat: checks the script, not the claims")
    parser.add_argument("--report-only", action="store_true", help="re-render the page from the saved JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same for every system")
    parser.add_argument("--vllm", default=VLLM_PYTHON, help="vLLM's Python (its CPU build's venv); absent: no vLLM rows")
    parser.add_argument("--no-vllm", action="store_true", help="leave vLLM out even where its Python exists")
    parser.add_argument("--probe-startup", nargs=2, metavar=("MODEL", "ADAPTERS"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="folder of the page (default docs/benchmarks, quick: runs/bench-serve/quick)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps or auto: where every system runs")
    args = parser.parse_args(argv)
    if args.probe_startup:
        return startup_probe(*args.probe_startup)
    global DEVICE
    from lorakit.core.devices import resolve_device

    DEVICE = resolve_device(args.device)
    on_cpu = DEVICE.type == "cpu"
    out = Path(args.out) if args.out else (WORK / "quick" if args.quick else ROOT / "docs" / "benchmarks") if on_cpu \
        else WORK / str(DEVICE).replace(":", "-") / ("quick" if args.quick else "")
    use_vllm = on_cpu and not args.no_vllm and Path(args.vllm).exists()  # vLLM's CPU build: the CPU only
    result_path = out / "serving.json"
    if args.report_only:
        render(read_json(result_path), out)
        return 0
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    start = time.time()
    old = read_json(result_path) or {}
    res = old if old.get("config") == json.loads(json.dumps(cfg)) else {}
    res["config"], res["sessions"] = cfg, res.get("sessions", 0) + 1  # a resumed run keeps its first session's facts
    for key, value in dict(command=command_line(argv), machine=machine(), load_start=load_average(), runs={}).items():
        res.setdefault(key, value)

    shapes = linear_shapes(zoo.load(MODEL, "causal_lm")[0])
    dirs = {"a": WORK / "adapters" / "r8", "m": WORK / "adapters" / "mixed"}
    mixed_ranks = [RANKS[i % len(RANKS)] for i in range(cfg["mixed"])]
    names = {"a": write_adapters(dirs["a"], "a", [8] * cfg["adapters"], shapes, seed=1),
             "m": write_adapters(dirs["m"], "m", mixed_ranks, shapes, seed=2)}
    ranks = dict({n: 8 for n in names["a"]}, **dict(zip(names["m"], mixed_ranks)))
    bytes_r8 = sum((shapes[p][0] + shapes[p][1]) * 8 * 4 for p in shapes if p.rsplit(".", 1)[-1] in TARGETS)
    works = workloads(cfg, names, ranks, bytes_r8, use_vllm)
    for name, w in works.items():
        w["trace_path"] = WORK / "traces" / f"{name}-{cfg['requests']}.jsonl"
        save_trace(w["trace_path"], w["trace"])
        w["folder"] = dirs[w["folder"]]
    res["workloads"] = {k: {f: v for f, v in w.items() if f not in ("trace", "folder", "trace_path")} | dict(
        distinct=len({t["adapter"] for t in w["trace"]}), span=w["trace"][-1]["t"]) for k, w in works.items()}
    res["adapter_bytes_r8"] = bytes_r8
    systems = Systems(dirs)
    res["base_bytes"] = sum(t.numel() * t.element_size() for t in systems.models["base"].parameters())

    plan = [(k, s) for k, w in works.items() for s in w["systems"]]
    scaling = {(f"zipf-{k}", "lorakit") for k in cfg["scale"]}
    rounds = [[(w, s, rep) for w, s in (plan if rep % 2 == 0 else plan[::-1])  # ABBA: load drifts hit every system alike
               if rep < (cfg["merge_repeats"] if s == "merge" else cfg["scale_repeats"] if (w, s) in scaling else cfg["repeats"])]
              for rep in range(max(cfg["repeats"], cfg["scale_repeats"]))]
    todo = [(w, s, rep) for r in rounds for w, s, rep in r if f"{w}/{s}/{rep}" not in res["runs"]]
    used = {t["adapter"] for w in works.values() for t in w["trace"]}
    unseen = [n for n in names["a"] if n not in used][:2]  # adapters no trace names: served for the first time
    if use_vllm and (any(s.startswith("vllm") for _, s, _ in todo) or "startup" not in res):
        model_dir = WORK / "llama-25m-hf"
        systems.models["base"].save_pretrained(model_dir)  # the same weights for vLLM
        for system in ("vllm", "vllm-base"):
            lora = ["--lora", "--adapters", str(dirs["a"])] if system == "vllm" else []
            systems.vllm[system] = Child([args.vllm, str(ROOT / "bench" / "serve_vllm.py"), "--model", str(model_dir),
                                          "--slots", str(SLOTS), "--max-len", str(MAX_LEN), *lora], WORK / f"{system}.log")
    if todo:
        warm = dict(works[f"zipf-{cfg['adapters']}"], trace=works[f"zipf-{cfg['adapters']}"]["trace"][:8],
                    trace_path=WORK / "traces" / "warm.jsonl")
        save_trace(warm["trace_path"], warm["trace"])
        for system in ("lorakit", "base", "peft", "merge", *systems.vllm):  # first calls allocate and warm up: not measured
            run_once(systems, system, warm)
    for work, system, rep in todo:
        key = f"{work}/{system}/{rep}"
        t = time.time()
        res["runs"][key] = run_once(systems, system, works[work])
        r = res["runs"][key]
        print(f"[{time.strftime('%H:%M:%S')}] {key}: {r['tok_s']:.1f} tok/s, {r['tok_cpu_s']:.1f} tok/CPU-s, {r['seconds']:.1f}s trace, "
              f"{time.time() - t:.1f}s wall, distinct/step {r.get('distinct_mean', float('nan')):.1f}, load {load_average()}", flush=True)
        res["peft_load"] = systems.peft_load  # adapters PEFT held during the runs
        write_json(result_path, compact(res))

    if "startup" not in res and (systems.vllm or not use_vllm):
        res["startup"] = {"lorakit": startup(sys.executable, [str(Path(__file__).resolve()), "--probe-startup", MODEL, str(dirs["a"])],
                                             unseen, WORK / "lorakit-startup.log")}
        for system, child in systems.vllm.items():
            res["startup"][system] = dict(child.ready)
            if system == "vllm":  # a warm server: it has served the traces, never these adapters
                res["startup"][system]["first_s"] = [child.ask(op="first", adapter=a)["first_s"] for a in unseen][-1]
        write_json(result_path, res)
    for child in systems.vllm.values():
        child.close()
    if "micro" not in res:
        uniform = works["uniform-1000"]["trace"]
        first32 = list(dict.fromkeys(t["adapter"] for t in uniform))[:SLOTS]
        res["micro"] = decode_micro(systems, dirs["a"], first32, cfg["micro"], works["uniform-1000"]["pool_bytes"])
        print(f"[{time.strftime('%H:%M:%S')}] decode steps: "
              + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in res["micro"].items() if k != "profile"), flush=True)
        write_json(result_path, res)
    if "check" not in res:
        samples = []
        for work, count in ((f"zipf-{cfg['adapters']}", cfg["check"] - cfg["check"] // 3), ("mixed", cfg["check"] // 3)):
            outputs, seen = res["runs"][f"{work}/lorakit/0"]["outputs"], set()
            quota = {r: count // len({ranks[t["adapter"]] for t in works[work]["trace"]}) or 1 for r in RANKS}
            for item, toks in zip(works[work]["trace"], outputs):  # first requests of distinct adapters, every rank alike
                name, r = item["adapter"], ranks[item["adapter"]]
                if name not in seen and quota[r] and len(seen) < count:
                    seen.add(name)
                    quota[r] -= 1
                    samples.append(dict(item, lorakit=[int(t) for t in toks.split()], rank=r, trace=work))
        res["check"] = check_outputs(systems, samples)
        write_json(result_path, res)
    res["load_end"], res["wall_seconds"] = load_average(), res.get("wall_seconds", 0.0) + time.time() - start
    write_json(result_path, res)
    render(res, out)
    print(f"wrote {out / 'serving.md'} in {time.time() - start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
