"""The gemma-270m rows of docs/benchmarks/compression.md: QLoRA and LoRAM against LoRA on the fp32 base (peak
memory with and without gradient checkpointing, where the peak goes, step time), LoRAPrune's scoring memory, and a
short accuracy check. Stored under ``gemma_270m`` in docs/benchmarks/compression.json; the page is rewritten.

Every memory and timing row trains the same batch (16 x 48 random token ids, 3-way sequence classification, LoRA r 8
on all linear layers, AdamW); the kinds are those of ``compression._prepare``. Two memory measures, each in a fresh
child process per row: the peak resident set over the resident set before the model loads (what the machine
sees) and the peak of live tensor bytes in a profiled step (torch.profiler's memory timeline; what
``torch.cuda.max_memory_allocated`` reports on a GPU). Stages write docs/benchmarks/.compression-gemma-STAGE.json as they
finish (one file per stage), so they can run as separate processes:

    python bench/compression_gemma.py --stage memory     # about 40 minutes on two busy shared cores
    python bench/compression_gemma.py --stage time
    python bench/compression_gemma.py --stage accuracy --seeds 2 --steps 30
    python bench/compression_gemma.py --stage loram --seeds 3 --steps 30 --align-steps 15
    python bench/compression_gemma.py --assemble
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, interleaved, machine, ratio_ci, read_json, summary, write_json  # noqa: E402

import compression as c  # noqa: E402
from lorakit import zoo  # noqa: E402
from lorakit.data import load_task  # noqa: E402
from lorakit.train import evaluate, fit  # noqa: E402

NAME, LABELS = "gemma-270m", 3
STAGES = ("memory", "time", "accuracy", "loram")
MEMORY_KINDS = ("lora", "qlora-nf4-bf16", "lora+gc", "qlora-nf4-bf16+gc", "qlora-nf4", "qlora-int8", "loram-0.5",
                "qloram-0.5")
TIME_KINDS = ("lora", "qlora-nf4", "qlora-int8", "qlora-nf4-bf16")
ACCURACY_KINDS = ("lora", "qlora-nf4-bf16", "qlora-nf4")
ACCURACY = dict(task="tweets", max_train=1000, max_eval=200, max_length=48, batch_size=8, lr=5e-4)


def stage_memory(quick: bool) -> dict:
    """Both memory measures per kind, and LoRAPrune's scoring step; continues a killed run from its saved rows."""
    saved = (read_json(_part("memory")) or {}).get("memory")
    return c.memory(LABELS, quick, NAME, MEMORY_KINDS, out=saved, save=lambda out: _save("memory", {"memory": out}),
                    workers=2)


def stage_time(n: int) -> dict:
    """Seconds per training step (forward, backward, AdamW) of each kind, interleaved in this process."""
    fns = {}
    for kind in TIME_KINDS:
        torch.manual_seed(0)
        model = c.training_model(kind, LABELS, NAME)
        batch = c._random_batch(model, LABELS)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

        def step(model=model, batch=batch, opt=opt):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        fns[kind] = step
        print(f"  built {kind}", flush=True)
    times = interleaved(fns, warmup=1, n=n)
    return {"step_ms": {k: summary(v) for k, v in times.items()},
            "step_ratio_ci": {k: ratio_ci(times[k], times["lora"]) for k in times if k != "lora"}}


def stage_accuracy(seeds: list[int], steps: int) -> dict:
    """Test accuracy on tweets after ``steps`` LoRA steps over each base kind, per seed."""
    a = ACCURACY
    task = load_task(a["task"], kind="classification").subsampled(a["max_train"], a["max_eval"], seed=0)
    _, tok = zoo.load(NAME, task="seq_cls", num_labels=task.num_labels)
    splits = task.encode(tok, a["max_length"])
    rows: dict[str, list] = {}
    for seed in seeds:
        for kind in ACCURACY_KINDS:
            model = c._lora(c._prepare(c._base(seed, task.num_labels, NAME), kind))
            t0 = time.time()
            fit(model, splits["train"], None, lr=a["lr"], batch_size=a["batch_size"], max_steps=steps, seed=seed,
                progress=False, warmup_ratio=0.05)
            acc = evaluate(model, splits["test"], batch_size=32)["accuracy"]
            rows.setdefault(kind, []).append({"accuracy": acc, "seed": seed, "train_s": round(time.time() - t0)})
            print(f"  seed {seed} {kind}: {acc:.3f}", flush=True)
            _save("accuracy", {"accuracy": {"rows": rows, "setup": {**a, "steps": steps, "seeds": seeds}}})
    return {"accuracy": {"rows": rows, "setup": {**a, "steps": steps, "seeds": seeds}}}


