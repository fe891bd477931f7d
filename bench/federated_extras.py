"""Federated extras benchmark: writes docs/benchmarks/federated_extras.md and .json.

1. Server memory with many clients: the bytes of K clients' updates (MiniLM's attention size, 6 layers x query,
   value, rank 8, float32) and the peak-RSS rise while the server aggregates them (fedit, ffa_lora, flora).
2. Accuracy cost of central DP (server-side and client-side clipping) and of server optimisers / FedProx: the
   toy task (4 clients, Dirichlet 0.5), final accuracy as mean and 95% t-interval over seeds, with the epsilon
   each DP run reports.
3. SecAgg+ against the plain run (FedIT, toy): final accuracy, bytes per round both ways, seconds per round.
4. Personalised (FedPer, personal LoRA on ``value``) against global: each client's accuracy on its own category
   mix after 3 rounds at Dirichlet 0.1, against the plain FedIT global's, per client over seeds.
5. The chat recipe: instruction tuning of the tiny Llama over 4 clients with heterogeneous ranks (FLoRA and
   FFA-LoRA, ranks 2,4,8): answer loss and greedy exact match / token F1 per round.
6. SecAgg+ with client-side DP (FFA-LoRA at the DP rows' noise levels) and with zero_pad / fedavg_dense (mixed
   ranks) / LoRA-FAIR, against the same runs without SecAgg+ (``--secure`` runs only these, into the page's JSON).
Thresholds (the script exits 1 when one fails): epsilon falls as the noise grows; clipping without noise costs
at most 0.10 accuracy against FFA-LoRA without DP; client-side and server-side fixed clipping agree within 0.02
at every noise level (the same clipping and noise, applied on the client instead of the server); SecAgg+ ends
within 0.02 of the plain run's accuracy on every seed; personalised adapters beat the plain global on average
over clients; the chat recipe's answer loss falls by at least 5%; aggregating 1,000 clients' updates raises the
peak RSS by less than 2x what the updates themselves take; SecAgg+ with zero_pad / fedavg_dense / LoRA-FAIR ends
within 0.02 of the plain run on every seed; SecAgg+ with client DP reports the plain epsilon and a mean accuracy
within the two 95% intervals of the plain client-DP run's.

    python bench/federated_extras.py [--quick] [--out runs/bench-federated-extras]
    python bench/federated_extras.py --gemma [--seeds 3]  # only the chat recipe on gemma-270m: federated_chat_gemma.*
    python bench/federated_extras.py --render   # rewrite federated_extras.md from its JSON
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from common import ci, machine, peak_rss_rise  # noqa: E402
from lorakit import AdapterState, LoRAConfig  # noqa: E402
from lorakit.federated import aggregate  # noqa: E402
from lorakit.federated.experiment import Settings  # noqa: E402
from lorakit.federated.local import run_in_process  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks"
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
CLIENT_DP = {f"ffa_lora client-DP {z}": dict(strategy="ffa_lora", dp="client-fixed", dp_clip=0.5, dp_noise=v)
             for z, v in (("clip only", 0.0), ("z=0.5", 0.5), ("z=1", 1.0), ("z=2", 2.0))}
CONFIGS.update(CLIENT_DP)
DP_ORDER = ["ffa_lora DP z=0.5", "ffa_lora DP z=1", "ffa_lora DP z=2"]
SECURE = {  # SecAgg+ with client-side DP, and with the strategies beyond FedIT, against their plain runs
    **{f"ffa_lora client-DP {z} + SecAgg+": dict(strategy="ffa_lora", dp="client-fixed", dp_clip=0.5, dp_noise=v,
                                                  secagg=True)
       for z, v in (("clip only", 0.0), ("z=0.5", 0.5), ("z=1", 1.0), ("z=2", 2.0))},
    **{f"{name}{suffix}": dict(strategy=name, client_ranks=ranks, secagg=secure)
       for name, ranks in (("zero_pad", "2,4"), ("fedavg_dense", "2,4"), ("lora_fair", ""))
       for suffix, secure in (("", False), (" + SecAgg+", True))},
}
CHAT = dict(task="chat", num_clients=4, local_steps=10, batch_size=8, lr=5e-2, rank=4, lora_alpha=8.0,
            targets="q_proj,v_proj,o_proj,down_proj", max_train=400, max_eval=40, gen_examples=40, max_length=48,
            eval_every=1, min_replies=2, client_ranks="2,4,8")


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


def toy_run(seed: int, rounds: int, **changes):
    """One in-process toy run (numpy's generator, which Flower's DP noise uses, seeded per run)."""
    np.random.seed(seed)
    return run_in_process(Settings(**{**TOY, "num_rounds": rounds, "eval_every": rounds, "seed": seed, **changes}))


def accuracy(seeds: list[int], rounds: int, configs: dict = CONFIGS) -> dict:
    """Final accuracy (mean and 95% t-interval over seeds), epsilon and median uplink bytes per round of each run."""
    out = {}
    for name, changes in configs.items():
        runs = []
        for seed in seeds:
            log = toy_run(seed, rounds, **changes).state.log
            runs.append(dict(seed=seed, accuracy=log[-1]["accuracy"], epsilon=log[-1].get("epsilon"),
                             up=statistics.median(r["uplink-bytes"] for r in log[1:])))
        mean, half = ci([r["accuracy"] for r in runs])
        out[name] = dict(runs=runs, mean=mean, ci95=half, epsilon=runs[0]["epsilon"])
    return out


def secagg_overhead(seeds: list[int], rounds: int) -> dict:
    """FedIT with and without SecAgg+: final accuracy, bytes per round, median seconds per round."""
    out = {}
    for name, changes in (("fedit", {}), ("fedit + SecAgg+", dict(secagg=True))):
        runs = []
        for seed in seeds:
            log = toy_run(seed, rounds, **changes).state.log
            per_round = log[1:]
            runs.append(dict(seed=seed, accuracy=log[-1]["accuracy"],
                             up=sum(r["uplink-bytes"] for r in per_round) / len(per_round),
                             down=sum(r["downlink-bytes"] for r in per_round) / len(per_round),
                             seconds=statistics.median(r["seconds"] for r in per_round),
                             bound=per_round[-1].get("secagg-error-bound")))
        out[name] = dict(runs=runs, accuracy=ci([r["accuracy"] for r in runs]),
                         up=statistics.median(r["up"] for r in runs), down=statistics.median(r["down"] for r in runs),
                         seconds=statistics.median(r["seconds"] for r in runs))
    return out


def personalised(seeds: list[int], rounds: int = 3) -> dict:
    """Per client: the personalised adapter's accuracy on its own mix, this run's global part alone, and the
    plain FedIT run's global (Dirichlet 0.1), one value per seed."""
    per_client: dict[int, dict[str, list]] = {}
    for seed in seeds:
        mine = toy_run(seed, rounds, dirichlet_alpha=0.1, personal="value").state.log[-1]["personalised"]
        plain = toy_run(seed, rounds, dirichlet_alpha=0.1)
        model = plain.global_model()
        for c in mine:
            row = per_client.setdefault(c["partition"], {"personal": [], "global part": [], "plain global": []})
            row["personal"].append(c["personal-accuracy"])
            row["global part"].append(c["global-accuracy"])
            row["plain global"].append(plain.exp.client_score(model, c["partition"]))
    return {k: row for k, row in sorted(per_client.items())}


