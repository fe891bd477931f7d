"""Smaller bases on MiniLM / tweet sentiment: QLoRA against LoRA, LoRAPrune against magnitude and full-gradient
pruning, LoRAM against LoRA on the full base. Writes docs/benchmarks/compression.{json,md,png}.

Every row trains LoRA (r 8, alpha 16, all linear layers, lr 1e-3, batch 16, 48 tokens) for the same number of
steps and is tested on the same held-out tweets, once per seed; a row's accuracy is the mean with a 95% t-interval
over seeds. Memory is the peak resident set of a child process, measured from before the model loads, while it
trains (the weights resident plus everything training adds); the load itself is excluded (QLoRA's fp32 load is
transient). Step times are medians of interleaved steps in this process, so load changes hit every row alike.

    python bench/compression.py --quick      # 2 seeds, 40 steps (about 20 minutes on two busy shared cores)
    python bench/compression.py              # 3 seeds, 150 steps
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, interleaved, machine, ratio_ci, read_json, summary, write_json  # noqa: E402

import lorakit  # noqa: E402
from lorakit import zoo  # noqa: E402
from lorakit.compress import QuantizeConfig, quantize_  # noqa: E402
from lorakit.compress.loram import LoRAMConfig, align, prune_for_training, recover  # noqa: E402
from lorakit.compress.loraprune import LoRAPrune, LoRAPruneConfig, spearman  # noqa: E402
from lorakit.core.state import AdapterState  # noqa: E402
from lorakit.data import load_task  # noqa: E402
from lorakit.train import evaluate, fit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks"
SETUP = dict(model="minilm", task="tweets", max_train=1500, max_eval=200, max_length=48, batch_size=16, lr=1e-3, r=8,
             alpha=16, targets="all-linear")


def _splits():
    task = load_task(SETUP["task"], kind="classification").subsampled(SETUP["max_train"], SETUP["max_eval"], seed=0)
    _, tok = zoo.load(SETUP["model"], task="seq_cls", num_labels=task.num_labels)
    return task.num_labels, task.encode(tok, SETUP["max_length"])


def _base(seed: int, labels: int, name: str = ""):
    if name == "llama-proportions":  # built from a config (bench/compression_llama.py)
        from compression_llama import build

        return build(seed, labels)
    return zoo.load(name or SETUP["model"], task="seq_cls", num_labels=labels, seed=seed)[0]


def _lora(model):
    cfg = lorakit.LoRAConfig(r=SETUP["r"], lora_alpha=SETUP["alpha"], target_modules=SETUP["targets"], task_type="SEQ_CLS")
    return lorakit.apply(model, cfg)


def _fit(model, splits, steps, seed, callbacks=()):
    return fit(model, splits["train"], None, lr=SETUP["lr"], batch_size=SETUP["batch_size"], max_steps=steps, seed=seed,
               progress=False, callbacks=list(callbacks), warmup_ratio=0.05)


def _acc(model, splits) -> float:
    return evaluate(model, splits["test"], batch_size=64)["accuracy"]


# -- the training rows -----------------------------------------------------------------------------------------
def row_lora(seed, labels, splits, steps, quantize=None):
    model = _base(seed, labels)
    if quantize:
        quantize_(model, quantize)
    _fit(_lora(model), splits, steps, seed)
    return {"accuracy": _acc(model, splits)}


def row_prune(seed, labels, splits, steps, ratio, metric):
    model = _lora(_base(seed, labels))
    pruner = LoRAPrune(model, LoRAPruneConfig(ratio=ratio, metric=metric, prune_freq=max(1, steps // 15)), steps)
    _fit(model, splits, steps, seed, [pruner])
    small = pruner.finalize()
    with tempfile.TemporaryDirectory() as d:
        small.save_pretrained(d)
        disk = sum(f.stat().st_size for f in Path(d).iterdir() if f.suffix == ".safetensors")
    return {"accuracy": _acc(small, splits), "disk_bytes": disk, "sparsity": pruner.sparsity(),
            "parameters": sum(p.numel() for p in small.parameters())}, small


ALIGN = dict(task="fortunes", examples=800, lr=1e-4)  # alignment: unlabelled general text, not the task's


def general_text(tokenizer, max_length: int):
    """The alignment data: fortune-cookie texts (the bundled ``fortunes`` corpus; its labels are never used)."""
    task = load_task(ALIGN["task"], kind="classification").subsampled(ALIGN["examples"], 8, seed=0)
    return task.encode(tokenizer, max_length)["train"]


def row_loram(seed, labels, splits, steps, ratio, align_steps=0, general=None, name="", fit_fn=None, batch_size=16):
    """LoRA trained on a pruned copy (optionally aligned to the full base first), recovered, tested on the full base."""
    full = _base(seed, labels, name)
    small, rec = prune_for_training(full, LoRAMConfig(ratio=ratio))
    if align_steps:
        align(small, general, teacher=full, lr=ALIGN["lr"], batch_size=batch_size, max_steps=align_steps, seed=seed,
              progress=False, warmup_ratio=0.05)
    (fit_fn or _fit)(_lora(small), splits, steps, seed)
    recover(AdapterState.from_model(small), rec).load_into(full)
    return {"accuracy": _acc(full, splits), "pruned_accuracy": _acc(small, splits)}


def row_head_only(seed, labels, splits, steps, name="", fit_fn=None):
    """The task head alone trained on the full base: what LoRAM's recovered LoRA factors must add to."""
    model = _base(seed, labels, name)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(HEADS))
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"no task head ({', '.join(HEADS)}) in {name or SETUP['model']}")
    (fit_fn or _fit)(model, splits, steps, seed)
    return {"accuracy": _acc(model, splits)}


