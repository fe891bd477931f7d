"""Every registered method, and full fine-tuning as the reference, on two tasks at an equal step budget.

For each row (see bench/methods_rows.py) and task (bench/methods_tasks.py): test accuracy over seeds, trainable
parameters, the training step time and peak memory relative to LoRA measured in the same run, and PEFT's step
time where PEFT has the method; then the papers' checkable claims (bench/methods_claims.py). Writes
methods.md, methods.png and methods.json (docs/benchmarks/ by default; ``--quick``: runs/bench-methods/quick/).

    HF_HUB_OFFLINE=1 python bench/methods.py [--quick] [--seeds 0,1,2,3,4] [--steps N] [--rows lora,dora,...]

Every training run, timing and memory probe is cached as JSON under runs/bench-methods/<budget>/ (the folder
name hashes the budget; each file holds the row's settings and is recomputed when they change), so an
interrupted run resumes and a rerun computes only what is missing. ``--report-only`` writes the page from the
cache alone. ``--seed-cache docs/benchmarks/methods.json`` first copies the runs, timings and memory probes a
written page holds into an empty cache, where their budget and row settings are the ones this run uses (a lost
cache is rebuilt without recomputing them).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import methods_claims as claims  # noqa: E402
import methods_report as report  # noqa: E402
import methods_rows as rows  # noqa: E402
from common import (command_line, interleaved, load_average, machine, peak_rss_rise, read_json, summary,  # noqa: E402
                    write_json)
from methods_tasks import TASKS  # noqa: E402

from lorakit.train import evaluate, fit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUICK_ROWS = "lora,head,dora,shira,shira_gradient,nola,full"
SEEDS = [0, 1, 2, 3, 4]
TRAINING = ("steps", "batch_size", "max_train", "max_eval", "max_length", "log_every")


@dataclass(frozen=True)
class Budget:
    """What every row of a task gets: the same steps, batch, data and evaluation set."""

    steps: int = 375
    batch_size: int = 16
    max_train: int = 6000
    max_eval: int = 1000
    max_length: int = 64
    log_every: int = 5
    timing_steps: int = 8
    timing_warmup: int = 2
    memory_steps: int = 2

    def key(self) -> str:
        """A folder name for the cache of this budget's training runs."""
        text = json.dumps({k: getattr(self, k) for k in TRAINING}, sort_keys=True)
        return f"s{self.steps}-b{self.batch_size}-" + hashlib.sha1(text.encode()).hexdigest()[:8]

    def settings(self, what: str) -> dict:
        """The timing or memory settings a cached ``what`` was measured with ({} for training runs)."""
        prefix = {"timing": "timing_", "memory": "memory_"}.get(what)
        return {k: v for k, v in dataclasses.asdict(self).items() if prefix and k.startswith(prefix)}


class Cache:
    """JSON results by (task, row, what), valid while the row's settings and the budget are unchanged."""

    def __init__(self, root: Path, budget: Budget):
        self.root, self.budget = root, budget

    def path(self, task: str, row: str, what: str) -> Path:
        return self.root / task / row / f"{what}.json"

    def spec(self, row: rows.Row, what: str) -> dict:
        return {**row.spec(), **self.budget.settings(what)}

    def get(self, task: str, row: rows.Row, what: str):
        data = read_json(self.path(task, row.name, what))
        return data if data and data.get("spec") == self.spec(row, what) else None

    def put(self, task: str, row: rows.Row, what: str, data: dict) -> dict:
        data = {"spec": self.spec(row, what), **data}
        write_json(self.path(task, row.name, what), data)
        return data