def intervals(pers: dict) -> dict:
    """Mean and 95% t-interval of each client's per-seed values."""
    return {k: {name: ci(v) for name, v in row.items()} for k, row in pers.items()}


def chat_recipe(seeds: list[int], rounds: int) -> dict:
    """The chat task on the tiny Llama with heterogeneous ranks: the per-round log of each strategy and seed."""
    out = {}
    for strategy in ("flora", "ffa_lora"):
        out[strategy] = []
        for seed in seeds:
            began = time.time()
            settings = Settings(**{**CHAT, "strategy": strategy, "num_rounds": rounds, "seed": seed})
            log = run_in_process(settings).state.log
            out[strategy].append(dict(seed=seed, seconds=round(time.time() - began, 1),
                                      rounds=[{k: r.get(k) for k in ("round", "loss", "exact-match", "token-f1")}
                                              for r in log]))
    return out


def checks(acc: dict, mem: list[dict], sec: dict, pers: dict, chat: dict) -> list[tuple[str, bool]]:
    eps = [acc[n]["epsilon"] for n in DP_ORDER]
    out = [("epsilon falls as the noise multiplier grows", all(a > b for a, b in zip(eps, eps[1:]))),
           ("DP clipping without noise costs <= 0.10 accuracy vs ffa_lora",
            acc["ffa_lora"]["mean"] - acc["ffa_lora DP clip only"]["mean"] <= 0.10)]
    pairs = [("ffa_lora DP clip only", "ffa_lora client-DP clip only")] + [
        (n, n.replace("DP", "client-DP")) for n in DP_ORDER]
    out.append(("client-side and server-side fixed clipping agree within 0.02 at every noise level",
                all(abs(acc[a]["mean"] - acc[b]["mean"]) <= 0.02 for a, b in pairs)))
    plain = {r["seed"]: r["accuracy"] for r in sec["fedit"]["runs"]}
    out.append(("SecAgg+ ends within 0.02 of the plain run's accuracy on every seed",
                all(abs(r["accuracy"] - plain[r["seed"]]) <= 0.02 for r in sec["fedit + SecAgg+"]["runs"])))
    gain = [row["personal"][0] - row["plain global"][0] for row in pers.values()]
    out.append(("personalised adapters beat the plain FedIT global on average over clients", sum(gain) / len(gain) > 0))
    falls = [run["rounds"][-1]["loss"] <= 0.95 * run["rounds"][0]["loss"] for runs in chat.values() for run in runs]
    out.append(("chat recipe: the answer loss falls by >= 5% in every run", all(falls)))
    big = [r for r in mem if r["clients"] == max(x["clients"] for x in mem) and r["strategy"] == "fedit"]
    out.append((f"fedit over {big[0]['clients']} clients: peak-RSS rise < 2x the updates",
                big[0]["peak_rise_bytes"] < 2 * big[0]["updates_bytes"]))
    return out