HEADS = ("classifier.", "score.")  # MiniLM's and gemma's sequence-classification heads


LORAM_ROWS = ("lora", "head-only", "loram-0.5", "loram-0.5+align")


def loram_accuracy(seeds, steps, align_steps, labels, splits, general, name="", fit_fn=None, batch_size=16,
                   rows=None, save=None, kinds=LORAM_ROWS) -> dict:
    """Per seed: LoRA on the full base, the head alone there, LoRAM (50% pruned) recovered onto the full base, and
    LoRAM after ``align_steps`` of alignment (those of ``kinds``); rows already in ``rows`` are kept, ``save(rows)``
    after each."""
    rows = rows if rows is not None else {}
    for i, seed in enumerate(seeds):
        for kind in kinds:
            if len(rows.get(kind, [])) > i:
                continue
            t0 = time.time()
            if kind == "lora":
                model = _lora(_base(seed, labels, name))
                (fit_fn or _fit)(model, splits, steps, seed)
                row = {"accuracy": _acc(model, splits)}
            elif kind == "head-only":
                row = row_head_only(seed, labels, splits, steps, name, fit_fn)
            else:
                row = row_loram(seed, labels, splits, steps, 0.5, align_steps if kind.endswith("+align") else 0,
                                general, name, fit_fn, batch_size)
            rows.setdefault(kind, []).append({**row, "seed": seed, "train_s": round(time.time() - t0)})
            print(f"  seed {seed} {kind}: {row['accuracy']:.3f} ({round(time.time() - t0)} s)", flush=True)
            save and save(rows)
    return rows


def merged_loram(files) -> dict:
    """The LoRAM accuracy rows of several part files (one per process, each some seeds), by kind and seed."""
    rows, setup = {}, None
    for f in files:
        part = read_json(f) or {}
        block = part.get("loram_accuracy", part)
        if "rows" not in block:
            continue
        same = {k: v for k, v in block["setup"].items() if k != "seeds"}
        if setup is not None and same != setup:
            raise SystemExit(f"{f}: another set-up than the other LoRAM part files ({same} vs {setup})")
        setup = same
        for kind, entries in block["rows"].items():
            rows.setdefault(kind, {}).update({r["seed"]: r for r in entries})
    order = sorted(rows, key=lambda k: LORAM_ROWS.index(k) if k in LORAM_ROWS else len(LORAM_ROWS))
    rows = {k: [rows[k][s] for s in sorted(rows[k])] for k in order}
    seeds = sorted({r["seed"] for entries in rows.values() for r in entries})
    return {"rows": rows, "setup": {**(setup or {}), "seeds": seeds}}


def run_loram_accuracy(seeds: list[int], steps: int, align_steps: int, write: bool = True) -> None:
    """The MiniLM LoRAM accuracy rows into compression.json under ``loram_accuracy``; rewrite the page."""
    start = time.time()
    labels, splits = _splits()
    tok = zoo.load(SETUP["model"], task="seq_cls", num_labels=labels)[1]
    part = OUT / f".compression-loram-s{'-'.join(map(str, seeds))}.json"
    saved = read_json(part) or {}
    setup = {"steps": steps, "align_steps": align_steps, "seeds": seeds, "ratio": 0.5, "align": ALIGN}
    rows = saved.get("rows", {}) if saved.get("setup") == setup else {}
    rows = loram_accuracy(seeds, steps, align_steps, labels, splits, general_text(tok, SETUP["max_length"]), rows=rows,
                          save=lambda r: write_json(part, {"rows": r, "setup": setup}))
    if write:  # else one of several processes: the rows stay in the part file
        loram_page({"command": command_line(), "machine": machine(), "wall_time_s": round(time.time() - start)})