def seed_cache(page_json: Path, cache_root: Path, budget: Budget, selected: list[rows.Row], tasks: dict) -> int:
    """Copy the results of a written methods.json into the cache where its budget and each row's settings match
    this run's (nothing is overwritten); returns how many entries were written."""
    data = read_json(page_json)
    if data is None:
        raise SystemExit(f"--seed-cache: cannot read {page_json}")
    theirs = {k: data["info"]["budget"].get(k) for k in TRAINING}
    if theirs != {k: getattr(budget, k) for k in TRAINING}:
        print(f"--seed-cache: {page_json} was run at another budget ({theirs}); nothing copied", flush=True)
        return 0
    written = 0
    for name, task in tasks.items():
        cache = Cache(cache_root / task_budget(budget, task).key(), task_budget(budget, task))
        for row in selected:
            entry = data["results"].get(name, {}).get("rows", {}).get(row.name, {})
            row = scaled(row, task)
            items = [(f"seed{r['seed']}", r) for r in entry.get("runs", [])]
            items += [(what, entry[what]) for what in ("timing", "memory") if what in entry]
            for what, result in items:
                if cache.get(name, row, what) is None and result.get("spec") == cache.spec(row, what):
                    write_json(cache.path(name, row.name, what), result)
                    written += 1
    switch, path = (data.get("extra") or {}).get("shira_switch"), cache_root / budget.key() / "claims" / "shira_switch.json"
    if switch and switch.get("spec") == claims.SWITCH and read_json(path) is None:
        write_json(path, switch)  # the claim measurement that needs no training
        written += 1
    print(f"--seed-cache: {written} results copied from {page_json}", flush=True)
    return written


def task_budget(budget: Budget, task) -> Budget:
    """The budget as ``task`` runs it (its own number of steps, if it sets one)."""
    return dataclasses.replace(budget, steps=task.steps) if task.steps else budget


def scaled(row: rows.Row, task) -> rows.Row:
    """``row`` with its learning rate times the task's ``lr_scale`` (1 for tweets)."""
    return row if task.lr_scale == 1.0 else dataclasses.replace(row, lr=row.lr * task.lr_scale)


# -- one training run ----------------------------------------------------------------------------------
def train_run(task, row: rows.Row, seed: int, budget: Budget) -> dict:
    """Fine-tune ``row`` on ``task`` for the budget's steps with ``seed``; test accuracy and loss history."""
    model = task.model(seed)
    start = time.perf_counter()
    callbacks = rows.prepare(row, model, task, budget.steps, budget.batch_size, seed)
    counts = rows.parameter_counts(model)
    result = fit(model, task.train, None, lr=row.lr, batch_size=budget.batch_size, max_steps=budget.steps,
                 seed=seed, progress=False, log_every=budget.log_every, callbacks=callbacks, collate_fn=task.collate,
                 warmup_ratio=rows.WARMUP_RATIO)
    train_s = time.perf_counter() - start

    def test(m):
        return evaluate(m, task.test, batch_size=64, collate_fn=task.collate)

    return {"seed": seed, "test": test(model), "rank_sweep": rows.rank_sweep(row, model, test), **counts,
            "history": [[h["step"], h["loss"]] for h in result.history if "loss" in h],
            "train_s": round(train_s, 1), "load": load_average()}


# -- step time and memory, relative to LoRA --------------------------------------------------------------
def step_fn(model, batch, callbacks=()):
    """One training step as a closure: forward, backward, AdamW step, zero_grad, the row's step hooks."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for cb in callbacks:
            cb(0, {})

    return step


def timing(task, row: rows.Row, budget: Budget) -> dict:
    """Median step time of ``row``, of LoRA and of PEFT's twin of ``row``, stepped in turn on one batch."""
    batch = task.batches(1, budget.batch_size)[0]
    lora = rows.find("lora")
    fns, models, loss = {}, {}, {}
    for key, r in (("row", row), ("lora", lora)):
        if key == "lora" and row.name == "lora":
            continue
        models[key] = task.model(0)
        fns[key] = step_fn(models[key], batch, rows.prepare(r, models[key], task, budget.steps, budget.batch_size, 0))
    twin, peft_note = rows.peft_twin(row, models["row"])
    if twin is not None:
        with torch.no_grad():  # same adapter, same base: the losses should agree before any step (no dropout)
            loss = {"lorakit": models["row"].eval()(**batch).loss.item(), "peft": twin.eval()(**batch).loss.item()}
        models["row"].train()
        fns["peft"] = step_fn(twin, batch)
    times = interleaved(fns, budget.timing_warmup, budget.timing_steps)
    stats = {k: summary(v) for k, v in times.items()}
    stats.setdefault("lora", stats["row"])
    return {"ms": {k: v["median"] for k, v in stats.items()}, "stats": stats, "peft": peft_note,
            "loss_before": loss, "load": load_average()}


