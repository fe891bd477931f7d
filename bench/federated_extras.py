"""Federated extras benchmark: writes docs/benchmarks/federated_extras.md and .json.

1. Server memory with many clients: the bytes of K clients' updates (MiniLM's attention size, 6 layers x query,
   value, rank 8, float32) and the peak-RSS rise while the server aggregates them (fedit, ffa_lora, flora).
2. Accuracy cost of central DP and of server optimisers / FedProx: the toy task (4 clients, Dirichlet 0.5),
   final accuracy as mean and 95% t-interval over seeds, with the epsilon each DP run reports.
Thresholds (the script exits 1 when one fails): epsilon falls as the noise grows; clipping without noise costs
at most 0.10 accuracy against FFA-LoRA without DP; aggregating 1,000 clients' updates raises the peak RSS by
less than 2x what the updates themselves take.

    python bench/federated_extras.py [--quick] [--out runs/bench-federated-extras]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine, peak_rss_rise  # noqa: E402
from lorakit import AdapterState, LoRAConfig  # noqa: E402
from lorakit.federated import aggregate  # noqa: E402
from lorakit.federated.experiment import Settings  # noqa: E402
from lorakit.federated.local import run_in_process  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks"
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # two-sided 95% t quantiles by degrees of freedom
TOY = dict(task="toy", num_rounds=10, num_clients=4, local_steps=4, batch_size=16, lr=1e-2, rank=4, lora_alpha=8.0,
           max_train=400, max_eval=200, eval_every=10, dirichlet_alpha=0.5, min_replies=2)
CONFIGS = {
    "fedit": {},
    "fedit + FedAdam": dict(server_opt="adam", server_lr=0.01),
    "fedit + FedYogi": dict(server_opt="yogi", server_lr=0.01),
    "fedit + FedProx 0.1": dict(proximal_mu=0.1),
    "ffa_lora": dict(strategy="ffa_lora"),
    "ffa_lora DP clip only": dict(strategy="ffa_lora", dp="server-fixed", dp_clip=0.5, dp_noise=0.0),
    "ffa_lora DP z=0.5": dict(strategy="ffa_lora", dp="server-fixed", dp_clip=0.5, dp_noise=0.5),
    "ffa_lora DP z=1": dict(strategy="ffa_lora", dp="server-fixed", dp_clip=0.5, dp_noise=1.0),
    "ffa_lora DP z=2": dict(strategy="ffa_lora", dp="server-fixed", dp_clip=0.5, dp_noise=2.0),
}
DP_ORDER = ["ffa_lora DP z=0.5", "ffa_lora DP z=1", "ffa_lora DP z=2"]


def client_states(k: int, seed: int = 0) -> list[AdapterState]:
    """K synthetic rank-8 clients of MiniLM's attention size (6 layers x query, value; 384 x 384), float32."""
    g = torch.Generator().manual_seed(seed)
    config = LoRAConfig(r=8, lora_alpha=16, target_modules=["query", "value"])
    a0 = {f"l{i}.{m}": torch.randn(8, 384, generator=g) / 20 for i in range(6) for m in ("query", "value")}
    states = []
    for _ in range(k):
        tensors = {p: {"lora_A.weight": a.clone(), "lora_B.weight": torch.randn(384, 8, generator=g) / 100}
                   for p, a in a0.items()}
        states.append(AdapterState(config, tensors))
    return states


def _setup(k: int, strategy: str):
    return client_states(k), strategy


def _aggregate(prepared) -> None:
    states, strategy = prepared
    aggregate(strategy, states, [1.0] * len(states))


def memory(ks: list[int]) -> list[dict]:
    rows = []
    for k in ks:
        held = sum(t.numel() * t.element_size() for s in client_states(1) for d in s.tensors.values() for t in d.values())
        for strategy in ("fedit", "ffa_lora", "flora"):
            began = time.time()
            rise = peak_rss_rise(_setup, _aggregate, k, strategy)
            rows.append(dict(clients=k, strategy=strategy, updates_bytes=held * k, peak_rise_bytes=rise,
                             seconds_with_setup=round(time.time() - began, 2)))
    return rows


