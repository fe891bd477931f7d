"""Training strategies against LoRA at equal steps: registered optimisers (LoRA-Pro, ALLoRA, LoRA+, LoRA-FA),
schedules (LISA, IncreLoRA, DiffoRA), full fine-tuning and the classifier head alone, on all-MiniLM-L6-v2 / tweets (3-way sentiment).

Every system trains the same number of steps on the same examples (data subset drawn with seed 0; seeds change
the head, the adapter's random parts and the data order) and is scored on the same test examples; the page gives
the mean test accuracy with a 95% t-interval over the seeds. Step time (median of interleaved steps on one fixed
batch, each system in turn) and peak memory (the rise of peak RSS over the loaded model during 3 steps, in a
forked process per system) are ratios to LoRA's in the same run. Claim rows and the speed targets state their
thresholds; the report says "not met" where they do not reproduce. The first claim rows check the budget itself
(LoRA above the majority class and above the head alone, small spread over seeds). The full budget (100 steps of
16 on 2,000 examples of 32 tokens, 450 test examples, 3 seeds) takes about an hour at one thread.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python bench/training_strategies.py [--quick] [--seeds N] [--steps N]

writes docs/benchmarks/training-strategies.md, .json and .png (``--quick``: runs/bench-quick/ unless ``--out``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, interleaved, machine, peak_rss_rise, read_json, summary, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QKV = ["query", "key", "value"]
QKVO = r".*attention\.(self\.(query|key|value)|output\.dense)"  # 24 square 384x384 modules


def systems(steps: int) -> dict[str, dict]:
    """Each system's adapter, optimiser, schedule and learning rate (LoRA family 1e-3 but LoRA+'s base 2.5e-4 with
    B at 4e-3; full weights 2e-4), fixed in advance, not tuned per system."""
    lora = dict(targets=QKV, r=8, alpha=16, lr=1e-3)
    return {
        "lora": lora,
        "head": dict(head=True, lr=1e-3),  # the new classifier alone, everything else frozen
        "lora_dropout": {**lora, "dropout": 0.1},
        "full": dict(full=True, lr=2e-4),
        "lora_pro": {**lora, "optimizer": "lora_pro"},  # the paper compares at LoRA's hyperparameters
        "allora": {**lora, "alpha": 8, "optimizer": "allora"},
        "lora_plus": {**lora, "lr": 2.5e-4, "optimizer": "lora_plus"},
        "lora_fa": {**lora, "optimizer": "lora_fa"},
        "lisa": dict(full=True, lr=2e-4, schedule=("lisa", dict(gamma=2, interval=max(1, steps // 4)))),
        "lisa_frozen_embeddings": dict(full=True, lr=2e-4, schedule=("lisa", dict(
            gamma=2, interval=max(1, steps // 4), embeddings=False))),
        "increlora": {**lora, "r": 4, "alpha": 8, "schedule": ("increlora", dict(
            budget=8 * 18, add_r=4, top_h=3, init_warmup=max(1, steps // 6), interval=max(1, steps // 10)))},
        "lora_qkvo_r4": {**lora, "targets": QKVO, "r": 4, "alpha": 8},
        "diffora": {**lora, "targets": QKVO, "schedule": ("diffora", dict(keep=12, search_steps=max(2, steps // 3)))},
    }


class Task:
    """MiniLM on the bundled tweets, encoded once."""

    def __init__(self, max_train: int, max_eval: int, max_length: int):
        from transformers.utils import logging

        from lorakit import zoo
        from lorakit.data import load_task

        logging.set_verbosity_error()
        self.args = (max_train, max_eval, max_length)
        task = load_task("tweets").subsampled(max_train, max_eval, seed=0)
        _, tok = zoo.load("minilm", task="seq_cls", num_labels=task.num_labels)
        self.splits, self.num_labels = task.encode(tok, max_length), task.num_labels

    def model(self, seed: int):
        from lorakit import zoo

        return zoo.load("minilm", task="seq_cls", num_labels=self.num_labels, seed=seed)[0]


def build(task: Task, spec: dict, seed: int, steps: int):
    """(model, schedule) for one system: LoRA applied unless it trains full weights."""
    import lorakit
    from lorakit.train.schedules import create

    model = task.model(seed)
    torch.manual_seed(seed)
    if spec.get("head"):
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("classifier."))
    elif not spec.get("full"):
        lorakit.apply(model, lorakit.LoRAConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=spec.get("dropout", 0.0),
                                                target_modules=spec["targets"], task_type="SEQ_CLS"))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    schedule = None
    if "schedule" in spec:
        name, options = spec["schedule"]
        if name == "diffora":
            options = {**options, "search_data": task.splits["validation"]}
        schedule = create(name, seed=seed, **options)
    return model, schedule


def train_one(task: Task, name: str, spec: dict, seed: int, steps: int, batch_size: int) -> dict:
    """Train one system for ``steps`` and score it on the test split."""
    from lorakit.train import evaluate, fit

    model, schedule = build(task, spec, seed, steps)
    t0 = time.perf_counter()
    result = fit(model, task.splits["train"], None, lr=spec["lr"], batch_size=batch_size, max_steps=steps,
                 optimizer=spec.get("optimizer", "adamw"), adapter_schedule=schedule, seed=seed, progress=False,
                 log_every=max(1, steps // 10))
    test = evaluate(model, task.splits["test"], batch_size=64)
    return dict(seed=seed, accuracy=test["accuracy"], loss=test["loss"], wall_s=time.perf_counter() - t0,
                trainable=result.trainable_params, history=result.history)


# -- speed and memory ------------------------------------------------------------------------------------
_TASK: Task | None = None


def _stepper(name: str, spec: dict, steps: int, batch: dict, checkpointing: bool = False):
    """A closure doing one training step of ``name`` as fit does (schedule hooks, optimiser step)."""
    from lorakit.optim import create as create_optimizer
    from lorakit.train.precision import enable_gradient_checkpointing

    model, schedule = build(_TASK, spec, 0, steps)
    if schedule is not None:
        schedule.prepare(model)
    opt = create_optimizer(spec.get("optimizer", "adamw"), model, lr=spec["lr"])
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    count = [0]

    def step():
        i = count[0]
        if schedule is not None:
            schedule.step_begin(i, model, opt)
        model(**batch).loss.backward()
        if schedule is not None:
            schedule.before_optimizer_step(i, model, opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if schedule is not None:
            schedule.step_end(i, model, opt)
        count[0] += 1

    return step, opt


def _floor(batch: dict):
    """Forward + backward to the input embeddings with nothing trainable: the least a training step costs."""
    model = _TASK.model(0)
    for p in model.parameters():
        p.requires_grad_(False)
    model.train()
    emb = model.get_input_embeddings()

    def step():
        x = emb(batch["input_ids"]).detach().requires_grad_(True)
        inputs = {k: v for k, v in batch.items() if k != "input_ids"}
        model(inputs_embeds=x, **inputs).loss.backward()

    return step, None


def _timed_batch(batch_size: int) -> dict:
    data = _TASK.splits["train"]
    return data.collate([data[i] for i in range(batch_size)])


def _mem_setup(task_args: tuple, name: str, spec: dict, steps: int, batch_size: int, checkpointing: bool):
    global _TASK
    if _TASK is None:  # a fresh child process
        _TASK = Task(*task_args)
    batch = _timed_batch(batch_size)
    step = _floor(batch)[0] if name == "floor" else _stepper(name, spec, steps, batch, checkpointing)[0]
    return step


def _mem_run(step) -> None:
    for _ in range(3):
        step()


def speed(names: list[str], specs: dict, steps: int, batch_size: int, n: int) -> dict:
    """Median step times (interleaved) and peak RSS rises, LoRA-Pro's optimiser state, per system."""
    batch = _timed_batch(batch_size)
    makers = {name: (lambda name=name: _stepper(name, specs[name], steps, batch)) for name in names}
    makers["lora_ckpt"] = lambda: _stepper("lora", specs["lora"], steps, batch, checkpointing=True)
    makers["floor"] = lambda: _floor(batch)
    built = {k: make() for k, make in makers.items()}
    times = interleaved({k: b[0] for k, b in built.items()}, warmup=2, n=n)
    state_bytes = {k: sum(t.numel() * t.element_size() for st in b[1].state.values() for t in st.values()
                          if torch.is_tensor(t)) for k, b in built.items() if b[1] is not None}
    del built
    out = {}
    for key in times:
        name, ckpt = ("lora", True) if key == "lora_ckpt" else (key, False)
        mem = peak_rss_rise(_mem_setup, _mem_run, _TASK.args, name, specs.get(name, {}), steps, batch_size, ckpt)
        out[key] = dict(time=summary(times[key]), times=times[key], peak_rss=mem, state_bytes=state_bytes.get(key))
    return out


