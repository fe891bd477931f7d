"""Multi-job LoRA training (LoRAFusion-style) against running the jobs one after another and against PEFT's
multi-adapter model with mixed batches.

Workload: all-MiniLM-L6-v2 sequence classification on the bundled tweets task; N = 4, 8, 16 jobs, each with its
own rank (4, 8, 16 in turn), lr, batch size (8 or 16), seed and 64-example training subset, LoRA on query/value
plus a classification head per job, a fixed number of optimiser steps each. Systems, each timed from the loaded
base to every adapter trained (setup included):
- ``sequential``: lorakit's normal path per job, one after another (seeded ``apply``, ``fit``, ``unwrap``);
- ``multi``: ``lorakit.train.multi.MultiTrainer`` (shared micro-batches, the per-job segment kernel of
  ``lorakit.train.multi_kernel``, fused epilogue);
- ``multi_serve_op``: the same trainer on the serving engine's batched operator with its backward
  (``backend="segments"``: what the kernel replaced);
- ``peft``: one ``PeftModel`` holding every job's adapter and head, rows routed by ``adapter_names`` (PEFT
  refuses ``adapter_names`` in training mode, so the model runs in eval mode: dropout is 0, the computation is the
  same), the same micro-batches, per-job losses, AdamW, schedule and clipping as ``multi``.
Every system starts from each job's same initial adapter and must end equal to the sequential run (per-job max
|diff| reported). Throughput counts real (unpadded) training tokens. The systems alternate run by run in one
process (median of ``--repeats``); peak memory is the rise of peak RSS over the loaded base, in a forked child.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python bench/multi_job.py [--quick] [--profile]

writes docs/benchmarks/multi-job.md, .json and .png (``--quick``: fewer steps and repeats; the same jobs).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine, peak_rss_rise, write_json  # noqa: E402

import lorakit  # noqa: E402
from lorakit import LoRAConfig, zoo  # noqa: E402
from lorakit.data import load_task  # noqa: E402
from lorakit.train import TrainConfig, fit  # noqa: E402
from lorakit.train.multi import Job, MultiTrainer, base_dropout, row_losses  # noqa: E402
from lorakit.train.multi_pack import pack  # noqa: E402

TARGETS = ["query", "value"]
MAX_TOKENS = 1024


def base():
    """MiniLM with its dropout off (every system then computes the same thing; multi-job training refuses dropout)."""
    model, tok = zoo.load("minilm", "seq_cls", num_labels=3, seed=0)
    base_dropout(model, disable=True)
    return model, tok


def make_jobs(n: int, steps: int, tok) -> list[Job]:
    """N jobs with their own rank, lr, batch size, seed and data."""
    task = load_task("tweets")
    out = []
    for i in range(n):
        r, bs = (4, 8, 16)[i % 3], (8, 16)[i % 2]
        data = task.subsampled(64, 8, seed=i).encode(tok, 64)["train"]
        adapter = LoRAConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, task_type="SEQ_CLS")
        cfg = TrainConfig(lr=(5e-4, 1e-3, 2e-3)[i % 3], batch_size=bs, max_steps=steps, seed=i, progress=False,
                          log_every=steps)
        out.append(Job(f"job{i}", adapter, data, cfg))
    return out


def tokens(jobs: list[Job]) -> int:
    """Real tokens every job trains on (its steps × batch, in its data order, unpadded)."""
    from torch.utils.data.distributed import DistributedSampler

    from lorakit.train.loop import epoch_groups

    total = 0
    for j in jobs:
        s = DistributedSampler(j.train_data, num_replicas=1, rank=0, shuffle=True, seed=j.config.seed)
        groups, epoch = [], 0
        while len(groups) < j.config.max_steps:
            groups += epoch_groups(s, epoch, j.config)
            epoch += 1
        total += sum(len(j.train_data[i]["input_ids"]) for g in groups[: j.config.max_steps] for m in g for i in m)
    return total


def padded_tokens(jobs: list[Job]) -> dict[str, int]:
    """Tokens run through the base, padding included: each job's own batches (sequential, PEFT's and lorakit's
    micro-batches are the shared ones)."""
    from torch.utils.data.distributed import DistributedSampler

    from lorakit.train.loop import epoch_groups

    seq, rounds = 0, {}
    for j in jobs:
        s = DistributedSampler(j.train_data, num_replicas=1, rank=0, shuffle=True, seed=j.config.seed)
        groups = epoch_groups(s, 0, j.config)[: j.config.max_steps]
        for step, g in enumerate(groups):
            for m in g:
                lens = [len(j.train_data[i]["input_ids"]) for i in m]
                seq += len(lens) * max(lens)
                rounds.setdefault(step, []).extend(lens)
    shared = sum(len(b) * max(b) for lens in rounds.values() for b in pack(lens, MAX_TOKENS, length=lambda n: n))
    return {"sequential": seq, "shared": shared}


def run_sequential(model, jobs):
    """lorakit's normal path, one job after another: each job's trained tensors by name."""
    out = {}
    for j in jobs:
        torch.manual_seed(j.config.seed)
        lorakit.apply(model, j.adapter)
        fit(model, j.train_data, config=j.config)
        out[j.name] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        lorakit.unwrap(model)
    return out


def run_multi(model, jobs, backend="jobs"):
    trainer = MultiTrainer(model, max_tokens=MAX_TOKENS, backend=backend)
    for j in jobs:
        trainer.add(j)
    results = trainer.run()
    assert all(r.status == "done" for r in results.values()), {n: r.error for n, r in results.items()}
    return {n: {k: p.detach().clone() for k, p in run.named.items()} for n, run in trainer.closed.items()}


def run_multi_serve_op(model, jobs):
    return run_multi(model, jobs, backend="segments")


def run_peft(model, jobs):
    """PEFT's multi-adapter model: each job an adapter (and head copy); mixed micro-batches via adapter_names."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from torch.utils.data.distributed import DistributedSampler

    from lorakit.train.loop import epoch_groups
    from lorakit.train.schedule import lr_multiplier, warmup_count

    inits = initial_states(model, jobs)
    peft_model = None
    for j in jobs:
        cfg = PeftLoraConfig(r=j.adapter.r, lora_alpha=j.adapter.lora_alpha, target_modules=TARGETS,
                             task_type="SEQ_CLS", lora_dropout=0.0)
        if peft_model is None:
            peft_model = get_peft_model(model, cfg, adapter_name=j.name)
        else:
            peft_model.add_adapter(j.name, cfg)
    state = {}
    for j in jobs:
        params = []
        for name, value in inits[j.name].items():  # lorakit names: <path>.lora_A.weight, classifier.module.weight
            path, _, leaf = name.rpartition(".")
            path, _, kind = path.rpartition(".")
            module = peft_model.base_model.model.get_submodule(path)
            p = module.modules_to_save[j.name] if kind == "module" else getattr(module, kind)[j.name]
            p = p.weight if kind != "module" and leaf == "weight" else getattr(p, leaf)
            with torch.no_grad():
                p.copy_(value)
            p.requires_grad_(True)
            params.append((name, p))
        opt = lorakit.optim.create("adamw", _Holder([p for _, p in params]), j.config.lr, j.config.weight_decay)
        total = j.config.max_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(j.config.schedule, warmup_count(
            total, j.config.warmup_ratio, j.config.warmup_steps), total))
        sampler = DistributedSampler(j.train_data, num_replicas=1, rank=0, shuffle=True, seed=j.config.seed)
        state[j.name] = dict(params=params, opt=opt, sched=sched, groups=epoch_groups(sampler, 0, j.config))
    peft_model.eval()  # PEFT refuses adapter_names in training mode; dropout is 0, so the computation is the same
    collate = jobs[0].train_data.collate
    for step in range(max(j.config.max_steps for j in jobs)):
        rows = []
        for j in jobs:
            if step < j.config.max_steps:
                group = state[j.name]["groups"][step]
                for micro in group:
                    rows += [(j.name, j.train_data[i], float(len(micro) * len(group))) for i in micro]
        order = {j.name: k for k, j in enumerate(jobs)}
        for micro in pack(rows, MAX_TOKENS, length=lambda row: len(row[1]["input_ids"])):
            micro.sort(key=lambda row: order[row[0]])
            batch = collate([r[1] for r in micro])
            logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                adapter_names=[r[0] for r in micro]).logits
            loss = (row_losses(logits, batch["labels"]) / torch.tensor([r[2] for r in micro])).sum()
            loss.backward()
        for j in jobs:
            if step < j.config.max_steps:
                s = state[j.name]
                torch.nn.utils.clip_grad_norm_([p for _, p in s["params"]], j.config.max_grad_norm)
                s["opt"].step()
                s["sched"].step()
                s["opt"].zero_grad(set_to_none=True)
    out = {j.name: {n: p.detach().clone() for n, p in state[j.name]["params"]} for j in jobs}
    peft_model.unload()  # the base model back, unchanged
    return out