def _memory_setup(task_name: str, row_name: str, budget: dict, cache: str):
    task = TASKS[task_name](budget["max_train"], budget["max_eval"], budget["max_length"], Path(cache))
    return task, rows.find(row_name), task.model(0), budget


def _memory_run(state) -> None:
    task, row, model, budget = state
    callbacks = rows.prepare(row, model, task, budget["steps"], budget["batch_size"], 0)
    step = step_fn(model, task.batches(1, budget["batch_size"])[0], callbacks)
    for _ in range(budget["memory_steps"]):
        step()


def memory(task_name: str, row: rows.Row, budget: Budget, cache: Path) -> dict:
    """Peak RSS rise while adding ``row``'s adapter (calibration included) and training a few steps."""
    rise = peak_rss_rise(_memory_setup, _memory_run, task_name, row.name, dataclasses.asdict(budget), str(cache))
    return {"bytes": rise, "load": load_average()}


# -- the whole benchmark ---------------------------------------------------------------------------------
def plan(selected: str | None, with_claims: bool) -> tuple[list[rows.Row], dict[str, str]]:
    """(rows to run, {row name: why it is skipped}) from the registries on this checkout."""
    every = rows.rows() + (rows.claim_rows() if with_claims else [])
    if selected:
        wanted = selected.split(",")
        unknown = [w for w in wanted if w not in {r.name for r in every}]
        if unknown:
            raise SystemExit(f"unknown rows {unknown}; rows on this checkout: {', '.join(r.name for r in every)}")
        every = [r for r in every if r.name in wanted]
    skipped = {r.name: rows.unavailable(r) for r in every if rows.unavailable(r)}
    return [r for r in every if r.name not in skipped], skipped