def loram_page(run: dict) -> None:
    """Every MiniLM LoRAM part file's rows into compression.json under ``loram_accuracy``; rewrite the page."""
    from compression_report import write_page

    result = read_json(OUT / "compression.json")
    result["loram_accuracy"] = {**merged_loram(sorted(OUT.glob(".compression-loram*.json"))), **run}
    write_json(OUT / "compression.json", result)
    write_page(result, OUT)


# -- memory probes (module-level: they run in a forkserver child) -------------------------------------------
def _prepare(model, kind: str):
    """The base a memory row trains on. ``qlora-nf4``, ``qlora-int8``: linear layers quantised, the rest fp32;
    ``qlora-nf4-bf16``: QLoRA's set-up (bf16 compute, embeddings and norms in bf16); ``lora-bf16``: the whole base
    in bf16; ``loram-R``: R of the FFN channels and head groups pruned (in place); ``qloram-R``: pruned, then QLoRA's
    set-up. A ``+gc`` suffix (gradient checkpointing) is handled by the caller."""
    kind = kind.split("+")[0]
    if kind.startswith(("loram", "qloram")):
        model = prune_for_training(model, LoRAMConfig(ratio=float(kind.split("-")[1])), inplace=True)[0]
        kind = "qlora-nf4-bf16" if kind.startswith("qloram") else "lora"
    if kind == "lora-bf16":
        model.to(torch.bfloat16)
    elif kind.startswith("qlora"):
        bits = kind.split("-")[1]
        half = kind.endswith("-bf16")
        quantize_(model, QuantizeConfig(bits, compute_dtype=torch.bfloat16 if half else torch.float32,
                                        dtype=torch.bfloat16 if half else None))
    return model


def _imported(*args):
    """Import the quantisation backends before the baseline is read, so every probe starts from the same code."""
    from lorakit.compress.quantize import _bnb

    _bnb()
    return args


def training_model(kind: str, labels: int, name: str = ""):
    """The base prepared for ``kind``, with LoRA, in training mode (gradient checkpointing for ``+gc``)."""
    model = _lora(_prepare(_base(0, labels, name), kind)).train()
    if kind.endswith("+gc"):
        from lorakit.train.precision import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    return model


def _random_batch(model, labels: int) -> dict:
    return {"input_ids": torch.randint(1000, 20000, (SETUP["batch_size"], SETUP["max_length"])),
            "labels": torch.randint(0, labels, (SETUP["batch_size"],))}


def _prune_step_setup(metric, labels, name=""):
    torch.manual_seed(0)
    model = _lora(_base(0, labels, name))
    pruner = LoRAPrune(model, LoRAPruneConfig(metric=metric), 10) if metric != "none" else None
    batch = _random_batch(model, labels)
    model(**batch).loss.backward()  # a first step outside the measurement: lazy allocations happen here
    if pruner:
        pruner.update_scores()
    model.zero_grad(set_to_none=True)
    return model, pruner, batch


def weight_bytes(labels, kinds=("lora", "qlora-nf4", "qlora-int8", "loram-0.5"), name="") -> dict:
    """Bytes of every parameter and buffer (quantisation state included) of the model each row trains."""
    out = {}
    for kind in kinds:
        model = _prepare(_base(0, labels, name), kind)
        total = sum(t.untyped_storage().nbytes() for t in list(model.parameters()) + list(model.buffers()))
        for m in model.modules():  # bitsandbytes keeps scales outside the parameters
            state = getattr(getattr(m, "weight", None), "quant_state", None)
            total += state.absmax.untyped_storage().nbytes() if state is not None else 0
            scb = getattr(getattr(m, "weight", None), "SCB", None)
            total += scb.untyped_storage().nbytes() if scb is not None else 0
        out[kind] = total
    return out


TRAIN_KINDS = ("lora", "qlora-nf4", "qlora-int8", "loram-0.5")