def plain_of(name: str, acc: dict, secure: dict) -> dict:
    """The plain run a SecAgg+ row is compared with (the DP rows' are in the accuracy table)."""
    base = name.replace(" + SecAgg+", "")
    return secure.get(base) or acc[base]


def secure_checks(acc: dict, secure: dict) -> list[tuple[str, bool]]:
    rows = [n for n in secure if n.endswith("+ SecAgg+")]
    exact = [n for n in rows if "DP" not in n]
    noisy = [n for n in rows if "DP" in n]
    return [("SecAgg+ with zero_pad / fedavg_dense / lora_fair ends within 0.02 of the plain run on every seed",
             all(abs(a["accuracy"] - b["accuracy"]) <= 0.02 for n in exact
                 for a, b in zip(secure[n]["runs"], plain_of(n, acc, secure)["runs"]))),
            ("SecAgg+ with client DP: the same epsilon as plain client DP, mean accuracy within the two 95% intervals",
             all(secure[n]["epsilon"] == plain_of(n, acc, secure)["epsilon"] and abs(secure[n]["mean"] - plain_of(
                 n, acc, secure)["mean"]) <= secure[n]["ci95"] + plain_of(n, acc, secure)["ci95"] for n in noisy))]


def secure_section(acc: dict, secure: dict, rounds: int, seeds: list, seconds: float | None = None) -> list[str]:
    """The page's section on SecAgg+ with DP and with every strategy that has a secure form."""
    when = f"Run separately (`python bench/federated_extras.py --secure`, {seconds:.0f} s). " if seconds else ""
    lines = ["", "## SecAgg+ with client-side DP and with every strategy", "",
             f"{when}Toy task as above ({rounds} rounds, seeds {seeds}). Client-DP rows: FFA-LoRA, fixed clipping on each "
             "client before SecAgg+ masks the update (C = 0.5), noise added by the server to the unmasked mean; the "
             "server cannot verify the clipping. The noise draws differ from the plain runs' (the quantisation draws "
             "from the same generator), so only the distributions match. Other rows: each strategy's secure form "
             "(`zero_pad` and `fedavg_dense` at client ranks 2,4, padded to the largest rank or sent as dense "
             "products), against the same run without SecAgg+. Uplink: median bytes per round (SecAgg+: all four "
             "stages).", "", "| run | accuracy | 95% CI | epsilon | uplink / round | plain run's accuracy |",
             "|---|---|---|---|---|---|"]
    for name, r in secure.items():
        eps = "-" if r["epsilon"] is None else ("inf" if r["epsilon"] == math.inf else f"{r['epsilon']:.1f}")
        plain = plain_of(name, acc, secure) if name.endswith("+ SecAgg+") else None
        ref = f"{plain['mean']:.3f} ±{plain['ci95']:.3f}" if plain else "-"
        up = statistics.median(x["up"] for x in r["runs"]) / 1024
        lines.append(f"| {name} | {r['mean']:.3f} | ±{r['ci95']:.3f} | {eps} | {up:.1f} KiB | {ref} |")
    return lines