def stage_loram(seeds: list[int], steps: int, align_steps: int, kinds=c.LORAM_ROWS) -> dict:
    """LoRAM's recovered adapter on the full base against LoRA trained there and the head alone, with and without
    ``align_steps`` of alignment to the full base; the same data and training as the accuracy stage."""
    a = ACCURACY
    task = load_task(a["task"], kind="classification").subsampled(a["max_train"], a["max_eval"], seed=0)
    _, tok = zoo.load(NAME, task="seq_cls", num_labels=task.num_labels)
    splits = task.encode(tok, a["max_length"])
    setup = {**a, "steps": steps, "align_steps": align_steps, "seeds": seeds, "ratio": 0.5, "align": c.ALIGN}
    name = f"loram-s{'-'.join(map(str, seeds))}-{'-'.join(kinds)}"  # one part file per process
    saved = (read_json(_part(name)) or {}).get("loram_accuracy", {})
    rows = saved.get("rows", {}) if saved.get("setup") == setup else {}

    def fit_gemma(model, splits, steps, seed):
        fit(model, splits["train"], None, lr=a["lr"], batch_size=a["batch_size"], max_steps=steps, seed=seed,
            progress=False, warmup_ratio=0.05)

    rows = c.loram_accuracy(seeds, steps, align_steps, task.num_labels, splits, c.general_text(tok, a["max_length"]),
                            NAME, fit_gemma, a["batch_size"], rows,
                            save=lambda r: _save(name, {"loram_accuracy": {"rows": r, "setup": setup}}), kinds=kinds)
    return {"loram_accuracy": c.merged_loram(sorted(c.OUT.glob(".compression-gemma-loram*.json")))}


def _part(stage: str) -> Path:
    return c.OUT / f".compression-gemma-{stage}.json"


def _save(stage: str, part: dict) -> None:
    write_json(_part(stage), part)


def assemble() -> None:
    """Put the stages into compression.json under ``gemma_270m`` and rewrite the page."""
    from compression_report import write_page

    result = read_json(c.OUT / "compression.json")
    parts = {k: v for stage in STAGES for k, v in (read_json(_part(stage)) or {}).items()}
    if "loram_accuracy" in parts or list(c.OUT.glob(".compression-gemma-loram-s*.json")):
        parts["loram_accuracy"] = c.merged_loram(sorted(c.OUT.glob(".compression-gemma-loram*.json")))
    parts["setup"] = {"model": NAME, "batch_size": c.SETUP["batch_size"], "max_length": c.SETUP["max_length"],
                      "labels": LABELS, "r": c.SETUP["r"], "targets": c.SETUP["targets"]}
    result["gemma_270m"] = parts
    write_json(c.OUT / "compression.json", result)
    write_page(result, c.OUT)
    print(f"wrote {c.OUT / 'compression.md'}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=STAGES)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--only-seeds", default="", help="--stage loram in several processes: the seeds of this one")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--align-steps", type=int, default=15)
    ap.add_argument("--loram-kinds", default=",".join(c.LORAM_ROWS), help="--stage loram: the rows to run")
    ap.add_argument("--assemble", action="store_true")
    args = ap.parse_args(argv)
    if args.assemble:
        return assemble()
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    start = time.time()
    if args.stage == "memory":
        part = {"memory": stage_memory(args.quick)}
    elif args.stage == "time":
        part = stage_time(2 if args.quick else 3)
    elif args.stage == "loram":
        seeds = [int(x) for x in args.only_seeds.split(",")] if args.only_seeds else list(range(args.seeds))
        part = stage_loram(seeds, args.steps, args.align_steps, args.loram_kinds.split(","))
    else:
        part = stage_accuracy(list(range(args.seeds)), args.steps)
    part[f"{args.stage}_run"] = {"command": command_line(), "machine": machine(), "wall_time_s": round(time.time() - start)}
    _save(args.stage, part)
    print(f"{args.stage}: {round(time.time() - start)} s; saved in {_part(args.stage)}")


if __name__ == "__main__":
    main()
