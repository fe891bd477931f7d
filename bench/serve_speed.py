"""A short serving-speed check for iterating on the engine: lorakit with adapters against its own base model (and
vLLM's base model when its Python is there), on bench/serve.py's traces cut to ``--requests``, in ABBA rounds.

    OMP_NUM_THREADS=1 python bench/serve_speed.py [--requests 48] [--rounds 2] [--traces zipf-1000,uniform-1000]
        [--vllm PYTHON | --no-vllm] [--profile]

Prints output tokens per wall- and CPU-second for each run and the per-round CPU-second ratios; ``--profile`` also
prints torch.profiler's operator table and cProfile's Python functions for one lorakit replay. It writes nothing
under docs/: the page's numbers come from bench/serve.py only.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve as S  # noqa: E402  (sets the offline environment first)
import torch  # noqa: E402

from common import load_average  # noqa: E402
from lorakit import zoo  # noqa: E402
from lorakit.serve import AdapterStore, Engine, EngineConfig  # noqa: E402
from lorakit.serve.store import linear_shapes  # noqa: E402


def lorakit_run(model, tok, shapes, folder: Path, trace: list[dict], base: bool, hosts: dict) -> dict:
    config = EngineConfig(max_batch=S.SLOTS, max_len=S.MAX_LEN, pool_bytes=S.FULL["pool_adapters"] * hosts["bytes_r8"])
    store = AdapterStore(shapes, prefetch=True)
    store.scan(folder)
    store.host = hosts.setdefault(str(folder), store.host)  # kept across runs, as bench/serve.py does
    engine = Engine(model, tok, config, store)
    cpu = time.process_time()
    try:
        reqs, t0 = S.replay(engine, trace, base)
        cpu = time.process_time() - cpu
    finally:
        engine.stop()
    tokens = sum(len(r.output) for r in reqs)
    span = max(r.finished_at for r in reqs) - t0
    return dict(tok_s=tokens / span, tok_cpu_s=tokens / cpu, outputs=[r.output for r in reqs])


def profile_inline(model, tok, shapes, folder: Path, trace: list[dict], base: bool, hosts: dict) -> None:
    """Every request of ``trace`` submitted at once and stepped inline (the step loop alone, on this thread):
    torch.profiler's operators and cProfile's Python functions, and the CPU seconds of the whole drain."""
    from torch.profiler import ProfilerActivity, profile

    config = EngineConfig(max_batch=S.SLOTS, max_len=S.MAX_LEN, pool_bytes=S.FULL["pool_adapters"] * hosts["bytes_r8"])
    engine = Engine(model, tok, config, AdapterStore(shapes, prefetch=True))
    engine.store.scan(folder)
    engine.store.host = hosts.setdefault(str(folder), engine.store.host)
    reqs = [engine.submit(S.Request(list(t["prompt"]), None if base else t["adapter"], S.SamplingParams(
        max_tokens=t["max_tokens"], temperature=0, ignore_eos=True))) for t in trace]
    cpu = time.process_time()
    engine.drain(reqs)
    cpu = time.process_time() - cpu
    reqs = [engine.submit(S.Request(list(r.prompt), r.adapter, r.params)) for r in reqs]
    prof = cProfile.Profile()
    with profile(activities=[ProfilerActivity.CPU]) as tp:
        prof.enable()
        engine.drain(reqs)
        prof.disable()
    engine.stop()
    print(f"== {'base' if base else 'lorakit'}: {cpu:.2f} CPU-s unprofiled, {engine.stats['decode_steps']} decode steps")
    print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--traces", default="zipf-1000,uniform-1000")
    p.add_argument("--vllm", default=S.VLLM_PYTHON)
    p.add_argument("--no-vllm", action="store_true")
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model, tok = zoo.load(S.MODEL, "causal_lm")
    shapes = linear_shapes(model)
    folder = S.WORK / "adapters" / "r8"
    names = S.write_adapters(folder, "a", [8] * S.FULL["adapters"], shapes, seed=1)
    kw = dict(n=args.requests, rate=S.FULL["rate"], in_len=S.FULL["in_len"], out_len=S.FULL["out_len"], seed=0)
    traces = {"zipf-1000": S.make_trace(names, zipf=1.0, **kw), "uniform-1000": S.make_trace(names, zipf=None, **kw)}
    traces = {k: traces[k] for k in args.traces.split(",")}
    hosts = dict(bytes_r8=sum((shapes[q][0] + shapes[q][1]) * 8 * 4 for q in shapes if q.rsplit(".", 1)[-1] in S.TARGETS))
    vllm = None
    if not args.no_vllm and Path(args.vllm).exists():
        model_dir = S.WORK / "llama-25m-hf"
        model.save_pretrained(model_dir)
        vllm = S.Child([args.vllm, str(Path(__file__).resolve().parent / "serve_vllm.py"), "--model", str(model_dir),
                        "--slots", str(S.SLOTS), "--max-len", str(S.MAX_LEN)], S.WORK / "vllm-base-speed.log")
        print(f"vLLM base ready in {vllm.ready['spawn_to_ready_s']:.1f} s", flush=True)
    paths = {}
    for name, trace in traces.items():
        paths[name] = S.WORK / "traces" / f"speed-{name}-{args.requests}.jsonl"
        S.save_trace(paths[name], trace)
    lorakit_run(model, tok, shapes, folder, traces[next(iter(traces))][:8], False, hosts)  # warm-up
    systems = ["lorakit", "base"] + ["vllm-base"] * (vllm is not None)
    ratios: dict[str, list[float]] = {}
    for rnd in range(args.rounds):
        for name, trace in traces.items():
            got = {}
            for system in systems if rnd % 2 == 0 else systems[::-1]:
                if system == "vllm-base":
                    got[system] = vllm.ask(op="replay", trace=str(paths[name]), adapters=False)
                else:
                    got[system] = lorakit_run(model, tok, shapes, folder, trace, system == "base", hosts)
                print(f"  {name} {system}: {got[system]['tok_s']:.1f} tok/s, {got[system]['tok_cpu_s']:.1f} tok/CPU-s", flush=True)
            for a, b in (("lorakit", "base"), ("lorakit", "vllm-base"), ("base", "vllm-base")):
                if a in got and b in got:
                    ratios.setdefault(f"{name} {a}/{b}", []).append(got[a]["tok_cpu_s"] / got[b]["tok_cpu_s"])
        print(f"round {rnd}: load {load_average()}", flush=True)
    for key, values in ratios.items():
        print(f"{key} per CPU-s: " + " ".join(f"{v:.3f}" for v in values))
    if vllm is not None:
        vllm.close()
    if args.profile:
        for system in ("lorakit", "base"):
            profile_inline(model, tok, shapes, folder, traces[next(iter(traces))], system == "base", hosts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
