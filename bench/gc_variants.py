"""Gradient checkpointing variants against a plain LoRA step, on the training-strategies workload (MiniLM, LoRA r=8
on query/key/value, a batch of 32 tweets of 32 tokens for every variant): step CPU time (median of interleaved
steps), peak tensor memory of a step (allocator events) and peak RSS rise (3 steps in a forked process), as ratios
to LoRA without checkpointing in the same run.

Variants: lorakit's ``full`` (every encoder block recomputed, reentrant, inputs made to require grad) and
``selective`` (each block's attention core and FFN widening recomputed); every block non-reentrant; the last block
left out; attention and FFN widening as whole modules; per-op selective policies (``create_selective_checkpoint_
contexts``) saving the down-projections' or every ``addmm`` output; and the floor (forward + backward to the
inputs, nothing trainable).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python bench/gc_variants.py [--steps 9] [--out docs/benchmarks]

writes gradient-checkpointing.md and .json.
"""
from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import training_strategies as ts  # noqa: E402
from common import command_line, machine, peak_rss_rise, ratio_ci, read_json, write_json  # noqa: E402

VARIANTS = {
    "lora": "LoRA, no checkpointing",
    "default": "full: every block, reentrant (lorakit's gradient_checkpointing='full')",
    "non_reentrant": "every block, non-reentrant",
    "skip_last": "blocks 1-5, reentrant (block 6 stored)",
    "selective": "selective: attention.self and intermediate of every block (lorakit's 'selective')",
    "units_attention": "attention (with its output, dropout, norm) and intermediate of every block",
    "sac_down": "per-op policy: every block, down-projection outputs saved, the rest recomputed",
    "sac_addmm": "per-op policy: every block, every addmm output saved, the rest recomputed",
    "floor": "floor: forward + backward to the inputs, nothing trainable",
}
CHECKED = [v for v in VARIANTS if v not in ("lora", "floor")]


def _down_projection_policy(ctx, op, *args, **kwargs):
    """Save the outputs of products that narrow the width 2x or more (mat1 [M, K], mat2 [K, N], K >= 2N)."""
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    mats = (args[0], args[1]) if op is aten.mm.default else (args[1], args[2]) if op is aten.addmm.default else None
    narrow = mats is not None and mats[0].shape[-1] >= 2 * mats[1].shape[-1]
    return CheckpointPolicy.MUST_SAVE if narrow else CheckpointPolicy.PREFER_RECOMPUTE


def _addmm_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op is torch.ops.aten.addmm.default else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpoint(model, variant: str) -> None:
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    from lorakit.train.checkpointing import enable_gradient_checkpointing

    blocks = model.bert.encoder.layer
    if variant == "selective":
        return enable_gradient_checkpointing(model, "selective")
    if variant == "units_attention":
        for block in blocks:
            for module in (block.attention, block.intermediate):
                module.forward = partial(checkpoint, module.forward, use_reentrant=False)
        return
    if variant in ("default", "skip_last"):
        enable_gradient_checkpointing(model, "full")
        if variant == "skip_last":
            blocks[-1].gradient_checkpointing = False
        return
    kwargs = {"use_reentrant": False}
    if variant.startswith("sac_"):
        policy = _down_projection_policy if variant == "sac_down" else _addmm_policy
        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, policy)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)


def make(task_args: tuple, variant: str):
    """One training step of ``variant`` (a closure), on a fresh model."""
    if ts._TASK is None:
        ts._TASK = ts.Task(*task_args)
    batch = ts._timed_batch(32)
    if variant == "floor":
        return ts._floor(batch)[0]
    step, _ = ts._stepper("lora", ts.systems(24)["lora"], 24, batch)
    model = next(c.cell_contents for c in step.__closure__ if isinstance(c.cell_contents, torch.nn.Module))
    if variant != "lora":
        _checkpoint(model, variant)
    return step


def _three(step) -> None:
    for _ in range(3):
        step()