def main(argv=None) -> int:
    global _TASK
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small budget: 3 seeds, 24 steps, 320 train / 150 test")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--only", default=None, help="train only these systems (comma-separated), or only time "
                   "('timing', or 'timing:a,b' for some), into a partial file of their own, then stop: parallel "
                   "workers; a later run without --only takes their results")
    p.add_argument("--seed", type=int, default=None, help="with --only: train this one seed of them (a worker)")
    p.add_argument("--report", action="store_true", help="write the page from the partial files alone (systems "
                   "without results are listed as not run)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    steps = args.steps or (24 if args.quick else 100)
    max_train, max_eval, max_length, batch_size = (320, 150, 32, 16) if args.quick else (2000, 450, 32, 16)
    out = Path(args.out) if args.out else (ROOT / "runs/bench-quick" if args.quick else ROOT / "docs/benchmarks")
    _TASK = Task(max_train, max_eval, max_length)
    specs = systems(steps)
    start = time.perf_counter()
    # finished systems are kept in partial files (one per --only worker), so a killed run continues where it stopped
    key = [steps, args.seeds, max_train, max_eval, max_length]
    tag = (f".{args.only}" if args.only else "") + (f".s{args.seed}" if args.seed is not None else "")
    partial_path = out / f".training-strategies.partial{tag}.json"
    partials = sorted(out.glob(".training-strategies.partial*.json"))
    found = [d for d in map(read_json, partials) if d and d.get("key") == key]
    by_seed = {}  # workers may each hold some seeds of a system (--seed)
    for d in found:
        for k, v in d.get("runs", {}).items():
            by_seed.setdefault(k, {}).update({r["seed"]: r for r in v})
    runs = {k: [by_seed[k][i] for i in range(args.seeds)] for k in specs  # in the order of `systems`
            if k in by_seed and all(i in by_seed[k] for i in range(args.seeds))}
    timing = next((d["timing"] for d in found if "timing" in d), None)
    if args.only and args.only.startswith("timing"):  # "timing" or "timing:lora,lisa,...": those systems alone
        names = args.only.partition(":")[2].split(",") if ":" in args.only else list(specs)
        write_json(partial_path, {"key": key, "timing": speed(names, specs, steps, 32, n=5 if args.quick else 9)})
        return 0
    only = set(args.only.split(",")) if args.only else set(specs)
    unknown = only - set(specs)
    if unknown:
        raise SystemExit(f"--only: unknown systems {sorted(unknown)}; known: {', '.join(specs)}")
    for name, spec in specs.items():
        if name not in only:
            continue
        if name not in runs and args.report:
            continue
        if args.seed is not None:  # one seed of the systems in --only, kept for a later run to merge
            runs[name] = [by_seed.get(name, {}).get(args.seed) or train_one(_TASK, name, spec, args.seed, steps, batch_size)]
            write_json(partial_path, {"key": key, "runs": {k: v for k, v in runs.items() if k in only}})
            continue
        if name not in runs:
            runs[name] = [train_one(_TASK, name, spec, seed, steps, batch_size) for seed in range(args.seeds)]
            write_json(partial_path, {"key": key, "runs": {k: v for k, v in runs.items() if k in only}})
        accs = [r["accuracy"] for r in runs[name]]
        print(f"{name:<13} acc {np.mean(accs):.4f} ({', '.join(f'{a:.3f}' for a in accs)})  "
              f"{np.mean([r['wall_s'] for r in runs[name]]):.1f}s/run", flush=True)
    if args.only or args.seed is not None:
        return 0
    timing = timing or speed(list(specs), specs, steps, 32, n=5 if args.quick else 9)
    from training_strategies_report import write

    settings = dict(steps=steps, seeds=args.seeds, max_train=max_train, max_eval=max_eval, max_length=max_length,
                    batch_size=batch_size, timing_batch=32, specs={k: {kk: str(vv) for kk, vv in v.items()}
                                                                   for k, v in specs.items()})
    labels = [int(ex["labels"]) for ex in _TASK.splits["test"]]
    majority = max(labels.count(c) for c in set(labels)) / len(labels)
    result = dict(settings=settings, machine=machine(), command=command_line(argv), runs=runs, timing=timing,
                  wall_s=time.perf_counter() - start, majority_share=majority)
    write_json(out / "training-strategies.json", result)
    print(write(out, result))
    if len(runs) == len(specs):  # complete: the partial results are in the JSON now
        for path in partials + [partial_path]:
            path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
