"""What the API's request features cost the engine: generated tokens per second with logprobs, logit_bias,
structured output (llguidance) and per-request merged adapters, against the same requests without them.

llama-25m (seeded weights from a config) and 4 rank-8 PEFT adapters with random seeded factors (bench/serve.py's
writer); a batch of 8 requests (prompts of 32 tokens, up to 48 new tokens, temperature 0.8, seeded, EOS ignored
except where a grammar ends the document) run to completion on the engine (no HTTP), variants interleaved, the
median of ``--repeats`` runs. Also: the time to build a merge of two adapters and to compile a JSON schema.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python bench/serve_features.py [--quick]

writes docs/benchmarks/serve_features.md and .json (``--quick``: runs/bench-serve-features/).
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
from serve import MODEL, write_adapters  # noqa: E402

from lorakit import zoo  # noqa: E402
from lorakit.serve import AdapterStore, Engine, EngineConfig, Request, SamplingParams  # noqa: E402
from lorakit.serve.combos import normalise  # noqa: E402
from lorakit.serve.store import linear_shapes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = {"type": "object", "properties": {"id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["id", "tags"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = ROOT / ("runs/bench-serve-features" if args.quick else "docs/benchmarks")
    model, tok = zoo.load(MODEL, "causal_lm", seed=0)
    names = write_adapters(ROOT / "runs/bench-serve-features/adapters", "f", [8] * 4, linear_shapes(model), seed=1)
    cfg = EngineConfig(max_batch=8, max_len=128, prefetch=False)
    store = AdapterStore(linear_shapes(model), prefetch=False)
    for n in names:
        store.register(n, ROOT / "runs/bench-serve-features/adapters" / n)
    engine = Engine(model, tok, cfg, store)
    new = 16 if args.quick else 48
    prompts = [torch.randint(4, 260, (32,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(8)]
    grammar = engine.guides.grammar({"type": "json_object"})

    def run(**extra):
        def go():
            reqs = []
            for i, p in enumerate(prompts):
                merge, guide = extra.get("merge"), engine.guides.guide(grammar) if extra.get("guided") else None
                params = SamplingParams(max_tokens=new, temperature=0.8, seed=i, ignore_eos=True,
                                        logprobs=extra.get("logprobs"), logit_bias=extra.get("bias", {}))
                reqs.append(engine.submit(Request(p, None if merge else names[i % 4], params, merge=merge, guide=guide)))
            engine.drain(reqs)
            go.tokens = sum(len(r.output) for r in reqs)
        return go

    variants = {"plain": run(), "logprobs=5": run(logprobs=5), "logit_bias (20 ids)": run(bias={i: 1.0 for i in range(20, 40)}),
                "json_object": run(guided=True), "merged (2 adapters)": run(merge=(names[:2], [0.5, 0.5], "linear"))}
    times = interleaved(variants, warmup=1, n=2 if args.quick else args.repeats)
    rows = {k: dict(seconds=float(np.median(t)), tokens=variants[k].tokens,
                    tokens_per_second=variants[k].tokens / float(np.median(t))) for k, t in times.items()}
    base = rows["plain"]["seconds"]
    for r in rows.values():
        r["speed_vs_plain"] = base / r["seconds"]  # of the whole batch
    t0 = time.perf_counter()
    engine.guides.grammar({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
    compile_ms = (time.perf_counter() - t0) * 1e3
    builds = []
    for w in range(3 if args.quick else 7):
        aid = engine.merges.acquire(normalise(store, names[2:], [1.0, w + 2.0], "linear"))
        t0 = time.perf_counter()
        store.load(aid)
        builds.append(time.perf_counter() - t0)
        engine.merges.release(aid)
    engine.stop()
    data = dict(command=command_line(argv), machine=machine(), batch=8, new_tokens=new, rows=rows,
                schema_compile_ms=compile_ms, merge_build_ms=float(np.median(builds)) * 1e3)
    write_json(out / "serve_features.json", data)
    (out / "serve_features.md").write_text(render(data))
    print(render(data))


def render(data: dict) -> str:
    """The page, from the JSON."""
    m = data["machine"]
    lines = ["# Serving: what the API's request features cost", "",
             f"`{data['command']}` on {m['cpu']} ({m['threads']} thread, torch {m['torch']}, load {m['load']}).",
             f"A batch of {data['batch']} requests on llama-25m, up to {data['new_tokens']} new tokens each, "
             "every variant in the same process, interleaved, medians.", "",
             "| variant | tokens | batch seconds | tokens/s | batch speed vs plain |", "|---|---|---|---|---|"]
    for k, r in data["rows"].items():
        lines.append(f"| {k} | {r['tokens']} | {r['seconds']:.3f} | {r['tokens_per_second']:.0f} | {r['speed_vs_plain']:.2f}x |")
    lines += ["", f"Compiling a JSON schema (llguidance): {data['schema_compile_ms']:.1f} ms. Building a merge of two "
              f"rank-8 adapters (every layer's q/k/v/o, from the host cache): {data['merge_build_ms']:.1f} ms.",
              "", "`json_object` requests stop when their document is complete, so they may generate fewer tokens while "
              "the batch lasts as long as its longest request: compare batch seconds.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
