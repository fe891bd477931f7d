"""Federated LoRA benchmark: runs, then docs/benchmarks/federated.json (bench/federated_report.py writes the page).

1. Aggregation error of every strategy against the exact weighted sum sum_k p_k s B_k A_k, on synthetic client
   factors of MiniLM's attention size (384 x 384), as client drift, client count and rank grow.
2. Test accuracy over seeds: MiniLM on the tweets task, clients under a Dirichlet label skew, every strategy,
   with centralised LoRA on the pooled data (the ceiling) and the head trained alone on the pooled data (the
   floor), both with the same number of optimiser steps as one federated run.
3. Heterogeneous client ranks: FLoRA against zero-padding.
4. Bytes per round, measured on the Flower records each run sent, against the formulas.

Parts 2-4 run the real ServerApp strategy and ClientApp through ``InProcessGrid`` (the same code Flower's
engines run; tests/federated/test_fed_flower.py shows the simulation engine gives identical numbers).
Each run's history is cached under --out, so an interrupted benchmark resumes; --jobs runs that many at once.

    python bench/federated.py [--jobs 2] [--seeds 0,1,2,3,4] [--runs fedit-a0.1,...] [--quick] [--report-only]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lorakit import AdapterState, LoRAConfig  # noqa: E402
from lorakit.federated import STRATEGIES, aggregate, exact_update, normalised, relative_error, update_of  # noqa: E402
from lorakit.federated.experiment import Settings  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from common import command_line, load_average, machine, write_json  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks"
STRATEGY_ORDER = ["fedit", "ffa_lora", "flora", "lora_fair", "fedavg_dense", "zero_pad"]
# The accuracy budget (fixed before the seeds ran): the bundled experiment's task on the 3-layer MiniLM (half the
# 6-layer model's cost per step), 5 clients, 1,000 test examples; see federated_report.py for why.
TWEETS = dict(task="tweets", model="paraphrase-minilm-l3", num_rounds=10, num_clients=5, local_steps=6,
              batch_size=8, lr=3e-3, max_train=2000, max_eval=1000, eval_every=5)
SEEDS = (0, 1, 2, 3, 4)
# In the order they run (every seed of one kind, then the next kind): the floor, the ceiling, then the strategies.
RUNS = ("head", "centralised", "fedit-a0.1", "flora-a0.1", "ffa_lora-a0.1", "lora_fair-a0.1", "flora-hetero",
        "zero_pad-hetero")
QUICK_RUNS = tuple(f"{n}-a{a}" for a in (0.1, 1.0) for n in STRATEGY_ORDER) + (
    "flora-hetero", "zero_pad-hetero", "ffa_lora-hetero", "centralised", "head")
HETERO_RANKS = "4,8,16"
QUICK = dict(task="toy", num_rounds=6, num_clients=10, local_steps=3, batch_size=16, lr=1e-2, rank=4,
             lora_alpha=8.0, max_train=600, max_eval=200, eval_every=2, min_replies=2)


# ----------------------------------------------------------------------------------------------- part 1


def synthetic(k: int, r: int, drift: float, seed: int, shared_a: bool, dim: int = 384):
    """K client states drifted by ``drift`` (relative to each factor's scale) from one common (A0, B0)."""
    g = torch.Generator().manual_seed(seed)
    a0 = torch.randn(r, dim, generator=g, dtype=torch.float64) / dim**0.5
    b0 = torch.randn(dim, r, generator=g, dtype=torch.float64) * 0.02
    config = LoRAConfig(r=r, lora_alpha=2.0 * r, target_modules=["m"])
    states = []
    for _ in range(k):
        a = a0 if shared_a else a0 + drift * torch.randn(r, dim, generator=g, dtype=torch.float64) / dim**0.5
        b = b0 + drift * torch.randn(dim, r, generator=g, dtype=torch.float64) * 0.02
        states.append(AdapterState(config, {"m": {"lora_A.weight": a.float(), "lora_B.weight": b.float()}}))
    counts = (torch.rand(k, generator=g) * 100 + 10).round().tolist()
    return states, counts


def algebra_point(k: int, r: int, drift: float, seeds=(0, 1, 2)) -> dict:
    """Mean relative aggregation error per strategy (and LoRA-FAIR's floor) at one (K, r, drift)."""
    out: dict[str, float] = {}
    for seed in seeds:
        for name in STRATEGY_ORDER:
            states, counts = synthetic(k, r, drift, seed, shared_a=name == "ffa_lora")
            p = normalised(counts, k)
            err = relative_error(update_of(aggregate(name, states, counts), "m"), exact_update(states, p, "m"))
            out[name] = out.get(name, 0.0) + err / len(seeds)
        states, counts = synthetic(k, r, drift, seed, shared_a=False)
        target = exact_update(states, normalised(counts, k), "m")
        a_bar = aggregate("fedit", states, counts).low_rank("m")[0].double()
        floor = target - target @ torch.linalg.pinv(a_bar) @ a_bar  # the part no correction of B can reach
        out["lora_fair floor"] = out.get("lora_fair floor", 0.0) + float(floor.norm() / target.norm()) / len(seeds)
    return out


def algebra(quick: bool) -> dict:
    seeds = (0,) if quick else (0, 1, 2)
    sweeps = {
        "drift": [(10, 8, d) for d in (0.01, 0.03, 0.1, 0.3, 1.0)],
        "clients": [(k, 8, 0.3) for k in (2, 5, 10, 20, 50)],
        "rank": [(10, r, 0.3) for r in (2, 4, 8, 16, 32)],
    }
    return {axis: [{"k": k, "r": r, "drift": d, **algebra_point(k, r, d, seeds)} for k, r, d in points]
            for axis, points in sweeps.items()}


# ----------------------------------------------------------------------------------------------- parts 2-4


def spec(kind: str, seed: int, quick: bool) -> dict:
    """Settings fields of one run kind (``<strategy>-a<alpha>``, ``<strategy>-hetero``, ``centralised``,
    ``head``) at one seed."""
    base = {**(QUICK if quick else TWEETS), "seed": seed}
    if kind in ("centralised", "head"):
        return {**base, "strategy": "fedit", "dirichlet_alpha": 1.0}
    strategy, _, tail = kind.rpartition("-")
    if tail == "hetero":
        return {**base, "strategy": strategy, "dirichlet_alpha": 1.0, "client_ranks": HETERO_RANKS}
    return {**base, "strategy": strategy, "dirichlet_alpha": float(tail[1:])}


def federated_run(name: str, fields: dict, out: str) -> str:
    """Run one configuration in process; returns the path of its cached history."""
    torch.set_num_threads(1)
    path = Path(out) / f"{name}.json"
    if path.is_file():
        return str(path)
    from lorakit.federated.local import run_in_process

    kind = name.rsplit("-s", 1)[0]
    settings = Settings(**fields)
    start, load = time.time(), load_average()
    rounds = (centralised(settings, head_only=kind == "head") if kind in ("centralised", "head")
              else run_in_process(settings).state.log)
    write_json(path, {"name": name, "kind": kind, "seed": settings.seed, "settings": settings.to_config(),
                      "rounds": rounds, "wall_s": round(time.time() - start, 1), "load_start": load,
                      "load_end": load_average()})
    return str(path)


def centralised(settings: Settings, head_only: bool = False) -> list[dict]:
    """LoRA (or the head alone) on the pooled shards, one optimiser step per client step of a federated run;
    evaluated at the same round boundaries (every num_clients * local_steps steps). The head starts from the
    same seeded init as the federated runs' head."""
    from lorakit.federated.experiment import Experiment
    from lorakit.train import fit

    exp = Experiment(settings)
    if head_only:
        model = exp.base_model()
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("classifier."))
    else:
        model = exp.add_adapter(exp.base_model(), settings.rank, settings.seed)
    pooled = [exp.train[i] for shard in exp.shards for i in shard]
    per_round = settings.num_clients * settings.local_steps
    rounds = [{"round": 0, **exp.evaluate(model)}]
    for rnd in range(1, settings.num_rounds + 1):
        fit(model, pooled, lr=settings.lr, batch_size=settings.batch_size, max_steps=per_round, schedule="constant",
            warmup_steps=0, seed=settings.seed + rnd, progress=False, collate_fn=exp.collate)
        if rnd % settings.eval_every == 0 or rnd == settings.num_rounds:
            rounds.append({"round": rnd, **exp.evaluate(model)})
    return rounds