def accuracy(seeds: list[int], rounds: int) -> dict:
    out = {}
    for name, changes in CONFIGS.items():
        runs = []
        for seed in seeds:
            settings = Settings(**{**TOY, "num_rounds": rounds, "eval_every": rounds, "seed": seed, **changes})
            last = run_in_process(settings).state.log[-1]
            runs.append(dict(seed=seed, accuracy=last["accuracy"], epsilon=last.get("epsilon")))
        accs = [r["accuracy"] for r in runs]
        mean = sum(accs) / len(accs)
        half = (T95[len(accs) - 1] * math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1) / len(accs))
                if len(accs) > 1 else float("nan"))
        out[name] = dict(runs=runs, mean=mean, ci95=half, epsilon=runs[0]["epsilon"])
    return out


def checks(acc: dict, mem: list[dict]) -> list[tuple[str, bool]]:
    eps = [acc[n]["epsilon"] for n in DP_ORDER]
    out = [("epsilon falls as the noise multiplier grows", all(a > b for a, b in zip(eps, eps[1:]))),
           ("DP clipping without noise costs <= 0.10 accuracy vs ffa_lora",
            acc["ffa_lora"]["mean"] - acc["ffa_lora DP clip only"]["mean"] <= 0.10)]
    big = [r for r in mem if r["clients"] == max(x["clients"] for x in mem) and r["strategy"] == "fedit"]
    out.append((f"fedit over {big[0]['clients']} clients: peak-RSS rise < 2x the updates",
                big[0]["peak_rise_bytes"] < 2 * big[0]["updates_bytes"]))
    return out


def report(acc: dict, mem: list[dict], results: list, quick: bool, seconds: float, rounds: int, seeds: list) -> str:
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    lines = ["# Federated extras: server memory, DP and server optimisers", "",
             f"Generated by `python bench/federated_extras.py{' --quick' if quick else ''}` in {seconds:.0f} s. "
             "Raw numbers: federated_extras.json.", "",
             "## Server memory: K clients' updates", "",
             "Synthetic rank-8 clients of MiniLM's attention size (6 layers x query, value). `updates` is what the "
             "server holds once every reply is in; `peak rise` is the peak RSS rise while it aggregates them "
             "(a forked probe, `bench/common.py`).", "",
             "| clients | strategy | updates | peak rise while aggregating |", "|---|---|---|---|"]
    lines += [f"| {r['clients']} | {r['strategy']} | {mib(r['updates_bytes'])} | {mib(r['peak_rise_bytes'])} |" for r in mem]
    lines += ["", "## Accuracy: DP and server optimisers", "",
              f"Toy task (`task=toy`), 4 clients, Dirichlet 0.5, {rounds} rounds, final accuracy on 200 test examples, "
              f"mean and 95% t-interval over seeds {seeds}. DP: server-side fixed clipping, C = 0.5, equal client "
              "weights, epsilon at delta = 1e-5 by the RDP accountant (no sampling amplification).", "",
              "| run | accuracy | 95% CI | epsilon |", "|---|---|---|---|"]
    for name, r in acc.items():
        eps = "-" if r["epsilon"] is None else ("inf" if r["epsilon"] == math.inf else f"{r['epsilon']:.1f}")
        lines.append(f"| {name} | {r['mean']:.3f} | ±{r['ci95']:.3f} | {eps} |")
    lines += ["", "## Thresholds", ""] + [f"- {'PASS' if ok else 'FAIL'}: {what}" for what, ok in results]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer clients, rounds and seeds: checks the script")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-federated-extras"))
    args = parser.parse_args(argv)
    began = time.time()
    seeds, rounds = ([0, 1], 3) if args.quick else ([0, 1, 2, 3, 4], 10)
    mem = memory([10, 100] if args.quick else [100, 1000])
    acc = accuracy(seeds, rounds)
    results = checks(acc, mem)
    target = Path(args.out) if args.quick else DOCS
    target.mkdir(parents=True, exist_ok=True)
    data = dict(machine=machine(), memory=mem, accuracy=acc, checks=results, seeds=seeds, rounds=rounds)
    (target / "federated_extras.json").write_text(json.dumps(data, indent=1, default=str))
    (target / "federated_extras.md").write_text(report(acc, mem, results, args.quick, time.time() - began, rounds, seeds))
    print((target / "federated_extras.md").read_text())
    return 0 if all(ok for _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