def reduced(budget: Budget, seeds: list[int], args) -> list[str]:
    """How this run's configuration falls short of the full one (empty for the full run)."""
    full = Budget()
    out = [f"{f.name} {getattr(budget, f.name)} (full: {getattr(full, f.name)})" for f in dataclasses.fields(Budget)
           if getattr(budget, f.name) != getattr(full, f.name)]
    if seeds != SEEDS:
        out.append(f"seeds {seeds} (full: {SEEDS})")
    if args.rows or args.quick:
        out.append(f"only the rows {args.rows or QUICK_ROWS}")
    if args.tasks != ",".join(TASKS):
        out.append(f"only the tasks {args.tasks}")
    for flag in ("no_claims", "no_memory", "no_timing"):
        if getattr(args, flag):
            out.append("--" + flag.replace("_", "-"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"smoke run: 1 seed, 4 steps, 64 examples, rows {QUICK_ROWS}")
    ap.add_argument("--seeds", help=f"comma-separated seeds (default {','.join(map(str, SEEDS))}; quick 0)")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks")
    ap.add_argument("--rows", help="comma-separated row names (default: every row)")
    ap.add_argument("--no-claims", action="store_true", help="skip the extra rows and measurements of the claims")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    ap.add_argument("--no-timing", action="store_true", help="skip the step-time probes")
    for f in dataclasses.fields(Budget):
        ap.add_argument("--" + f.name.replace("_", "-"), type=int, help=f"default {f.default}")
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / "bench-methods")
    ap.add_argument("--out", type=Path, help="folder for methods.md/.png/.json")
    ap.add_argument("--report-only", action="store_true", help="write the page from cached results only")
    ap.add_argument("--seed-cache", type=Path, help="a methods.json whose matching results fill the empty cache")
    args = ap.parse_args(argv)

    quick = dict(steps=4, batch_size=8, max_train=64, max_eval=48, log_every=1, timing_steps=2, timing_warmup=1,
                 memory_steps=1) if args.quick else {}
    budget = Budget(**{**quick, **{f.name: getattr(args, f.name) for f in dataclasses.fields(Budget)
                                   if getattr(args, f.name) is not None}})
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else ",".join(map(str, SEEDS)))).split(",")]
    out = args.out or (args.cache / "quick" if args.quick else ROOT / "docs" / "benchmarks")
    selected, skipped = plan(args.rows or (QUICK_ROWS if args.quick else None), not args.no_claims)
    cache = Cache(args.cache / budget.key(), budget)
    info = {"machine": machine(), "command": command_line(argv), "budget": dataclasses.asdict(budget),
            "seeds": seeds, "load_start": load_average(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    info["reduced"] = reduced(budget, seeds, args)
    print(f"# {info['machine']}\n# rows: {', '.join(r.name for r in selected)}; skipped: {skipped or 'none'}", flush=True)

    tasks = {name: TASKS[name](budget.max_train, budget.max_eval, budget.max_length, args.cache)
             for name in args.tasks.split(",")}
    if args.seed_cache:
        seed_cache(args.seed_cache, args.cache, budget, selected, tasks)
    results = run_all(tasks, selected, seeds, budget, cache, args)
    info["missing"] = [f"{t}/{r}: {len(e['runs'])} of {len(seeds)} seeds" for t, task in results.items()
                       for r, e in task["rows"].items() if len(e["runs"]) < len(seeds)]
    if info["missing"]:  # the same command without --report-only computes what is missing and keeps the rest
        info["finish"] = command_line([a for a in (sys.argv[1:] if argv is None else argv) if a != "--report-only"])
    extra = {} if args.no_claims else claims.measure(cache.root, args.report_only)
    info.update(load_end=load_average(), finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    page = report.write(out, info, results, skipped, claims.table(results, skipped, extra), extra)
    print(f"wrote {page}", flush=True)
    return 0


def phases(seeds: list[int], with_memory: bool, with_timing: bool = True) -> list[str]:
    """The order of the work: every row once, then the timings, the other seeds and the memory probes, so an
    interrupted run has whole tables for fewer seeds rather than a few rows with everything."""
    return [f"seed{seeds[0]}", *(["timing"] if with_timing else []), *[f"seed{s}" for s in seeds[1:]],
            *(["memory"] if with_memory else [])]


def job(task, row: rows.Row, what: str, budget: Budget, cache_dir: Path):
    """The computation behind one cache entry."""
    if what == "timing":
        return lambda: timing(task, row, budget)
    if what == "memory":
        return lambda: memory(task.name, row, budget, cache_dir)
    return lambda: train_run(task, row, int(what[4:]), budget)


def run_all(tasks: dict, selected: list[rows.Row], seeds: list[int], budget: Budget, cache: Cache, args) -> dict:
    """Cached or fresh runs, timings and memory probes of every selected row on every task."""
    results = {name: {"title": t.title, "description": t.description, "notes": t.notes,
                      "lora_r1": rows.rank_one_counts(t), "steps": task_budget(budget, t).steps,
                      "rows": {r.name: {"row": dataclasses.asdict(scaled(r, t)), "runs": []} for r in selected}}
               for name, t in tasks.items()}
    for what in phases(seeds, not args.no_memory, not args.no_timing):
        for name, task in tasks.items():
            tb = task_budget(budget, task)
            tcache = cache if tb == budget else Cache(cache.root.parent / tb.key(), tb)
            for row in map(lambda r: scaled(r, task), selected):
                if row.kind == "claim" and not what.startswith("seed"):
                    continue
                data = tcache.get(name, row, what)
                if data is None and not args.report_only:
                    t0 = time.perf_counter()
                    print(f"{name}/{row.name}/{what} ...", end=" ", flush=True)
                    data = tcache.put(name, row, what, job(task, row, what, tb, args.cache)())
                    print(f"{time.perf_counter() - t0:.0f} s" + (f", test accuracy {data['test']['accuracy']:.3f}"
                                                                  if "test" in data else ""), flush=True)
                    gc.collect()
                entry = results[name]["rows"][row.name]
                if data is not None and what.startswith("seed"):
                    entry["runs"].append(data)
                elif data is not None:
                    entry[what] = data
    return results


if __name__ == "__main__":
    sys.exit(main())