def memory(labels, quick, name="", kinds=TRAIN_KINDS, out=None, save=None, workers=1, prune=True) -> dict:
    """Per kind, in a fresh child process: the peak RSS of training and the tensor peak of a profiled step
    (``probe``); then (``prune``) the peak RSS rise of one pruning step per metric. Rows already in ``out`` are kept;
    ``save(out)`` runs after every probe, so a killed run keeps what it measured. Memory does not depend on the
    machine's load, so ``workers`` children may run at once. LoRAPrune's scoring step: the tensor peak per metric
    (``prune_step_peak``; the RSS rise of earlier runs was within the allocator's reuse of the warm-up step)."""
    import concurrent.futures
    import multiprocessing as mp

    steps = 1 if name else 3 if quick else 5
    out = out or {"train_peak": {}, "tensor_peak": {}}
    if not name:  # resident bytes per kind (MiniLM only: each costs a model load)
        out["weights"] = weight_bytes(labels, [k for k in kinds if "+" not in k], name)
    todo = [k for k in kinds if k not in out["train_peak"]]
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=mp.get_context("forkserver"),
                                                max_tasks_per_child=1) as pool:
        jobs = {pool.submit(probe, kind, steps, labels, name): kind for kind in todo}
        for job in concurrent.futures.as_completed(jobs):
            kind = jobs[job]
            out["train_peak"][kind], out["tensor_peak"][kind] = job.result()
            print(f"  {kind}: peak RSS {out['train_peak'][kind] / 2**20:.0f} MiB, tensors "
                  f"{out['tensor_peak'][kind]['total'] / 2**20:.0f} MiB", flush=True)
            save and save(out)
        peaks = out.setdefault("prune_step_peak", {})
        jobs = {pool.submit(prune_probe, m, labels, name): m for m in PRUNE_METRICS if prune and m not in peaks}
        for job in concurrent.futures.as_completed(jobs):
            peaks[jobs[job]] = job.result()
            print(f"  pruning step {jobs[job]}: tensor peak {peaks[jobs[job]]['total'] / 2**20:.0f} MiB", flush=True)
            save and save(out)
    return out


PRUNE_METRICS = ("none", "lora", "grad", "magnitude")


def prune_probe(metric: str, labels: int, name: str = "") -> dict:
    """Run in a fresh child: the tensor peak of one scored step (forward, backward, LoRAPrune's scoring under
    ``metric``; "none": no pruner) after a warm-up step, and ``held``: the gradient state the metric holds for
    scoring at the end of the backward pass (LoRA factor gradients, or the full weight gradients G)."""
    torch.set_num_threads(1)
    model, pruner, batch = _prune_step_setup(metric, labels, name)
    held = {}

    def step():
        model(**batch).loss.backward()
        held["bytes"] = sum(t.numel() * t.element_size() for g in pruner.grads.values() for t in g.values()) if pruner else 0
        if pruner:
            pruner.update_scores()

    return {**_profiled_peak(step), "held": held["bytes"]}


def _profiled_peak(fn) -> dict:
    """The peak of live tensor bytes while ``fn()`` runs, by torch.profiler's memory-timeline categories."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    names = ["unknown"] + [c.name.lower() if c is not None else "uncategorised" for c in _CATEGORY_TO_INDEX]
    at = max(sizes, key=sum)
    return {"total": int(sum(at)), "by_category": {names[i]: int(v) for i, v in enumerate(at) if v}}


def probe(kind: str, steps: int, labels: int, name: str = "") -> tuple[int, dict]:
    """Run in a fresh child: the peak RSS over ``steps`` training steps above the RSS before the model loads
    (what loading left behind dropped first), then the peak of live tensor bytes in one more, profiled step, by
    the categories of torch.profiler's memory timeline (parameters, activations, optimiser state, ...)."""
    from common import status_kib

    _imported()
    torch.set_num_threads(1)
    gc.collect()
    before = status_kib("VmRSS")
    torch.manual_seed(0)
    model = training_model(kind, labels, name)
    batch = _random_batch(model, labels)
    opt = torch.optim.AdamW(lorakit.trainable_parameters(model).values(), lr=1e-3)

    def step():
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on: resident weights + training
    for _ in range(steps):
        step()
    rss = (status_kib("VmHWM") - before) * 1024
    return rss, _profiled_peak(step)


# -- timing -------------------------------------------------------------------------------------------------
def step_times(labels, splits, n) -> dict:
    """Seconds per training step, LoRA on the fp32 base against LoRA on nf4 and int8 bases, interleaved."""
    batch = splits["train"].collate([splits["train"][i] for i in range(SETUP["batch_size"])])
    fns = {}
    for kind in ("lora", "nf4", "int8"):
        model = _base(0, labels)
        if kind != "lora":
            quantize_(model, kind)
        _lora(model).train()

        def step(model=model):
            model(**batch).loss.backward()
            model.zero_grad(set_to_none=True)

        fns[kind] = step
    return interleaved(fns, warmup=2, n=n)