# ----------------------------------------------------------------------------------------------- bytes


def byte_formulas(settings: dict, rnd: int) -> tuple[int, int]:
    """Raw tensor bytes (fp32) per round that the protocol should send up and down, from the model's shapes."""
    layers = {"minilm": 6, "paraphrase-minilm-l3": 3}.get(settings["model"], 0) if settings["task"] == "tweets" else 1
    dims = {"tweets": (layers * 2, 384, 384, 3 * 384 + 3), "toy": (2, 32, 32, 3 * 32 + 3)}[settings["task"]]
    modules, d_in, d_out, head = dims
    k = settings["num-clients"]
    ranks = [int(x) for x in settings["client-ranks"].split(",")] if settings["client-ranks"] else [settings["rank"]]
    client_ranks = [ranks[i % len(ranks)] for i in range(k)]
    rule = STRATEGIES.get(settings["strategy"])
    per_unit = d_out if rule.shared else d_in + d_out  # FFA-LoRA sends B only
    up = sum(modules * r * per_unit + head for r in client_ranks)
    if rule.restart:  # the head, plus last round's merged update: stacked (FLoRA) or its SVD factors (dense)
        rank = sum(client_ranks) if settings["strategy"] == "flora" else min(sum(client_ranks), d_in, d_out)
        down = k * (head + (modules * rank * (d_in + d_out) if rnd > 1 else 0))
    else:
        global_rank = max(client_ranks)
        down = k * (modules * global_rank * per_unit + head)
    return 4 * up, 4 * down


