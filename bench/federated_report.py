"""Writes docs/benchmarks/federated.md and its plots from federated.json (bench/federated.py); nothing typed in.

Verdicts pair each seed of a run with the same seed of its baseline (the same data, split, head init and test
set) and judge the mean paired difference of final test accuracy by its one-sided 95% bounds (common.decide).
Thresholds, fixed before the seeds ran, are stated in each row; a verdict can be "no".
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common import THRESHOLD, ci, decide

SPREAD = 0.015  # a budget tells methods apart when every row's sd over seeds is at most 1.5 points
STRATEGIES = ["fedit", "ffa_lora", "flora", "lora_fair", "fedavg_dense", "zero_pad"]
# (paper, claim, run, baseline, kind): what each paper states, against a baseline fixed before the runs.
CLAIMS = [
    ("LoRA (arXiv:2106.09685)", "adapting the encoder beats training the head alone (the budget's floor)",
     "centralised", "head", "beats"),
    ("FFA-LoRA (arXiv:2403.12313)", "freezing A makes aggregation exact and beats FedIT under label skew",
     "ffa_lora-a0.1", "fedit-a0.1", "beats"),
    ("FLoRA (arXiv:2409.05976)", "stacking aggregates without noise and beats FedIT", "flora-a0.1", "fedit-a0.1",
     "beats"),
    ("FLoRA (arXiv:2409.05976)", "with heterogeneous client ranks, beats zero-padding", "flora-hetero",
     "zero_pad-hetero", "beats"),
    ("LoRA-FAIR (arXiv:2411.14961)", "the server-side correction of B beats FedIT", "lora_fair-a0.1", "fedit-a0.1",
     "beats"),
]


def _final(run: dict) -> float:
    return [r["accuracy"] for r in run["rounds"] if "accuracy" in r][-1]


def by_kind(data: dict) -> dict[str, dict[int, dict]]:
    """Run kind -> seed -> run."""
    out: dict[str, dict[int, dict]] = {}
    for run in data["runs"].values():
        out.setdefault(run["kind"], {})[run["seed"]] = run
    return {k: out[k] for k in data["kinds"] if k in out}


def paired(kinds: dict, run: str, base: str) -> list[float]:
    a, b = kinds.get(run, {}), kinds.get(base, {})
    return [_final(a[s]) - _final(b[s]) for s in sorted(a) if s in b]


def stats_of(seeds: dict[int, dict]) -> dict:
    acc = [_final(r) for _, r in sorted(seeds.items())]
    mean, half = ci(acc)
    return dict(mean=mean, half=half, sd=float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0, n=len(acc))


def _pm(st: dict) -> str:
    return f"{100 * st['mean']:.1f} ± {100 * st['half']:.1f} (sd {100 * st['sd']:.1f}, {st['n']} seeds)"


def budget_check(kinds: dict) -> list[str]:
    """The page's "is the budget telling strategies apart?" section."""
    lines = ["## Is the budget telling strategies apart?", "",
             f"A verdict needs LoRA clearly above the head alone and a spread over seeds (sample sd of final test "
             f"accuracy) of at most {100 * SPREAD:g} points in every row, else nothing can be told apart.", ""]
    spread = {k: stats_of(v) for k, v in kinds.items()}
    wide = [k for k, st in spread.items() if st["sd"] > SPREAD]
    lines.append(f"- Spread: the largest sd is {100 * max(st['sd'] for st in spread.values()):.1f} points "
                 f"({max(spread, key=lambda k: spread[k]['sd'])}); " + (
                     f"rows above {100 * SPREAD:g} points: {', '.join(wide)}." if wide else
                     f"every row is within {100 * SPREAD:g} points."))
    above = []
    if "head" in kinds:
        for kind in kinds:
            if kind == "head":
                continue
            text, verdict = decide(paired(kinds, kind, "head"), "beats")
            above.append(verdict == "yes")
            lines.append(f"- {kind} against the head alone: {text}: "
                         f"{'clearly above' if verdict == 'yes' else 'NOT clearly above'}.")
    ok = not wide and above and all(above)
    lines.append(f"- So this budget {'tells' if ok else 'does NOT tell'} strategies apart: "
                 + ("every row is clearly above the head alone within the spread." if ok else
                    "the verdicts below hold for this budget only and say little about the methods."))
    return lines + [""]


def claims(kinds: dict) -> list[str]:
    lines = ["## Paper claims", "",
             "Each claim is judged on final test accuracy, pairing seed with seed, against the threshold in its row "
             "(fixed before the runs). \"yes\": the one-sided 95% lower bound of the mean paired difference is above "
             "0; \"no\": the upper bound is below 0; otherwise \"inconclusive\". The papers' settings are far larger "
             "(7B models, hundreds of rounds); these verdicts hold for this budget only.", "",
             "| paper | claim | runs | threshold | our measurement | reproduced? |", "|---|---|---|---|---|---|"]
    for paper, claim, run, base, kind in CLAIMS:
        if run not in kinds or base not in kinds:
            lines.append(f"| {paper} | {claim} | {run} vs {base} | {THRESHOLD[kind]} | not run | — |")
            continue
        text, verdict = decide(paired(kinds, run, base), kind)
        a, b = stats_of(kinds[run]), stats_of(kinds[base])
        lines.append(f"| {paper} | {claim} | {run} vs {base} | {THRESHOLD[kind]} | {100 * a['mean']:.1f} vs "
                     f"{100 * b['mean']:.1f}; {text} | {verdict} |")
    return lines + [""]