def report(acc: dict, mem: list[dict], sec: dict, pers: dict, chat: dict, results: list, quick: bool, seconds: float,
           rounds: int, seeds: list, secure: dict | None = None, secure_seconds: float | None = None) -> str:
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    lines = ["# Federated extras: server memory, DP, secure aggregation, personalisation, server optimisers, chat", "",
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
              f"mean and 95% t-interval over seeds {seeds}. DP: fixed clipping on the server (`DP`) or on the "
              "clients (`client-DP`), C = 0.5, equal client "
              "weights, epsilon at delta = 1e-5 by the RDP accountant (no sampling amplification).", "",
              "| run | accuracy | 95% CI | epsilon |", "|---|---|---|---|"]
    for name, r in acc.items():
        eps = "-" if r["epsilon"] is None else ("inf" if r["epsilon"] == math.inf else f"{r['epsilon']:.1f}")
        lines.append(f"| {name} | {r['mean']:.3f} | ±{r['ci95']:.3f} | {eps} |")
    lines += extra_sections(sec, pers, chat, rounds, seeds)
    if secure:
        lines += secure_section(acc, secure, rounds, seeds, secure_seconds)
    lines += ["", "## Thresholds", ""] + [f"- {'PASS' if ok else 'FAIL'}: {what}" for what, ok in results]
    return "\n".join(lines) + "\n"


def extra_sections(sec: dict, pers: dict, chat: dict, rounds: int, seeds: list) -> list[str]:
    """The SecAgg+, personalisation and chat-recipe sections of the page."""
    kib = lambda b: f"{b / 1024:.1f} KiB"  # noqa: E731
    lines = ["", "## SecAgg+ overhead", "",
             f"FedIT on the toy task, {rounds} rounds, with and without Flower's SecAgg+ (all 4 clients each round, "
             "Q = 2^22, clipping range 8); bytes per round as the server counts message bodies (SecAgg+: its four "
             "stages), seconds per round median over rounds and seeds (in one process, so no network time). "
             "The secure mean differs from the exact one by at most the bound below per entry (stochastic "
             "quantisation), which the tests check.", "",
             "| run | accuracy | 95% CI | uplink / round | downlink / round | s / round |", "|---|---|---|---|---|---|"]
    for name, r in sec.items():
        lines.append(f"| {name} | {r['accuracy'][0]:.3f} | ±{r['accuracy'][1]:.3f} | {kib(r['up'])} | {kib(r['down'])} "
                     f"| {r['seconds']:.3f} |")
    plain, secure = sec["fedit"], sec["fedit + SecAgg+"]
    bound = secure["runs"][0]["bound"]
    lines += ["", f"Overhead: uplink x{secure['up'] / plain['up']:.2f}, downlink x{secure['down'] / plain['down']:.2f}, "
              f"time x{secure['seconds'] / plain['seconds']:.2f}; quantisation bound {bound:.2e} per entry.", "",
              "## Personalised (FedPer) against global, per client", "",
              f"Toy task, Dirichlet 0.1, 3 rounds, personal LoRA on `value` (query LoRA and head federated). Accuracy "
              "on each client's own category mix (per-category test accuracy weighted by the client's shard), mean "
              f"and 95% t-interval over seeds {seeds}. `global part`: this run's final global adapter with the "
              "personal part at its initialisation; `plain global`: a FedIT run without personal modules.", "",
              "| client | personalised | global part | plain global |", "|---|---|---|---|"]
    for k, row in pers.items():
        lines.append(f"| {k} | " + " | ".join(f"{row[n][0]:.3f} ±{row[n][1]:.3f}"
                                              for n in ("personal", "global part", "plain global")) + " |")
    lines += ["", "## Chat recipe: instruction tuning with heterogeneous ranks", "",
              "The `chat` task on the zoo's `tiny-llama` (randomly initialised, 2 layers, byte tokens): the bundled "
              "tweets as instructions, 4 clients of ranks 2, 4, 8, LoRA on q,v,o,down_proj, 10 local steps per round. "
              "Answer loss and greedy exact match / token F1 on 40 held-out records, per round (mean over seeds). A "
              "random base has no language to build on: this row shows the recipe runs and learns (loss), not a "
              "useful assistant.", "", "| strategy | round | answer loss | exact match | token F1 |", "|---|---|---|---|---|"]
    for strategy, runs in chat.items():
        for i in range(len(runs[0]["rounds"])):
            vals = [[run["rounds"][i][k] for run in runs] for k in ("loss", "exact-match", "token-f1")]
            lines.append(f"| {strategy} | {i} | " + " | ".join(f"{sum(v) / len(v):.3f}" for v in vals) + " |")
    return lines


