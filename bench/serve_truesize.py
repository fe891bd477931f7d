"""True-size serving against serving the LoRA export: pool bytes per adapter, throughput, first-use cost.

llama-25m (seeded weights from a config), adapters on q/k/v/o of every layer with random trainable tensors:
NOLA (r 8, 1,024 bases each side: the official default), LoRA-XS (r 8), Block-LoRA (r 8, 8 blocks), and for
reference RandLoRA (r 32) and SHiRA (r 8), which have no LoRA export. For the first three the same adapters are
also written as their ``to_lora()`` export and served beside them in the same engine, so both forms see the same
machine. Per form: bytes of one pool slot, of the host copy, of the files; the shared tensors a class holds once;
the workspace row an adapter in use takes; the seconds to make an adapter resident and in use (load from the host
cache, copy into the pool, and for true size the expansion); and tokens per second for a batch of 8 requests (8
distinct adapters, 32-token prompts, 32 new tokens, greedy, EOS ignored), the forms interleaved, medians of
``--repeats`` runs. The greedy tokens of each adapter and its export are compared.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python bench/serve_truesize.py [--quick] [--device cpu]

writes docs/benchmarks/serve_truesize.md and .json (``--quick``: runs/bench-serve-truesize/).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import command_line, interleaved, machine, write_json  # noqa: E402

import lorakit  # noqa: E402
from lorakit import zoo  # noqa: E402
from lorakit.core.devices import resolve_device  # noqa: E402
from lorakit.serve import Engine, EngineConfig, Request, SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL, TARGETS, BATCH = "llama-25m", ["q_proj", "k_proj", "v_proj", "o_proj"], 8
METHODS = {"nola": dict(r=8, num_basis_A=1024, num_basis_B=1024), "lora_xs": dict(r=8),
           "block_lora": dict(r=8, block_num=8), "randlora": dict(r=32), "shira": dict(r=8)}
EXPORTABLE = ("nola", "lora_xs", "block_lora")


def write(folder: Path, method: str, settings: dict, n: int) -> list[str]:
    """``n`` adapters of ``method`` (and their LoRA exports), random trainable tensors, seeded."""
    names = []
    for i in range(n):
        name = f"{method}-{i}"
        names.append(name)
        if (folder / name).is_dir():
            continue
        base, _ = zoo.load(MODEL, "causal_lm")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(i)
            model = lorakit.apply(base, lorakit.METHODS.get(method).config_class(target_modules=TARGETS, **settings))
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.normal_(0, 0.02 if method == "shira" else 0.05)
        lorakit.save_peft(model, folder / name)
        if method in EXPORTABLE:
            lorakit.save_state(lorakit.load_state(folder / name).to_lora(), folder / f"{name}-lora")
    return names


def files_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer bases and repeats: checks the script, not the numbers")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    device = resolve_device(args.device)
    work = ROOT / "runs/bench-serve-truesize" / ("quick" if args.quick else "full")
    out = ROOT / ("runs/bench-serve-truesize" if args.quick else "docs/benchmarks")
    methods = {m: dict(s, **({"num_basis_A": 64, "num_basis_B": 64} if args.quick and m == "nola" else {}))
               for m, s in METHODS.items()}
    model, tok = zoo.load(MODEL, "causal_lm")
    engine = Engine(model.to(device), tok, EngineConfig(max_batch=BATCH, max_len=128, prefetch=False, pool_bytes=1 << 30))
    prompts = [torch.randint(4, 260, (32,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(BATCH)]
    new = 8 if args.quick else 32
    rows, runs = {}, {}
    for method, settings in methods.items():
        names = write(work / "adapters", method, settings, BATCH)
        forms = {"true size": names} | ({"LoRA export": [f"{n}-lora" for n in names]} if method in EXPORTABLE else {})
        for form, ns in forms.items():
            for n in ns:
                engine.add_adapter(n, work / "adapters" / n)
            first = engine.store.entry(ns[0]).aid
            packed = engine.store.load(first)
            t0 = time.perf_counter()
            engine.pool.activate(packed)
            engine.pool.acquire(first)  # true size: the expansion into the workspace happens here
            if device.type == "cuda":
                torch.cuda.synchronize()
            first_use = time.perf_counter() - t0
            cls, _ = engine.pool.slot_of(first)
            engine.pool.release(first)
            lora_row = getattr(cls, "lora", cls).slot_bytes
            rows[f"{method}/{form}"] = dict(
                method=method, form=form, slot_bytes=cls.slot_bytes, host_bytes=packed.nbytes,
                file_bytes=files_bytes(work / "adapters" / ns[0]), shared_bytes=getattr(cls, "shared_bytes", 0),
                workspace_row_bytes=lora_row if form == "true size" else 0, first_use_seconds=first_use,
                parameters=lorakit.load_state(work / "adapters" / ns[0]).num_parameters())

            def go(ns=ns, key=f"{method}/{form}"):
                reqs = [engine.submit(Request(p, n, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)))
                        for p, n in zip(prompts, ns)]
                engine.drain(reqs)
                runs.setdefault(key + "/tokens", [r.output for r in reqs])
            runs[f"{method}/{form}"] = go
    times = interleaved({k: v for k, v in runs.items() if callable(v)}, warmup=1, n=1 if args.quick else args.repeats)
    for key, t in times.items():
        rows[key].update(seconds=float(np.median(t)), tokens_per_second=BATCH * new / float(np.median(t)))
    for method in EXPORTABLE:
        t, e = rows[f"{method}/true size"], rows[f"{method}/LoRA export"]
        t["same_tokens_as_export"] = runs[f"{method}/true size/tokens"] == runs[f"{method}/LoRA export/tokens"]
        t["slot_vs_export"], t["speed_vs_export"] = t["slot_bytes"] / e["slot_bytes"], e["seconds"] / t["seconds"]
    engine.stop()
    data = dict(command=command_line(argv), machine=machine(), device=str(device), batch=BATCH, new_tokens=new,
                settings=methods, rows=rows)
    write_json(out / "serve_truesize.json", data)
    (out / "serve_truesize.md").write_text(render(data))
    print(render(data))


def render(data: dict) -> str:
    """The page, from the JSON."""
    m = data["machine"]
    lines = ["# Serving adapters at their true size", "",
             f"`{data['command']}` on {m['cpu']} ({data['device']}, 1 thread, torch {m['torch']}, load {m['load']}). "
             f"llama-25m, adapters on q/k/v/o of its 4 layers; a batch of {data['batch']} requests for {data['batch']} "
             f"distinct adapters, {data['new_tokens']} new tokens each; forms interleaved, medians. Settings: "
             + ", ".join(f"{k} {v}" for k, v in data["settings"].items()) + ".", "",
             "| method | form | parameters | pool slot bytes | vs export | shared once per class | workspace row while in use "
             "| host copy bytes | file bytes | first use (ms) | tokens/s | speed vs export | same tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"].values():
        vs = f"{r['slot_vs_export']:.3f}" if "slot_vs_export" in r else ""
        speed = f"{r['speed_vs_export']:.2f}x" if "speed_vs_export" in r else ""
        same = {True: "yes", False: "NO"}.get(r.get("same_tokens_as_export"), "")
        lines.append(f"| {r['method']} | {r['form']} | {r['parameters']:,} | {r['slot_bytes']:,} | {vs} | {r['shared_bytes']:,} | "
                     f"{r['workspace_row_bytes']:,} | {r['host_bytes']:,} | {r['file_bytes']:,} | "
                     f"{r['first_use_seconds'] * 1e3:.1f} | {r['tokens_per_second']:.0f} | {speed} | {same} |")
    lines += ["", "A resident adapter costs its pool slot; one that running requests use also costs its workspace row "
              "(its LoRA tables, expanded at first use); a class holds its shared frozen tensors once (LoRA-XS's A and B). "
              "So N resident adapters of which k are in use cost N x slot + k x row + shared, against N x the export's slot. "
              "Throughput is the same operator on the same tables once expanded; the first use pays the expansion "
              "(NOLA regenerates its random bases then). RandLoRA and SHiRA have no LoRA export: their rows are for "
              "reference (their workspace row is their exact factor form: RandLoRA's inner dimension N·r covers "
              "min(in, out), SHiRA's the input columns its support uses).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