def _curve(seeds: dict[int, dict]) -> tuple[list[int], np.ndarray]:
    rounds = [r["round"] for r in next(iter(seeds.values()))["rounds"] if "accuracy" in r]
    acc = np.array([[r["accuracy"] for r in run["rounds"] if "accuracy" in r] for run in seeds.values()])
    return rounds, acc


def acc_table(kinds: dict, names: list[str]) -> list[str]:
    cols = _curve(kinds[names[0]])[0]
    lines = ["| run | " + " | ".join(f"round {r}" for r in cols) + " | final: mean ± 95% CI | mean aggregation error "
             "| MiB sent (all rounds) | compute per seed |", "|---" * (len(cols) + 5) + "|"]
    for name in names:
        seeds = kinds[name]
        _, acc = _curve(seeds)
        errs = [x["aggregation-error"] for r in seeds.values() for x in r["rounds"] if "aggregation-error" in x]
        run0 = next(iter(seeds.values()))
        sent = sum(r.get("uplink-bytes", 0) + r.get("downlink-bytes", 0) for r in run0["rounds"]) / 2**20
        minutes = np.median([r["wall_s"] for r in seeds.values()]) / 60
        lines.append(f"| {name} | " + " | ".join(f"{100 * x:.1f}" for x in acc.mean(0)) + f" | {_pm(stats_of(seeds))} | "
                     + (f"{np.mean(errs):.2e} | {sent:.1f}" if errs else "— | —") + f" | {minutes:.1f} min |")
    return lines + [""]