def peak_tensor_bytes(step) -> int:
    """High-water mark of the bytes held by tensors during one ``step`` (the CPU allocator's events in the
    profiler; what ``torch.cuda.max_memory_allocated`` reports on a GPU), over what was held when it started."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=9, help="timed steps per variant (interleaved)")
    ap.add_argument("--out", default="docs/benchmarks")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset (lora is always run)")
    ap.add_argument("--render", default=None, metavar="JSON", help="redraw the page in --out from a result JSON")
    args = ap.parse_args(argv)
    if args.render:
        data = read_json(Path(args.render))
        write_json(Path(args.out) / "gradient-checkpointing.json", data)
        (Path(args.out) / "gradient-checkpointing.md").write_text(render(data))
        return 0
    torch.set_num_threads(1)
    task_args = (320, 150, 32)
    chosen = ["lora"] + [v for v in args.variants.split(",") if v != "lora"]
    unknown = set(chosen) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    steps = {v: make(task_args, v) for v in chosen}
    for step in steps.values():  # warm-up
        step()
    cpu = {v: [] for v in chosen}
    for _ in range(args.steps):
        for v, step in steps.items():
            c0 = time.process_time()
            step()
            cpu[v].append(time.process_time() - c0)
    tensors = {v: peak_tensor_bytes(step) for v, step in steps.items()}
    del steps
    peak = {v: peak_rss_rise(make, _three, task_args, v) for v in chosen}
    med = {v: float(np.median(t)) for v, t in cpu.items()}
    data = dict(command=command_line(argv), machine=machine(), cpu_s=cpu, median_cpu_s=med, peak_rss_rise=peak,
                peak_tensor_bytes=tensors, time_ratio={v: med[v] / med["lora"] for v in chosen},
                time_ratio_ci={v: ratio_ci(cpu[v], cpu["lora"]) for v in chosen},
                tensor_ratio={v: tensors[v] / tensors["lora"] for v in chosen},
                peak_ratio={v: peak[v] / peak["lora"] for v in chosen})
    out = Path(args.out)
    write_json(out / "gradient-checkpointing.json", data)
    (out / "gradient-checkpointing.md").write_text(render(data))
    print(render(data))
    return 0


def render(data: dict) -> str:
    """Markdown table of the variants with the target column."""
    m, n = data["machine"], len(data["cpu_s"]["lora"])
    lines = ["# Gradient checkpointing variants (MiniLM, LoRA r=8 on q,k,v, batch 32 x 32 tokens on every side)", "",
             f"Command: `{data['command']}`  ", f"Machine: {m['cpu']}, 1 torch thread, load {m['load']}; torch "
             f"{m['torch']}, transformers {m['transformers']}.", "",
             "Every variant trains the same model (all-MiniLM-L6-v2, dropout on, LoRA r=8 on query/key/value, AdamW) "
             f"on the same batch of 32 tweets of 32 tokens. Time: CPU time per step, median of {n} interleaved steps "
             "(all variants in turn, after a warm-up step), with the 95% bootstrap interval of the ratio. Peak "
             "tensor memory: the high-water mark of bytes held by tensors during one step, from the allocator events "
             "(the CPU counterpart of `torch.cuda.max_memory_allocated`). Peak RSS rise: over the loaded model during "
             "3 steps in a forked process. Ratios are to LoRA without checkpointing in the same run. The target "
             "(<= 1.4x the time at <= 0.5x the memory) is judged on time and peak tensor memory; the RSS column "
             "shows why it is not judged on RSS.", "",
             "| variant | CPU ms / step | time × LoRA (95% CI) | peak tensors MiB | × LoRA | peak RSS rise MiB | "
             "× LoRA | RSS rise - tensors MiB | meets the target |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for v in data["time_ratio"]:
        label = VARIANTS[v]
        t, p, r = data["time_ratio"][v], data["tensor_ratio"][v], data["peak_ratio"][v]
        lo, hi = data["time_ratio_ci"][v]
        ok = "-" if v in ("lora", "floor") else ("yes" if t <= 1.4 and p <= 0.5 else "no")
        tens, rss = data["peak_tensor_bytes"][v] / 2**20, data["peak_rss_rise"][v] / 2**20
        lines.append(f"| {label} | {1e3 * data['median_cpu_s'][v]:.0f} | {t:.2f} ({lo:.2f}-{hi:.2f}) | {tens:.0f} | "
                     f"{p:.2f} | {rss:.0f} | {r:.2f} | {rss - tens:.0f} | {ok} |")
    lines += ["", *notes(data)]
    return "\n".join(lines) + "\n"


def outliers(data: dict) -> list[str]:
    """A sentence on steps over 3x their variant's median (the machine, not the variant), if any."""
    odd = [(v, i, t) for v, ts in data["cpu_s"].items() for i, t in enumerate(ts) if t > 3 * data["median_cpu_s"][v]]
    if not odd:
        return []
    said = "; ".join(f"{VARIANTS[v].split(':')[0].split(',')[0]} in round {i + 1}: {t:.1f} s" for v, i, t in odd)
    return [f"Outlying steps ({said}) widen the bootstrap intervals of the ratios; the medians are robust to "
            "them.", ""]


def notes(data: dict) -> list[str]:
    """Why the numbers are what they are, and the limits of the page."""
    gap = {v: (data["peak_rss_rise"][v] - data["peak_tensor_bytes"][v]) / 2**20 for v in data["time_ratio"]}
    full = "default" in data["time_ratio"]
    return [
        "Why recomputing whole blocks costs ~1.5x here: with the base frozen the backward computes input gradients "
        "only, so the forward is more than half of a LoRA step (in one separate measurement with this batch: forward "
        "312 ms of a 549 ms step), and recomputing every block adds about one forward. `selective` recomputes each "
        "block's `attention.self` (the q, k, v products, scores, softmax, attention dropout) and `intermediate` (the "
        "widening product and GELU), about half of the block's forward work; it keeps the down-projection's and the "
        "output projection's results and what the norms and dropout save for their own backward (float dropout "
        "masks, norm inputs), which a recompute would save again anyway. Per-op policies "
        "(`create_selective_checkpoint_contexts`) send every op of a block through a Python dispatch mode in the "
        "forward and again in the recompute; here that costs more time than the products they spare. Leaving the "
        "last block out spares one block's recompute and keeps its activations.", "",
        f"RSS: the 'RSS rise - tensors' column ({min(gap.values()):.0f}-{max(gap.values()):.0f} MiB) is as large as "
        "most differences between variants: code pages, allocator arenas and cached blocks a training step touches, "
        "not live tensors; so RSS ratios understate every variant's saving" + (
            f" (full: {data['tensor_ratio']['default']:.2f}x in tensors, {data['peak_ratio']['default']:.2f}x in RSS)"
            if full else "") + ". Judged by peak RSS, no variant here reaches 0.5x" + (
            f"; `selective` is {data['peak_ratio']['selective']:.2f}x" if "selective" in data["peak_ratio"] else "")
        + ".", "",
        *outliers(data),
        "Limits: on Llama- and Gemma-style blocks `selective` recomputes only `self_attn` (their FFN is one module "
        "holding its down-projection), which saves less than on BERT-style blocks; this page measures MiniLM only, "
        "on CPU with one thread (on a GPU the balance between products and elementwise work differs).",
    ]


if __name__ == "__main__":
    sys.exit(main())