class _Holder(torch.nn.Module):
    """A module holding a list of parameters (what lorakit.optim.create takes)."""

    def __init__(self, params):
        super().__init__()
        self.params = torch.nn.ParameterList(params)


def initial_states(model, jobs):
    """Each job's initial adapter, as lorakit draws it (seeded apply)."""
    out = {}
    for j in jobs:
        torch.manual_seed(j.config.seed)
        lorakit.apply(model, j.adapter)
        out[j.name] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        lorakit.unwrap(model)
    return out


SYSTEMS = {"sequential": run_sequential, "multi": run_multi, "multi_serve_op": run_multi_serve_op, "peft": run_peft}


def _mem_setup(n, steps):
    model, tok = base()
    return model, make_jobs(n, steps, tok)


def _mem_sequential(state):
    run_sequential(*state)


def _mem_multi(state):
    run_multi(*state)


def _mem_multi_serve_op(state):
    run_multi_serve_op(*state)


def _mem_peft(state):
    run_peft(*state)


MEM = {"sequential": _mem_sequential, "multi": _mem_multi, "multi_serve_op": _mem_multi_serve_op, "peft": _mem_peft}


def max_diff(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


def measure(n: int, steps: int, repeats: int) -> dict:
    model, tok = base()
    for p in model.parameters():
        p.requires_grad_(False)
    jobs = make_jobs(n, steps, tok)
    real = tokens(jobs)
    padded = padded_tokens(jobs)
    times, cpu = {s: [] for s in SYSTEMS}, {s: [] for s in SYSTEMS}
    results = {}
    for rep in range(repeats):
        order = list(SYSTEMS) if rep % 2 == 0 else list(reversed(SYSTEMS))  # alternate who goes first
        for system in order:
            fresh = [dataclasses.replace(j) for j in jobs]
            t0, c0 = time.perf_counter(), time.process_time()
            results[system] = SYSTEMS[system](model, fresh)
            times[system].append(time.perf_counter() - t0)
            cpu[system].append(time.process_time() - c0)
            print(f"N={n} {system}: {times[system][-1]:.2f}s wall, {cpu[system][-1]:.2f}s CPU", flush=True)
    ref = results["sequential"]
    row = {"jobs": n, "steps": steps, "tokens": real, "padded_tokens": padded, "seconds": times,
           "median_s": {s: float(np.median(t)) for s, t in times.items()}}
    row["cpu_seconds"] = cpu
    row["median_cpu_s"] = {s: float(np.median(t)) for s, t in cpu.items()}
    row["tokens_per_s"] = {s: real / m for s, m in row["median_s"].items()}
    row["speedup_vs_sequential"] = {s: row["median_s"]["sequential"] / m for s, m in row["median_s"].items()}
    row["tokens_per_cpu_s"] = {s: real / m for s, m in row["median_cpu_s"].items()}
    row["cpu_speedup_vs_sequential"] = {s: row["median_cpu_s"]["sequential"] / m for s, m in row["median_cpu_s"].items()}
    row["max_abs_diff_vs_sequential"] = {s: max(max_diff(results[s][j.name], ref[j.name]) for j in jobs)
                                         for s in SYSTEMS if s != "sequential"}
    peak = {s: peak_rss_rise(_mem_setup, MEM[s], n, steps) for s in SYSTEMS}
    row["peak_rss_rise_bytes"] = peak
    row["peak_ratio_vs_sequential"] = {s: peak[s] / peak["sequential"] for s in SYSTEMS}
    return row


def op_backends(repeats: int = 15) -> list[dict]:
    """Forward + backward of one adapted 384x384 layer (MiniLM's width), rank 16, tokens in slot order: the batched
    operator's backends, fused (in place) and not, against a per-slot loop of dense products; CPU ms, median."""
    from lorakit.serve import ops
    from lorakit.train.multi_kernel import job_segment_lora
    from lorakit.train.multi_lora import batched_lora

    torch.manual_seed(0)
    out = []
    for k, t in ((4, 1024), (16, 1024), (16, 4096)):
        counts = torch.randint(20, 120, (k,))
        counts = (counts * t / counts.sum()).long()
        slot = torch.repeat_interleave(torch.arange(k), counts)
        plan = ops.plan_step(torch.zeros(len(slot), dtype=torch.long), slot, ["c"])
        x = torch.randn(len(slot), 384, requires_grad=True)
        w = torch.randn(384, 384)
        at, bt = torch.randn(k, 384, 16, requires_grad=True), torch.randn(k, 16, 384, requires_grad=True)

        def loop():
            outs, start = [], 0
            for i, c in enumerate(counts.tolist()):
                outs.append((x[start:start + c] @ at[i]) @ bt[i])
                start += c
            (x @ w.T + torch.cat(outs)).sum().backward()

        cases = {"base layer only": lambda: (x @ w.T).sum().backward(), "per-slot loop (autograd)": loop}
        layers, start = [], 0
        for i, c in enumerate(counts.tolist()):
            layer = torch.nn.Module()
            layer.lora_A, layer.lora_B = torch.nn.Linear(384, 16, bias=False), torch.nn.Linear(16, 384, bias=False)
            layer.scaling = 2.0
            layers.append((start, start + c, layer))
            start += c
        for fused in (True, False):
            cases[f"per-job segments (training kernel){'' if fused else ', unfused'}"] = (
                lambda f=fused: job_segment_lora(x @ w.T, x, layers, f).sum().backward())
        for backend in ("segments", "bmm", "grouped"):
            for fused in (True, False):
                cases[f"serving operator: {backend}{'' if fused else ', unfused'}"] = (
                    lambda b=backend, f=fused: batched_lora(x @ w.T, x, plan, {"c": (at, bt)}, f, b).sum().backward())
        for name, fn in cases.items():
            fn()
            times = []
            for _ in range(repeats):
                c0 = time.process_time()
                fn()
                times.append(time.process_time() - c0)
            out.append({"slots": k, "tokens": int(len(slot)), "case": name, "cpu_ms": 1e3 * float(np.median(times))})
    return out


def profile(n: int, steps: int) -> str:
    """Self-CPU table of one multi run and one sequential run of N jobs."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model, tok = base()
    out = []
    for system in ("multi", "sequential"):
        jobs = make_jobs(n, steps, tok)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            SYSTEMS[system](model, jobs)
        out.append(f"{system}, N={n}:\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14,
                                                                      max_name_column_width=36))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 steps per job, 3 repeats")
    ap.add_argument("--jobs", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--profile", action="store_true", help="add a torch.profiler table for the largest N")
    ap.add_argument("--out", default="docs/benchmarks/multi-job")
    ap.add_argument("--op-only", action="store_true", help="rerun only the operator table into an existing --out")
    args = ap.parse_args()
    if args.op_only:
        from common import read_json
        from multi_job_report import render

        data = read_json(Path(args.out + ".json"))
        data["op"] = op_backends()
        write_json(Path(args.out + ".json"), data)
        Path(args.out + ".md").write_text(render(data))
        return
    steps, repeats = args.steps or (3 if args.quick else 8), args.repeats or (3 if args.quick else 5)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = [measure(n, steps, repeats) for n in args.jobs]
    data = {"command": command_line(), "machine": machine(), "max_tokens": MAX_TOKENS, "targets": TARGETS,
            "rows": rows}
    data["op"] = op_backends()
    if args.profile:
        data["profile"] = profile(max(args.jobs), steps)
    from multi_job_report import plot, render

    write_json(Path(args.out + ".json"), data)
    Path(args.out + ".md").write_text(render(data))
    plot(data, Path(args.out + ".png"))
    print(render(data))


if __name__ == "__main__":
    main()