def plots(data: dict, kinds: dict, target: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("label skew (Dirichlet alpha 0.1) and the pooled references",
               [k for k in kinds if "-a" in k] + [k for k in ("centralised", "head") if k in kinds]),
              (f"client ranks {data['hetero_ranks']} (alpha 1.0)", [k for k in kinds if k.endswith("-hetero")])]
    groups = [g for g in groups if g[1]]
    fig, axes = plt.subplots(1, len(groups), figsize=(7 * len(groups), 4), squeeze=False)
    for ax, (title, names) in zip(axes[0], groups):
        for name in names:
            rounds, acc = _curve(kinds[name])
            half = np.array([ci(list(col))[1] for col in acc.T])
            line, = ax.plot(rounds, 100 * acc.mean(0), marker=".", label=name,
                            linestyle="--" if name in ("centralised", "head") else "-")
            ax.fill_between(rounds, 100 * (acc.mean(0) - half), 100 * (acc.mean(0) + half), alpha=0.15,
                            color=line.get_color())
        ax.set(title=title, xlabel="round", ylabel="test accuracy % (mean, 95% CI)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    acc_png = target / "federated.png"
    fig.savefig(acc_png, dpi=100)
    plt.close(fig)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (axis, key) in zip(axes, (("drift", "drift"), ("clients", "k"), ("rank", "r"))):
        rows = data["algebra"][axis]
        for name in STRATEGIES + ["lora_fair floor"]:
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


def algebra_section(data: dict, png: str) -> list[str]:
    lines = ["## 1. Aggregation error against the exact weighted sum", "",
             "Relative error ||ΔW_applied − Σ p_k s B_k A_k||_F / ||Σ p_k s B_k A_k||_F on one 384 x 384 module, "
             f"mean of {1 if data['quick'] else 3} seed(s). Clients drift from one common (A0, B0) by `drift` "
             "(relative noise on both factors; FFA-LoRA's clients share A by construction, so only their B drift). "
             "Weights from random example counts. `lora_fair floor` = ||ΔW (I − Ā⁺Ā)|| / ||ΔW||, the least error any "
             "correction of B alone can reach.", "", f"![aggregation error]({png})", ""]
    cols = STRATEGIES + ["lora_fair floor"]
    for axis, key, fixed in (("drift", "drift", "K=10, r=8"), ("clients", "k", "drift 0.3, r=8"),
                             ("rank", "r", "K=10, drift 0.3")):
        lines += [f"By {axis} ({fixed}):", "", "| " + key + " | " + " | ".join(cols) + " |",
                  "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {row[key]} | " + " | ".join(f"{row[c]:.2e}" for c in cols) + " |" for row in data["algebra"][axis]]
        lines.append("")
    return lines


def bytes_section(data: dict, kinds: dict) -> list[str]:
    lines = ["## 4. Bytes per round: measured against the formulas", "",
             "Raw tensor bytes (fp32) the round's records carried, summed over clients, against the formula from "
             "the model's shapes: up = Σ_k 4 (L r_k (d_in + d_out) + head), B only (L r_k d_out) for FFA-LoRA; down "
             "= the global adapter at its rank for the continuing strategies, and for FLoRA the head plus last "
             "round's stack of rank Σ r_k (the dense strategy: min(Σ r_k, d_in, d_out)). `wire` is Flower's "
             "`ArrayRecord.count_bytes()` (each array's .npy header and key on top). First seed of each run; every "
             "seed is checked in the last column.", "",
             "| run | round | up (measured) | up (formula) | down (measured) | down (formula) | wire up | wire down | "
             "every seed matches |", "|---|---|---|---|---|---|---|---|---|"]
    for kind, seeds in kinds.items():
        if kind in ("centralised", "head"):
            continue
        names = [n for n, r in data["runs"].items() if r["kind"] == kind]
        ok = all(rec["uplink-tensor-bytes"] == data["formulas"][n][rec["round"] - 1][0]
                 and rec["downlink-tensor-bytes"] == data["formulas"][n][rec["round"] - 1][1]
                 for n in names for rec in data["runs"][n]["rounds"] if rec["round"] in (1, 2))
        first = names[0]
        for rec in [r for r in data["runs"][first]["rounds"] if r["round"] in (1, 2)]:
            up, down = data["formulas"][first][rec["round"] - 1]
            lines.append(f"| {kind} | {rec['round']} | {rec['uplink-tensor-bytes']:,} | {up:,} | "
                         f"{rec['downlink-tensor-bytes']:,} | {down:,} | {rec['uplink-bytes']:,} | "
                         f"{rec['downlink-bytes']:,} | {'yes' if ok else 'NO'} |")
    return lines + [""]


def write(data: dict, target: Path) -> Path:
    """Render the page (and plots) into ``target``; returns the page's path."""
    kinds = by_kind(data)
    b = data["budget"]
    pngs = plots(data, kinds, target)
    steps = b["num_rounds"] * b["num_clients"] * b["local_steps"]
    lines = ["# Federated LoRA benchmark", "",
             f"Generated by `bench/federated.py` from federated.json (`{data['command']}`); "
             f"{data['seconds'] / 3600:.1f} h of compute summed over runs on this machine's shared CPU cores (load "
             f"average at the start of each run is in the JSON). docs/federated.md describes the strategies and the "
             "apps. Server memory at 1,000 clients, DP and server optimisers: federated_extras.md.", ""]
    if data["missing"]:
        lines += [f"**Incomplete**: {len(data['missing'])} runs had not finished when the page was written: "
                  f"{', '.join(data['missing'])}. Rows and verdicts use the seeds that ran.", ""]
    lines += ["## Scale", "",
              f"Task `{b['task']}`: {b['max_train']} training examples split over {b['num_clients']} clients by a "
              f"Dirichlet label skew, {b['max_eval']} test examples"
              + (f", sequences cut at 32 tokens; model `{b['model']}`" if b["task"] == "tweets" else "; toy model")
              + " with LoRA r=8 (alpha 16) on `query,value` and the classifier trained in full (FedAvg'd). "
              f"{b['num_rounds']} rounds, every client each round, {b['local_steps']} local AdamW steps of batch "
              f"{b['batch_size']} at lr {b['lr']} (constant): {steps} optimiser steps per run. Test accuracy every "
              f"{b['eval_every']} rounds. Seeds {', '.join(map(str, data['seeds']))}: a seed draws the training and "
              "test subsets, the client split, the head and adapter inits and the batches; runs with the same seed "
              "share all of these, so differences are paired by seed. `centralised`: LoRA on the pooled shards "
              "(the ceiling) and `head`: the head alone on the pooled shards (the floor), each with the "
              f"{steps} steps of one federated run at the same lr. The budget (the 3-layer model, 5 clients, "
              "10 rounds) is what two shared CPU cores could run over five seeds; the earlier page's 6-layer model "
              "with 10 clients and 20 rounds took 3.5 h for one seed.", ""]
    lines += budget_check(kinds) + claims(kinds) + algebra_section(data, pngs[1])
    flat = [k for k in kinds if not k.endswith("-hetero")]
    lines += ["## 2. Test accuracy per round", "", f"![accuracy per round]({pngs[0]})", "",
              "Accuracy in %, the mean over seeds at each evaluated round; the final column adds its 95% t-interval. "
              "`mean aggregation error`: the server's per-round error of the applied update against the exact "
              "weighted sum of the clients' real updates, over rounds and seeds.", ""] + acc_table(kinds, flat)
    hetero = [k for k in kinds if k.endswith("-hetero")]
    if hetero:
        lines += ["## 3. Heterogeneous ranks", "",
                  f"Client k trains rank ({data['hetero_ranks']})[k mod 3], alpha 1.0.", ""] + acc_table(kinds, hetero)
    lines += bytes_section(data, kinds)
    path = target / "federated.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    """Rewrite docs/benchmarks/federated.md (and its plots) from docs/benchmarks/federated.json."""
    import json

    out = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
    print(f"wrote {write(json.loads((out / 'federated.json').read_text()), out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