GEMMA = dict(task="chat", model="gemma-270m", num_clients=2, num_rounds=2, local_steps=4, batch_size=4, lr=1e-3,
             rank=8, lora_alpha=16.0, targets="q_proj,v_proj", max_train=64, max_eval=16, gen_examples=16,
             max_length=64, min_replies=2, eval_every=1, client_ranks="4,8", strategy="flora")


def gemma(target: Path, seeds: list[int]) -> int:
    """The chat recipe on gemma-270m over ``seeds`` (about 6 minutes a seed on two busy cores); thresholds as in
    the page."""
    began, runs = time.time(), []
    for seed in seeds:
        log = run_in_process(Settings(**{**GEMMA, "seed": seed})).state.log
        runs.append(dict(seed=seed, rounds=[{k: r.get(k) for k in ("round", "loss", "exact-match", "token-f1", "seconds")}
                                            for r in log]))
        print(f"seed {seed}: {runs[-1]['rounds']}", flush=True)
    data = dict(machine=machine(), settings=GEMMA, seeds=seeds, runs=runs, seconds=round(time.time() - began))
    target.mkdir(parents=True, exist_ok=True)
    (target / "federated_chat_gemma.json").write_text(json.dumps(data, indent=1))
    page, results = gemma_page(data)
    (target / "federated_chat_gemma.md").write_text(page)
    print(page)
    return 0 if all(ok for _, ok in results) else 1


def gemma_page(data: dict) -> tuple[str, list]:
    """The gemma page (and its threshold results) from the JSON the run wrote."""
    runs, seeds = data["runs"], data["seeds"]
    first = [r["rounds"][0] for r in runs]
    last = [r["rounds"][-1] for r in runs]
    results = [("answer loss falls by >= 50% in 2 rounds on every seed",
                all(b["loss"] <= 0.5 * a["loss"] for a, b in zip(first, last))),
               ("greedy exact match (mean over seeds) rises above round 0's",
                ci([b["exact-match"] for b in last])[0] > ci([a["exact-match"] for a in first])[0])]
    lines = ["# Federated chat recipe on gemma-270m", "",
             f"Generated by `python bench/federated_extras.py --gemma` in {data['seconds']:.0f} s "
             f"({len(seeds)} seeds). Raw numbers: federated_chat_gemma.json.", "",
             "The `chat` task (the bundled tweets as instructions: \"Sentiment of this tweet: ...\" -> the label "
             "name, rendered with lorakit's minimal chat template, since the packaged tokenizer has none) on the "
             "pretrained `gemma-270m`, FLoRA over 2 clients of ranks 4 and 8, LoRA on q_proj and v_proj, 4 local "
             "steps of 4 records per round, lr 1e-3. Answer loss on 16 held-out records and greedy exact match / "
             f"token F1 on the same 16; mean and 95% t-interval over seeds {seeds} (the seed draws the split, the "
             "adapters' init and the batches; 16 records per seed: a small sample).", "",
             "| round | answer loss | exact match | token F1 | seconds per round (median) |", "|---|---|---|---|---|"]
    for i in range(len(runs[0]["rounds"])):
        cells = []
        for key in ("loss", "exact-match", "token-f1"):
            mean, half = ci([r["rounds"][i][key] for r in runs])
            cells.append(f"{mean:.3f} ±{half:.3f}")
        secs = [r["rounds"][i]["seconds"] for r in runs if r["rounds"][i]["seconds"] is not None]
        cells.append(f"{statistics.median(secs):.0f}" if secs else "-")
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed (final round): " + "; ".join(
        f"seed {r['seed']}: loss {r['rounds'][-1]['loss']:.3f}, exact match {r['rounds'][-1]['exact-match']:.3f}"
        for r in runs) + ".", "", "## Thresholds", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {what}" for what, ok in results]
    return "\n".join(lines) + "\n", results