# ----------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-federated"))
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each uses one thread)")
    parser.add_argument("--quick", action="store_true", help="toy task, few rounds: checks the script, not the claims")
    parser.add_argument("--seeds", default="", help="comma-separated seeds (default 0,1,2,3,4; --quick: 0,1)")
    parser.add_argument("--runs", default="", help="comma-separated run kinds to run, e.g. fedit-a0.1,head "
                        f"(default: {','.join(RUNS)})")
    parser.add_argument("--report-only", action="store_true", help="write the JSON and page from the cached runs")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out) / ("quick" if args.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in (args.seeds or ("0,1" if args.quick else ",".join(map(str, SEEDS)))).split(",")]
    kinds = args.runs.split(",") if args.runs else list(QUICK_RUNS if args.quick else RUNS)
    start = time.time()
    algebra_file = out / "algebra.json"
    if not algebra_file.is_file():
        write_json(algebra_file, algebra(args.quick))
    specs = {f"{k}-s{seed}": spec(k, seed, args.quick) for k in kinds for seed in seeds}
    if not args.report_only:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            for path in pool.map(federated_run, specs, specs.values(), [str(out)] * len(specs)):
                print("done", path, flush=True)
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*-s*.json"))}
    data = {"command": command_line(argv), "machine": machine(), "quick": args.quick, "budget": QUICK if args.quick
            else TWEETS, "seeds": seeds, "kinds": kinds, "hetero_ranks": HETERO_RANKS,
            "missing": sorted(set(specs) - set(runs)), "algebra": json.loads(algebra_file.read_text()),
            "runs": runs, "formulas": {n: [byte_formulas(r["settings"], rnd) for rnd in (1, 2)] for n, r in runs.items()
                                       if r["kind"] not in ("centralised", "head")},
            "seconds": sum(r["wall_s"] for r in runs.values()) + time.time() - start}
    target = out if args.quick else DOCS  # --quick checks the script; its report stays under --out
    write_json(target / "federated.json", data)
    from federated_report import write

    print(f"wrote {write(data, target)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