def throughput(models: dict, splits, n) -> dict:
    """Tokens per second of a forward pass on a test batch (64 examples), interleaved across models."""
    batch = splits["test"].collate([splits["test"][i] for i in range(64)])
    batch.pop("labels", None)
    tokens = int(batch["attention_mask"].sum())

    def forward(m):
        with torch.no_grad():
            m(**batch)

    times = interleaved({k: (lambda m=m: forward(m)) for k, m in models.items()}, warmup=2, n=n)
    return {k: {"tokens_per_s": tokens / float(np.median(v)), "times": v} for k, v in times.items()}


def score_correlation(labels, splits) -> list[float]:
    """Spearman correlation of LoRA-guided and true-gradient FFN channel scores per layer, after 30 LoRA steps."""
    model = _lora(_base(0, labels))
    _fit(model, splits, 30, 0)
    lora, grad = (LoRAPrune(model, LoRAPruneConfig(metric=m), 10) for m in ("lora", "grad"))
    for i in range(4):
        part = [splits["train"][j] for j in range(16 * i, 16 * i + 16)]
        model(**splits["train"].collate(part)).loss.backward()
    for p in (lora, grad):
        p.update_scores()
    return [spearman(lora.scores[b.path]["channels"], grad.scores[b.path]["channels"]) for b in lora.blocks]


def redo_memory(quick: bool) -> None:
    """Measure the MiniLM memory rows again (peak RSS and tensor peaks; rows already measured by this code are
    kept) into the saved results; rewrite the page."""
    from common import read_json
    from compression_report import write_page

    result = read_json(OUT / "compression.json")
    if result is None:
        raise SystemExit(f"{OUT / 'compression.json'}: run the benchmark first")
    labels = load_task(SETUP["task"], kind="classification").num_labels
    start = time.time()
    saved = result["memory"] if "tensor_peak" in result["memory"] else None  # continue a run of this code
    result["memory"] = memory(labels, quick, kinds=TRAIN_KINDS + ("qlora-nf4-bf16",), out=saved)
    result["memory_run"] = {"command": command_line(), "machine": machine(), "wall_time_s": round(time.time() - start)}
    write_json(OUT / "compression.json", result)
    write_page(result, OUT)


def measure_stages(labels, splits, quick, pruned_models) -> dict:
    """Everything but the accuracy rows: disk size, step times, throughput, memory, score correlation."""
    full = _base(0, labels).eval()
    with tempfile.TemporaryDirectory() as d:
        full.save_pretrained(d)
        full_disk = sum(f.stat().st_size for f in Path(d).iterdir() if f.suffix == ".safetensors")
    print("timing", flush=True)
    n = 10 if quick else 20
    times = step_times(labels, splits, n)
    tput = throughput({"full": full, **{k: m.eval() for k, m in pruned_models.items()}}, splits, n)
    print("memory", flush=True)
    mem = memory(labels, quick)
    return {
        "full_disk_bytes": full_disk, "full_parameters": sum(p.numel() for p in full.parameters()),
        "step_ms": {k: summary(v) for k, v in times.items()},
        "step_ratio_ci": {k: ratio_ci(times[k], times["lora"]) for k in times if k != "lora"},
        "throughput": {k: v["tokens_per_s"] for k, v in tput.items()},
        "throughput_ratio_ci": {k: ratio_ci(tput["full"]["times"], v["times"]) for k, v in tput.items() if k != "full"},
        "memory": mem, "spearman_lora_vs_grad": score_correlation(labels, splits),
    }


def assemble(rows, stages, steps, seeds, quick, start) -> dict:
    """The result JSON from the accuracy rows and the other measurements."""
    return {
        "setup": {**SETUP, "steps": steps, "seeds": seeds, "quick": quick}, "command": command_line(),
        "machine": machine(), "wall_time_s": round(time.time() - start), "rows": rows, **stages,
        "gemma_270m": "not run: the quick mode covers MiniLM only (gemma-270m needs the full mode and about 11 GB)",
    }


