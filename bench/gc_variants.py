"""Gradient checkpointing variants against a plain LoRA step, on the training-strategies workload (MiniLM, LoRA r=8
on query/key/value, a batch of 32 tweets of 32 tokens): step CPU time (median of interleaved steps) and peak
RSS rise (3 steps in a forked process), as ratios to LoRA without checkpointing in the same run.

Variants: lorakit's default (every encoder block recomputed, reentrant, inputs made to require grad); the
non-reentrant implementation; the first or the last block left out of checkpointing; selective checkpointing
(non-reentrant, saving every ``addmm`` output, or every attention output, and recomputing the rest); and the floor
(forward + backward to the inputs, nothing trainable).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python bench/gc_variants.py [--steps 7] [--out docs/benchmarks]

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
from common import command_line, machine, peak_rss_rise, write_json  # noqa: E402

VARIANTS = {
    "lora": "LoRA, no checkpointing",
    "default": "every block, reentrant (lorakit's gradient_checkpointing)",
    "non_reentrant": "every block, non-reentrant",
    "skip_first": "blocks 2-6, reentrant (block 1 stored; no input grads needed)",
    "skip_last": "blocks 1-5, reentrant (block 6 stored)",
    "sac_addmm": "selective: save every addmm output, recompute the rest",
    "sac_attention": "selective: save attention outputs, recompute the rest",
    "floor": "floor: forward + backward to the inputs, nothing trainable",
}


def _checkpoint(model, variant: str) -> None:
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    from lorakit.train.precision import enable_gradient_checkpointing

    blocks = model.bert.encoder.layer
    if variant in ("default", "skip_first", "skip_last"):
        enable_gradient_checkpointing(model)
        if variant == "skip_first":
            model.disable_input_require_grads()  # block 1's adapters make its output require grad
            blocks[0].gradient_checkpointing = False
        if variant == "skip_last":
            blocks[-1].gradient_checkpointing = False
        return
    kwargs = {"use_reentrant": False}
    if variant.startswith("sac_"):
        aten = torch.ops.aten
        saved = {aten.addmm.default} if variant == "sac_addmm" else {
            aten._scaled_dot_product_flash_attention_for_cpu.default, aten._scaled_dot_product_attention_math.default}

        def policy(ctx, op, *args, **kw):
            return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=7, help="timed steps per variant")
    ap.add_argument("--out", default="docs/benchmarks")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    task_args = (320, 150, 32)
    steps = {v: make(task_args, v) for v in VARIANTS}
    for step in steps.values():  # warm-up
        step()
    cpu = {v: [] for v in VARIANTS}
    for _ in range(args.steps):
        for v, step in steps.items():
            c0 = time.process_time()
            step()
            cpu[v].append(time.process_time() - c0)
    del steps
    peak = {v: peak_rss_rise(make, _three, task_args, v) for v in VARIANTS}
    med = {v: float(np.median(t)) for v, t in cpu.items()}
    data = dict(command=command_line(argv), machine=machine(), cpu_s=cpu, median_cpu_s=med, peak_rss_rise=peak,
                time_ratio={v: med[v] / med["lora"] for v in VARIANTS},
                peak_ratio={v: peak[v] / peak["lora"] for v in VARIANTS})
    out = Path(args.out)
    write_json(out / "gradient-checkpointing.json", data)
    (out / "gradient-checkpointing.md").write_text(render(data))
    print(render(data))
    return 0


def render(data: dict) -> str:
    """Markdown table of the variants with the target row."""
    m = data["machine"]
    lines = ["# Gradient checkpointing variants (MiniLM, LoRA r=8 on q,k,v, 32 x 32 tokens)", "",
             f"Command: `{data['command']}`  ", f"Machine: {m['cpu']}, 1 torch thread, load {m['load']}; torch "
             f"{m['torch']}, transformers {m['transformers']}. CPU time per step (median of interleaved steps); peak "
             "RSS rise over the loaded model during 3 steps in a forked process; ratios to LoRA in the same run.", "",
             "| variant | CPU ms / step | × LoRA | peak RSS rise MiB | × LoRA | meets <= 1.4x time at <= 0.5x memory |",
             "|---|---:|---:|---:|---:|---|"]
    for v, label in VARIANTS.items():
        t, p = data["time_ratio"][v], data["peak_ratio"][v]
        ok = "-" if v in ("lora", "floor") else ("yes" if t <= 1.4 and p <= 0.5 else "no")
        lines.append(f"| {label} | {1e3 * data['median_cpu_s'][v]:.0f} | {t:.2f} | "
                     f"{data['peak_rss_rise'][v] / 2**20:.0f} | {p:.2f} | {ok} |")
    lines += ["", "Why the time does not fall below ~1.5x with every block recomputed: the base is frozen, so the "
              "backward computes no weight gradient of it and costs about what the forward costs; recomputing every "
              "block adds one forward to a step of one forward and one backward. Leaving a block out saves its "
              "recompute but stores its activations: the last block's are alive at the start of the backward "
              "either way (its recompute would follow its forward at once), so storing it costs the least memory; "
              "the first block's add to the peak through the whole backward. Selective checkpointing runs on the "
              "non-reentrant implementation, whose peak is already higher here, and saving the products' outputs "
              "keeps most of the memory."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
