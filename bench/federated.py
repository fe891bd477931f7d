"""Federated LoRA benchmark: writes docs/benchmarks/federated.md, federated.png and federated_error.png.

1. Aggregation error of every strategy against the exact weighted sum sum_k p_k s B_k A_k, on synthetic client
   factors of MiniLM's attention size (384 x 384), as client drift, client count and rank grow.
2. Accuracy per round: MiniLM on the tweets task, 10 clients, Dirichlet alpha in {0.1, 1.0}, every strategy,
   plus centralised LoRA on the pooled data (the ceiling) with the same number of optimiser steps.
3. Heterogeneous ranks (client ranks cycle over 4, 8, 16): FLoRA against zero-padding (and FFA-LoRA).
4. Bytes per round, measured on the Flower records each run sent, against the formulas.

Parts 2-4 run the real ServerApp strategy and ClientApp through ``InProcessGrid`` (the same code Flower's
engines run; tests/federated/test_fed_flower.py shows the simulation engine gives identical numbers).
Each run's history is cached under --out, so an interrupted benchmark resumes; --jobs runs that many at once.

    python bench/federated.py [--jobs 2] [--out runs/bench-federated] [--quick]
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

DOCS = ROOT / "docs" / "benchmarks"
STRATEGY_ORDER = ["fedit", "ffa_lora", "flora", "lora_fair", "fedavg_dense", "zero_pad"]
# The accuracy runs are the bundled experiment (Settings' defaults: sized for two shared CPU cores).
TWEETS: dict = {}
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


def run_specs(quick: bool) -> dict[str, dict]:
    """Run name -> Settings fields, for every federated and centralised run."""
    base = QUICK if quick else TWEETS
    specs = {}
    for alpha in (0.1, 1.0):
        for name in STRATEGY_ORDER:
            if name in ("zero_pad", "fedavg_dense") and not quick:
                continue  # equal ranks: zero_pad is fedit; fedavg_dense merges FLoRA's exact update (--quick shows both)
            specs[f"{name}-a{alpha}"] = {**base, "strategy": name, "dirichlet_alpha": alpha}
    for name in ("flora", "zero_pad", "ffa_lora"):
        specs[f"{name}-hetero"] = {**base, "strategy": name, "dirichlet_alpha": 1.0, "client_ranks": "4,8,16"}
    specs["centralised"] = {**base, "strategy": "fedit", "dirichlet_alpha": 1.0}
    return specs


def federated_run(name: str, fields: dict, out: str) -> str:
    """Run one configuration in process; returns the path of its cached history."""
    torch.set_num_threads(1)
    path = Path(out) / f"{name}.json"
    if path.is_file():
        return str(path)
    from lorakit.federated.local import run_in_process

    settings = Settings(**fields)
    start = time.time()
    rounds = centralised(settings) if name == "centralised" else run_in_process(settings).state.log
    data = {"name": name, "settings": settings.to_config(), "rounds": rounds, "wall_s": round(time.time() - start, 1)}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return str(path)


def centralised(settings: Settings) -> list[dict]:
    """LoRA on the pooled shards, one optimiser step per client step of the federated runs; evaluated at the
    same round boundaries (every num_clients * local_steps steps)."""
    from lorakit.federated.experiment import Experiment
    from lorakit.train import fit

    exp = Experiment(settings)
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
    dims = {"tweets": (6 * 2, 384, 384, 3 * 384 + 3), "toy": (2, 32, 32, 3 * 32 + 3)}[settings["task"]]
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


# ----------------------------------------------------------------------------------------------- report


def _curve(run: dict) -> list[tuple[int, float]]:
    return [(r["round"], r["accuracy"]) for r in run["rounds"] if "accuracy" in r]


def plots(results: dict, runs: dict, target: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, alpha in zip(axes[:2], (0.1, 1.0)):
        for name in STRATEGY_ORDER:
            if f"{name}-a{alpha}" in runs:
                ax.plot(*zip(*_curve(runs[f"{name}-a{alpha}"])), marker=".", label=name)
        ax.plot(*zip(*_curve(runs["centralised"])), "k--", label="centralised LoRA")
        ax.set(title=f"Dirichlet alpha = {alpha}", xlabel="round", ylabel="test accuracy")
    for name in ("flora", "zero_pad", "ffa_lora"):
        axes[2].plot(*zip(*_curve(runs[f"{name}-hetero"])), marker=".", label=name)
    axes[2].set(title="client ranks 4/8/16, alpha = 1.0", xlabel="round", ylabel="test accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    acc_png = target / "federated.png"
    fig.savefig(acc_png, dpi=100)
    plt.close(fig)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (axis, key) in zip(axes, (("drift", "drift"), ("clients", "k"), ("rank", "r"))):
        rows = results[axis]
        for name in STRATEGY_ORDER + ["lora_fair floor"]:
            ys = [max(row[name], 1e-17) for row in rows]
            ax.loglog([row[key] for row in rows], ys, marker="o", linestyle=":" if "floor" in name else "-", label=name)
        ax.set(title=f"error vs {axis}", xlabel=key, ylabel="relative error vs exact sum")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    err_png = target / "federated_error.png"
    fig.savefig(err_png, dpi=100)
    plt.close(fig)
    return [acc_png.name, err_png.name]


def _acc_table(runs: dict, names: list[str]) -> list[str]:
    cols = _report_rounds(runs)
    lines = ["| run | round 0 | " + " | ".join(f"round {r}" for r in cols) + " | best | mean aggregation error | "
             "MiB sent (all rounds) | compute |", "|---" * (len(cols) + 6) + "|"]
    for name in names:
        run = runs[name]
        acc = dict(_curve(run))
        errs = [r["aggregation-error"] for r in run["rounds"] if "aggregation-error" in r]
        sent = sum(r.get("uplink-bytes", 0) + r.get("downlink-bytes", 0) for r in run["rounds"]) / 2**20
        cells = [f"{acc.get(r, float('nan')):.3f}" for r in [0] + cols]
        err = f"{sum(errs) / len(errs):.2e}" if errs else "—"
        mib = f"{sent:.1f}" if errs else "—"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {max(acc.values()):.3f} | {err} | {mib} | "
                     f"{run['wall_s'] / 60:.0f} min |")
    return lines + [""]


def findings(runs: dict) -> list[str]:
    """Comparisons computed from the runs (no numbers are typed in by hand)."""
    final = {n: _curve(r)[-1][1] for n, r in runs.items()}
    best = {n: max(a for _, a in _curve(r)) for n, r in runs.items()}
    err = {n: sum(x["aggregation-error"] for x in r["rounds"][1:] if "aggregation-error" in x) / max(1, sum(
        "aggregation-error" in x for x in r["rounds"][1:])) for n, r in runs.items() if n != "centralised"}
    out = []
    for alpha in (0.1, 1.0):
        fed = {n: final[n] for n in final if n.endswith(f"-a{alpha}")}
        top = max(fed, key=fed.get)
        ranking = ", ".join(f"{n.split('-')[0]} {a:.3f}" for n, a in sorted(fed.items(), key=lambda x: -x[1]))
        gap = final["centralised"] - fed[top]
        out.append(f"- alpha = {alpha}: final accuracy {ranking}; centralised LoRA {final['centralised']:.3f}. "
                   f"The best federated run ({top.split('-')[0]}) ends {abs(gap):.3f} {'below' if gap >= 0 else 'above'} "
                   f"the ceiling (best over rounds: {best[top]:.3f} vs {best['centralised']:.3f}).")
        if f"fedit-a{alpha}" in err and f"lora_fair-a{alpha}" in err:
            out.append(f"  Real client updates: FedIT's mean aggregation error is {err[f'fedit-a{alpha}']:.3f}, "
                       f"LoRA-FAIR's {err[f'lora_fair-a{alpha}']:.3f}; FLoRA's {err[f'flora-a{alpha}']:.1e} and "
                       f"FFA-LoRA's {err[f'ffa_lora-a{alpha}']:.1e} (float32 round-off).")
    if "flora-hetero" in final:
        out.append(f"- Mixed ranks 4/8/16: FLoRA {final['flora-hetero']:.3f} (aggregation error "
                   f"{err['flora-hetero']:.1e}), zero-padding {final['zero_pad-hetero']:.3f} (error "
                   f"{err['zero_pad-hetero']:.3f}), FFA-LoRA {final['ffa_lora-hetero']:.3f}.")
    up = lambda n: sum(r.get("downlink-bytes", 0) for r in runs[n]["rounds"]) / 2**20  # noqa: E731
    if "flora-a1.0" in runs and "fedit-a1.0" in runs:
        out.append(f"- Downlink over all rounds (alpha 1.0): FLoRA {up('flora-a1.0'):.1f} MiB, FedIT "
                   f"{up('fedit-a1.0'):.1f} MiB, FFA-LoRA {up('ffa_lora-a1.0'):.1f} MiB: FLoRA ships every "
                   "client's stacked factors to every client each round.")
    return out + [""]


def report(results: dict, runs: dict, quick: bool, pngs: list[str], seconds: float) -> str:
    s = next(iter(runs.values()))["settings"]
    lines = ["# Federated LoRA benchmark", "",
             f"Generated by `python bench/federated.py{' --quick' if quick else ''}`; {seconds / 3600:.1f} h of "
             "compute on this machine's shared CPU cores. docs/federated.md describes the strategies and the apps. "
             "Server memory at 1,000 clients, DP and server optimisers: federated_extras.md "
             "(`bench/federated_extras.py`).", "",
             "## Scale", "",
             f"Task `{s['task']}`: {s['max-train']} training examples split over {s['num-clients']} clients by a "
             f"Dirichlet label skew, {s['max-eval']} test examples"
             f"{', sequences cut at ' + str(s['max-length']) + ' tokens' if s['task'] == 'tweets' else ''}. "
             f"Model `{s['model'] if s['task'] == 'tweets' else 'toy'}` with LoRA r={s['rank']} "
             f"(alpha {s['lora-alpha']}) on `{s['targets']}` and the classifier trained in full. "
             f"{s['num-rounds']} rounds, every client each round, {s['local-steps']} local AdamW steps of "
             f"batch {s['batch-size']} at lr {s['lr']} (constant), test accuracy every {s['eval-every']} rounds. "
             "This is far smaller than the papers' settings (7B models, hundreds of rounds): it compares the "
             "strategies under the same small budget, one seed; differences of a few points on 200 test "
             "examples are within noise (one example = 0.5 points).", "",
             "## Findings", ""] + findings(runs)
    lines += ["## 1. Aggregation error against the exact weighted sum", "",
              "Relative error ||ΔW_applied − Σ p_k s B_k A_k||_F / ||Σ p_k s B_k A_k||_F on one 384 x 384 module, "
              f"mean of {1 if quick else 3} seed(s). Clients drift from one common (A0, B0) by `drift` (relative noise on both factors; "
              "FFA-LoRA's clients share A by construction, so only their B drift). Weights from random example "
              "counts. `lora_fair floor` = ||ΔW (I − Ā⁺Ā)|| / ||ΔW||, the least error any correction of B alone "
              "can reach.", "", f"![aggregation error]({pngs[1]})", ""]
    cols = STRATEGY_ORDER + ["lora_fair floor"]
    for axis, key, fixed in (("drift", "drift", "K=10, r=8"), ("clients", "k", "drift 0.3, r=8"),
                             ("rank", "r", "K=10, drift 0.3")):
        lines += [f"By {axis} ({fixed}):", "", "| " + key + " | " + " | ".join(cols) + " |",
                  "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {row[key]} | " + " | ".join(f"{row[c]:.2e}" for c in cols) + " |" for row in results[axis]]
        lines.append("")
    alpha_runs = [n for n in runs if "-a" in n] + ["centralised"]
    lines += ["## 2. Accuracy per round", "", f"![accuracy per round]({pngs[0]})", "",
              "`mean aggregation error`: the server's per-round error of the applied update against the exact "
              "weighted sum of the clients' real updates. `centralised`: LoRA on the pooled shards, with one "
              "optimiser step for every client step of a federated round.", ""] + _acc_table(runs, alpha_runs)
    if not quick:
        lines += ["`zero_pad` with equal ranks is FedIT number for number, and `fedavg_dense` merges the same exact "
                  "update as FLoRA, so neither is rerun here; `--quick` runs both and shows it.", ""]
    lines += ["## 3. Heterogeneous ranks", "", "Client k trains rank (4, 8, 16)[k mod 3], alpha 1.0.", ""]
    lines += _acc_table(runs, [n for n in runs if n.endswith("-hetero")])
    lines += ["## 4. Bytes per round: measured against the formulas", "",
              "Raw tensor bytes (fp32) the round's records carried, summed over clients, against the formula from "
              "the model's shapes: up = Σ_k 4 (L r_k (d_in + d_out) + head), B only (L r_k d_out) for FFA-LoRA; down "
              "= the global adapter at its rank for the continuing strategies, and for FLoRA the head plus last "
              "round's stack of rank Σ r_k (the dense strategy: min(Σ r_k, d_in, d_out)). `wire` is Flower's "
              "`ArrayRecord.count_bytes()` (each array's .npy header and key on top).", "",
              "| run | round | up (measured) | up (formula) | down (measured) | down (formula) | wire up | wire down | match |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        if name == "centralised":
            continue
        for rec in [r for r in run["rounds"] if r["round"] in (1, 2)]:
            up, down = byte_formulas(run["settings"], rec["round"])
            ok = up == rec["uplink-tensor-bytes"] and down == rec["downlink-tensor-bytes"]
            lines.append(f"| {name} | {rec['round']} | {rec['uplink-tensor-bytes']:,} | {up:,} | "
                         f"{rec['downlink-tensor-bytes']:,} | {down:,} | {rec['uplink-bytes']:,} | "
                         f"{rec['downlink-bytes']:,} | {'yes' if ok else 'NO'} |")
    return "\n".join(lines) + "\n"


def _report_rounds(runs: dict) -> list[int]:
    evaluated = sorted({r["round"] for run in runs.values() for r in run["rounds"] if "accuracy" in r} - {0})
    picks = {evaluated[min(len(evaluated) - 1, i)] for i in (0, 1, len(evaluated) // 4, len(evaluated) // 2)}
    return sorted(picks | {evaluated[-1]})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-federated"))
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each uses one thread)")
    parser.add_argument("--quick", action="store_true", help="toy task, few rounds: checks the script, not the claims")
    parser.add_argument("--only", default="", help="comma-separated run names to (re)run, e.g. flora-a0.1")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out) / ("quick" if args.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    algebra_file = out / "algebra.json"
    if not algebra_file.is_file():
        algebra_file.write_text(json.dumps(algebra(args.quick), indent=1))
    results = json.loads(algebra_file.read_text())
    specs = run_specs(args.quick)
    wanted = [n for n in specs if not args.only or n in args.only.split(",")]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for path in pool.map(federated_run, wanted, [specs[n] for n in wanted], [str(out)] * len(wanted)):
            print("done", path, flush=True)
    runs = {n: json.loads((out / f"{n}.json").read_text()) for n in specs if (out / f"{n}.json").is_file()}
    if len(runs) < len(specs):
        print(f"{len(specs) - len(runs)} runs missing; report not written", file=sys.stderr)
        return 1
    target = out if args.quick else DOCS  # --quick checks the script; its report stays under --out
    target.mkdir(parents=True, exist_ok=True)
    pngs = plots(results, runs, target)
    text = report(results, runs, args.quick, pngs, sum(r["wall_s"] for r in runs.values()) + time.time() - start)
    (target / "federated.md").write_text(text)
    print(f"wrote {target / 'federated.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