def stages_only(quick: bool, steps: int) -> None:
    """Measure the stages beside a running accuracy pass (its per-seed rows land in .compression-rows.json)."""
    labels, splits = _splits()
    pruned = {}
    for ratio in (0.2, 0.5):  # the pruned models whose speed is timed: one LoRAPrune run each, seed 0
        pruned[f"pruned-{ratio}"] = row_prune(0, labels, splits, steps, ratio, "lora")[1]
    write_json(OUT / ".compression-stages.json", measure_stages(labels, splits, quick, pruned))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--stages-only", action="store_true", help="measure speed, memory and correlation only")
    ap.add_argument("--memory-only", action="store_true", help="measure the memory rows again into compression.json")
    ap.add_argument("--loram-accuracy", action="store_true",
                    help="LoRAM's recovered adapter against LoRA and the head alone on the full base, with and without "
                         "alignment, into compression.json")
    ap.add_argument("--align-steps", type=int, default=50)
    ap.add_argument("--loram-page", metavar="WALL_S", type=int, default=None,
                    help="put the LoRAM part files' rows on the page (the wall time of the processes that made them)")
    ap.add_argument("--only-seeds", default="", help="--loram-accuracy in several processes: the seeds of this one "
                    "(rows kept in a part file; a run without it puts every part file's rows on the page)")
    ap.add_argument("--assemble", type=int, default=None, metavar="WALL_S",
                    help="write the page from the saved rows and stages (the wall time of the two passes)")
    args = ap.parse_args(argv)
    if args.memory_only:
        torch.set_num_threads(1)
        return redo_memory(args.quick)
    if args.loram_page is not None:
        return loram_page({"command": f"{command_line([]).rstrip()} --loram-accuracy --steps {args.steps} "
                           f"--align-steps {args.align_steps} --only-seeds S (one process per seed set), then "
                           f"{command_line()}", "machine": machine(), "wall_time_s": args.loram_page})
    if args.loram_accuracy:
        torch.set_num_threads(1)
        seeds = [int(x) for x in args.only_seeds.split(",")] if args.only_seeds else list(range(args.seeds or 3))
        return run_loram_accuracy(seeds, args.steps or 150, args.align_steps, write=not args.only_seeds)
    if args.stages_only or args.assemble:
        torch.set_num_threads(1)
        steps = args.steps or (40 if args.quick else 150)
        if args.stages_only:
            return stages_only(args.quick, steps)
        from common import read_json

        seeds = list(range(args.seeds or (2 if args.quick else 3)))
        rows = {k: v[: len(seeds)] for k, v in read_json(OUT / ".compression-rows.json").items()}
        result = assemble(rows, read_json(OUT / ".compression-stages.json"), steps, seeds, args.quick, time.time())
        result["wall_time_s"] = args.assemble
        base = command_line([]).rstrip()
        result["command"] = (f"{base} --quick (accuracy rows) and {base} --quick --stages-only (speed, memory, "
                             f"correlation) side by side, then {command_line()}")
        write_json(OUT / "compression.json", result)
        from compression_report import write_page

        return write_page(result, OUT)
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # int8 logs its fp16 cast at every matmul
    seeds = list(range(args.seeds or (2 if args.quick else 3)))
    steps = args.steps or (40 if args.quick else 150)
    start = time.time()
    labels, splits = _splits()
    rows: dict[str, list[dict]] = {}
    pruned_models = {}
    for seed in seeds:
        print(f"seed {seed}", flush=True)
        rows.setdefault("lora", []).append(row_lora(seed, labels, splits, steps))
        rows.setdefault("qlora-nf4", []).append(row_lora(seed, labels, splits, steps, "nf4"))
        for ratio in (0.2, 0.5):
            for metric in ("lora", "grad", "magnitude"):
                entry, small = row_prune(seed, labels, splits, steps, ratio, metric)
                rows.setdefault(f"prune-{metric}-{ratio}", []).append(entry)
                if seed == 0 and metric == "lora":
                    pruned_models[f"pruned-{ratio}"] = small
        rows.setdefault("loram-0.5", []).append(row_loram(seed, labels, splits, steps, 0.5))
        print({k: round(v[-1]["accuracy"], 3) for k, v in rows.items()}, flush=True)
        write_json(OUT / ".compression-rows.json", rows)  # kept if a later stage fails
    write_json(OUT / ".compression-rows.json", rows)
    stages = measure_stages(labels, splits, args.quick, pruned_models)
    result = assemble(rows, stages, steps, seeds, args.quick, start)
    write_json(OUT / "compression.json", result)
    from compression_report import write_page

    write_page(result, OUT)
    print(f"wrote {OUT / 'compression.md'} in {result['wall_time_s']} s")


if __name__ == "__main__":
    main()