def rerender(target: Path) -> int:
    """Recompute the intervals of ``federated_extras.json`` with ``common.ci`` and rewrite the page from it (no run).

    Pages written before the per-seed personalised values were kept store their half-widths only: those are
    rescaled by the ratio of scipy's t quantile to the one they used (the only difference between the two)."""
    from scipy import stats

    data = json.loads((target / "federated_extras.json").read_text())
    seeds, rounds = data["seeds"], data["rounds"]
    for r in data["accuracy"].values():
        r["mean"], r["ci95"] = ci([x["accuracy"] for x in r["runs"]])
    for r in data["secagg"].values():
        r["accuracy"] = ci([x["accuracy"] for x in r["runs"]])
    if "personalised_runs" in data:
        data["personalised"] = intervals(data["personalised_runs"])
    elif not data.get("personalised_rescaled"):  # once: the page's half-widths then use scipy's quantile
        old_t = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}[len(seeds) - 1]
        factor = float(stats.t.ppf(0.975, len(seeds) - 1)) / old_t
        data["personalised"] = {k: {n: (m, h * factor) for n, (m, h) in row.items()} for k, row in data["personalised"].items()}
        data["personalised_rescaled"] = True
    secure = data.get("secure")
    for r in (secure or {}).values():
        r["mean"], r["ci95"] = ci([x["accuracy"] for x in r["runs"]])
    results = checks(data["accuracy"], data["memory"], data["secagg"], data["personalised"], data["chat"])
    results += secure_checks(data["accuracy"], secure) if secure else []
    data["checks"] = results
    seconds = data.get("seconds")
    if seconds is None:  # older JSON: the run time is on the page only
        import re

        seconds = float(re.search(r" in (\d+) s\.", (target / "federated_extras.md").read_text()).group(1))
    (target / "federated_extras.json").write_text(json.dumps(data, indent=1, default=str))
    (target / "federated_extras.md").write_text(report(data["accuracy"], data["memory"], data["secagg"],
                                                       data["personalised"], data["chat"], results, False, seconds,
                                                       rounds, seeds, secure, data.get("secure_seconds")))
    print((target / "federated_extras.md").read_text())
    return 0 if all(ok for _, ok in results) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer clients, rounds and seeds: checks the script")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-federated-extras"))
    parser.add_argument("--gemma", action="store_true", help="only the chat recipe on gemma-270m (about 6 minutes a seed)")
    parser.add_argument("--seeds", type=int, default=3, help="--gemma: how many seeds (default 3)")
    parser.add_argument("--render", action="store_true", help="rewrite the page from its JSON (no run)")
    parser.add_argument("--secure", action="store_true",
                        help="only the SecAgg+ rows (with client DP, other strategies): added to the page's JSON, page rewritten")
    args = parser.parse_args(argv)
    if args.gemma:
        return gemma(DOCS, list(range(args.seeds)))
    if args.render:
        return rerender(DOCS)
    if args.secure:  # the same seeds and rounds as the page's other rows
        data = json.loads((DOCS / "federated_extras.json").read_text())
        began = time.time()
        data["secure"] = accuracy(data["seeds"], data["rounds"], SECURE)
        data["secure_seconds"] = round(time.time() - began)
        (DOCS / "federated_extras.json").write_text(json.dumps(data, indent=1, default=str))
        return rerender(DOCS)
    began = time.time()
    seeds, rounds = ([0, 1], 3) if args.quick else ([0, 1, 2, 3, 4], 10)
    mem = memory([10, 100] if args.quick else [100, 1000])
    acc = accuracy(seeds, rounds)
    sec = secagg_overhead(seeds, rounds)
    runs = personalised(seeds)
    pers = intervals(runs)
    chat = chat_recipe(seeds[:2], 2 if args.quick else 4)
    secure = accuracy(seeds, rounds, SECURE)
    results = checks(acc, mem, sec, pers, chat) + secure_checks(acc, secure)
    target = Path(args.out) if args.quick else DOCS
    target.mkdir(parents=True, exist_ok=True)
    seconds = time.time() - began
    data = dict(machine=machine(), memory=mem, accuracy=acc, secagg=sec, personalised=pers, personalised_runs=runs,
                chat=chat, secure=secure, checks=results, seeds=seeds, rounds=rounds, seconds=round(seconds))
    (target / "federated_extras.json").write_text(json.dumps(data, indent=1, default=str))
    (target / "federated_extras.md").write_text(report(acc, mem, sec, pers, chat, results, args.quick, seconds, rounds,
                                                       seeds, secure))
    print((target / "federated_extras.md").read_text())
    return 0 if all(ok for _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
