"""The papers' headline claims that can be checked at this scale, each judged from the benchmark's own runs.

Every verdict uses a threshold fixed before the runs and stated in its row. Accuracy claims compare a row with
its baseline seed by seed (the same seed draws the same head and data order for both), and judge the mean of
the paired differences by its one-sided 95% bounds (Student's t over the seeds):
- "beats": the lower bound is above 0 ("yes"); the upper bound below 0 is "no"; anything else is inconclusive;
- "matches" (no loss): the lower bound is above -MARGIN, 1 point ("yes"); the upper bound below -MARGIN is "no".
A claim whose method or initialiser is not registered on this checkout, or whose rows have not run, says so.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import lorakit
from lorakit import INITIALIZERS, METHODS
from common import MARGIN, THRESHOLD, bounds, decide, read_json, write_json

SPEEDUP = 2.0  # LoRA-GA's low end of "2-4x"
SWITCH = dict(dim=4096, r=32, repeats=15, minilm_r=8)


def summarize(entry: dict) -> dict | None:
    """Mean and sample standard deviation of a row's test accuracy over its seeds, with its parameter counts."""
    runs = (entry or {}).get("runs") or []
    if not runs:
        return None
    acc = [r["test"]["accuracy"] for r in runs]
    return dict(mean=float(np.mean(acc)), std=float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0, n=len(acc),
                trainable=runs[0]["trainable"], adapter=runs[0]["adapter"])


def paired(x: dict, y: dict) -> list[float]:
    """Per-seed differences of test accuracy x - y over the seeds both entries ran."""
    ax = {r["seed"]: r["test"]["accuracy"] for r in (x or {}).get("runs", [])}
    ay = {r["seed"]: r["test"]["accuracy"] for r in (y or {}).get("runs", [])}
    return [ax[s] - ay[s] for s in sorted(ax) if s in ay]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _acc(s: dict) -> str:
    return f"{_pct(s['mean'])} ± {_pct(s['std'])}"


# -- measurements that are not training runs -------------------------------------------------------------
def _randomised_state(make_model, config) -> lorakit.AdapterState:
    model = lorakit.apply(make_model(), config)
    with torch.no_grad():
        for p in lorakit.trainable_parameters(model).values():
            p.normal_(std=0.02)
    return lorakit.AdapterState.from_model(model)


def switch_times(make_model, targets, r: int, repeats: int) -> dict | None:
    """Median ms to put a SHiRA adapter into plain weights (its own switch_in) against fusing a LoRA of the same
    rank (W += ΔW from lorakit's delta), alternating; the weights are restored, untimed, after each."""
    shira = METHODS.get("shira").adapter_classes[0]
    module = __import__(shira.__module__, fromlist=["switch_in"])
    switch_in, switch_out = getattr(module, "switch_in", None), getattr(module, "switch_out", None)
    if switch_in is None or switch_out is None:
        return None
    states = {"shira": _randomised_state(make_model, shira.config_class(r=r, target_modules=targets)),
              "lora": _randomised_state(make_model, lorakit.LoRAConfig(r=r, lora_alpha=2 * r, target_modules=targets))}
    plain = make_model()
    weights = {p: plain.get_submodule(p).weight for p in states["lora"].tensors}
    originals = {p: w.detach().clone() for p, w in weights.items()}
    times = {"shira": [], "lora": []}
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            saved = switch_in(plain, states["shira"])
            times["shira"].append(time.perf_counter() - t0)
            switch_out(plain, saved)
            t0 = time.perf_counter()
            for p, w in weights.items():
                w.add_(states["lora"].delta(p, w))
            times["lora"].append(time.perf_counter() - t0)
            for p, w in weights.items():
                w.copy_(originals[p])
    ms = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    return {"ms": ms, "speedup": ms["lora"] / ms["shira"], "layers": len(weights), "r": r}


def measure(cache: Path, report_only: bool) -> dict:
    """The claim measurements that need no training (cached under ``cache``/claims)."""
    path = cache / "claims" / "shira_switch.json"
    data = read_json(path)
    if (data is None or data.get("spec") != SWITCH) and not report_only and "shira" in METHODS:
        from lorakit import zoo

        print("claims/shira_switch ...", flush=True)
        big = switch_times(lambda: nn.Sequential(nn.Linear(SWITCH["dim"], SWITCH["dim"], bias=False)), ["0"],
                           SWITCH["r"], SWITCH["repeats"])
        small = switch_times(lambda: zoo.load("minilm", task="base")[0], ["query", "key", "value"],
                             SWITCH["minilm_r"], SWITCH["repeats"])
        data = {"spec": SWITCH, "square": big, "minilm": small}
        write_json(path, data)
    return {"shira_switch": data} if data else {}


# -- the table -------------------------------------------------------------------------------------------
def _missing(needs: list[str], skipped: dict) -> str:
    for name in needs:
        if name not in METHODS and name not in INITIALIZERS:
            return f"not measured: {name} not available (registered here: {', '.join(METHODS.names())}; " \
                   f"initialisers: {', '.join(INITIALIZERS.names()) or 'none'})"
        if name in skipped:
            return f"not measured: {name} skipped ({skipped[name]})"
    return ""


WINDOW = 5  # logged losses (every log_every steps) averaged into the running loss of a training curve


def running(history: list) -> tuple[np.ndarray, np.ndarray]:
    """(steps, running mean of WINDOW consecutive losses) of a [[step, loss], ...] history."""
    steps = np.array([s for s, _ in history])
    loss = np.convolve([x for _, x in history], np.ones(WINDOW) / WINDOW, mode="valid")
    return steps[WINDOW - 1:], loss


def speedup(baseline: list, other: list) -> float:
    """Steps the baseline's run needs to reach its own final running loss (the level, fixed before either run),
    over the steps ``other`` needs to reach it; an ``other`` that never does counts as 4x slower."""
    (steps, b), (other_steps, o) = running(baseline), running(other)
    level = b[-1]
    reached = np.nonzero(o <= level)[0]
    at = other_steps[reached[0]] if len(reached) else 4 * other_steps[-1]
    return float(steps[np.nonzero(b <= level)[0][0]] / at)


def judge_speedup(speedups: list[float], threshold: float) -> tuple[str, str]:
    """(the per-seed speed-ups and their bounds in words, the verdict against ``threshold``x)."""
    text = f"per seed: {', '.join(f'{x:.1f}x' for x in speedups)}"
    if len(speedups) < 2:
        return text + " (too few seeds to judge)", "not judged"
    logs = [math.log(x) for x in speedups]
    low, high = (math.exp(b) for b in bounds(logs))
    text += f"; geometric mean {math.exp(np.mean(logs)):.2f}x, one-sided 95% bounds [{low:.2f}x, {high:.2f}x]"
    return text, "yes" if low >= threshold else "no" if high < threshold else "inconclusive"


def _lora_ga(task: dict) -> tuple[str, str]:
    ga = {r["seed"]: r["history"] for r in task["rows"].get("lora_ga", {}).get("runs", []) if r.get("history")}
    lora = {r["seed"]: r["history"] for r in task["rows"].get("lora", {}).get("runs", []) if r.get("history")}
    seeds = sorted(set(ga) & set(lora))
    if not seeds:
        return "not run in this configuration", "—"
    text, verdict = judge_speedup([speedup(lora[s], ga[s]) for s in seeds], SPEEDUP)
    return "steps to LoRA's final running loss, LoRA / LoRA-GA, " + text, verdict


def _dylora(task: dict) -> tuple[str, str]:
    dy = task["rows"].get("dylora", {})
    runs = dy.get("runs") or []
    if not runs or not runs[0].get("rank_sweep"):
        return "not run in this configuration", "—"
    parts, verdicts = [], []
    top = max(int(k) for k in runs[0]["rank_sweep"])
    for b in runs[0]["rank_sweep"]:
        sep = task["rows"].get("lora" if int(b) == top else f"lora_r{b}")
        truncated = {"runs": [{"seed": r["seed"], "test": r["rank_sweep"][b]} for r in runs]}
        diffs = paired(truncated, sep)
        if not diffs:
            parts.append(f"r={b}: LoRA at r={b} not run")
            continue
        text, verdict = decide(diffs, "matches")
        parts.append(f"r={b}: {text}")
        verdicts.append(verdict)
    if not verdicts:
        return "separately trained LoRA ranks not run", "—"
    if "no" in verdicts:
        verdict = "no"
    elif len(verdicts) == len(parts) and set(verdicts) == {"yes"}:
        verdict = "yes"
    else:
        verdict = "not judged" if set(verdicts) == {"not judged"} else "inconclusive"
    return "DyLoRA truncated to r minus LoRA trained at r: " + "; ".join(parts), verdict


def _versus(name: str, baseline: str, kind: str):
    def judge(task: dict) -> tuple[str, str]:
        x, base = summarize(task["rows"].get(name)), summarize(task["rows"].get(baseline))
        if x is None or base is None:
            return "not run in this configuration", "—"
        text, verdict = decide(paired(task["rows"][name], task["rows"][baseline]), kind)
        return (f"{_acc(x)} vs {baseline} {_acc(base)} ({x['adapter']:,} vs {base['adapter']:,} adapter parameters); "
                f"{text}"), verdict
    return judge


def _shira_switch(extra: dict) -> tuple[str, str]:
    data = extra.get("shira_switch")
    if not data or not data.get("square"):
        return "not run in this configuration", "—"
    sq, mini = data["square"], data["minilm"]
    text = (f"{SWITCH['dim']}x{SWITCH['dim']}, r={sq['r']}: switch_in {sq['ms']['shira']:.2f} ms vs LoRA fuse "
            f"{sq['ms']['lora']:.2f} ms ({sq['speedup']:.1f}x)")
    if mini:
        text += (f"; MiniLM's {mini['layers']} q/k/v layers, r={mini['r']}: {mini['ms']['shira']:.2f} vs "
                 f"{mini['ms']['lora']:.2f} ms ({mini['speedup']:.1f}x)")
    return text, "yes" if sq["speedup"] >= 5 else "no"


def _nola(task: dict) -> tuple[str, str]:
    x, r1 = summarize(task["rows"].get("nola")), task.get("lora_r1")
    if x is None or not r1:
        return "not run in this configuration", "—"
    text, verdict = _versus("nola", "lora", "matches")(task)
    smaller = x["adapter"] < r1["adapter"]
    text = f"{x['adapter']:,} adapter parameters vs rank-1 LoRA's {r1['adapter']:,}; " + text
    return text, verdict if smaller else "no"


def _randlora(task: dict) -> tuple[str, str]:
    rows = task["rows"]
    if any(summarize(rows.get(k)) is None for k in ("randlora", "lora", "full")):
        return "not run in this configuration", "—"
    gap_text, gap = decide(paired(rows["full"], rows["lora"]), "beats")
    text, verdict = decide(paired(rows["randlora"], rows["lora"]), "beats")
    text = f"full fine-tuning minus LoRA: {gap_text}; RandLoRA minus LoRA: {text}"
    if gap != "yes":
        return text + ": full fine-tuning is not reliably ahead of LoRA here, so there is no gap to close", "not checkable"
    return text, verdict


_GA_THRESHOLD = f"lower 95% bound of the geometric-mean speed-up >= {SPEEDUP:g}x (no: upper bound < {SPEEDUP:g}x)"
CLAIMS = [  # (paper, its claim, what must be registered, the threshold, judge(task) or None for the task-free one)
    ("LoRA (arXiv:2106.09685)", "adapting the encoder beats training the head alone (the budget's floor)", ["lora"],
     THRESHOLD["beats"], _versus("lora", "head", "beats")),
    ("LoRA-GA (arXiv:2407.05000)", "converges 2-4x faster than LoRA at the same lr", ["lora_ga"], _GA_THRESHOLD,
     _lora_ga),
    ("LoRA-GA (arXiv:2407.05000)", "comparable or better accuracy than LoRA", ["lora_ga"], THRESHOLD["matches"],
     _versus("lora_ga", "lora", "matches")),
    ("DyLoRA (arXiv:2210.07558)", "one training serves every rank 1..r without significant loss against LoRA "
     "trained at that rank", ["dylora"], THRESHOLD["matches"] + " at every rank", _dylora),
    ("EVA (arXiv:2410.07170)", "the data-driven init gives the highest score (here: beats LoRA's random init)",
     ["eva"], THRESHOLD["beats"], _versus("eva", "lora", "beats")),
    ("FlyLoRA (arXiv:2510.08396)", "better single-task accuracy than LoRA with fewer trainable parameters",
     ["flylora"], THRESHOLD["beats"], _versus("flylora", "lora", "beats")),
    ("LoRA-SB (arXiv:2411.19557)", "beats LoRA with 27-90x fewer trainable parameters", ["lora_sb"],
     THRESHOLD["beats"], _versus("lora_sb", "lora", "beats")),
    ("LoRA-XS (arXiv:2405.17604)", "competitive with LoRA at far fewer parameters", ["lora_xs"],
     THRESHOLD["matches"], _versus("lora_xs", "lora", "matches")),
    ("SHiRA (arXiv:2406.13175)", "fused adapter switching on CPU up to 10x faster than fusing a LoRA", ["shira"],
     "median speed-up >= 5x", None),
    ("NOLA (arXiv:2310.02556)", "fewer parameters than rank-1 LoRA without accuracy loss (against LoRA r = 8)",
     ["nola"], "fewer adapter parameters than rank-1 LoRA, and " + THRESHOLD["matches"], _nola),
    ("RandLoRA (arXiv:2502.00987)", "full-rank updates close the gap between LoRA and full fine-tuning at a "
     "similar parameter count", ["randlora"], "full fine-tuning beats LoRA, then RandLoRA beats LoRA: "
     + THRESHOLD["beats"] + " for each", _randlora),
]


def table(results: dict, skipped: dict, extra: dict) -> list[dict]:
    """One entry per claim and task (one per claim for task-free ones): what we measured, and the verdict."""
    out = []
    for paper, claim, needs, threshold, judge in CLAIMS:
        row = dict(paper=paper, claim=claim, threshold=threshold)
        missing = _missing(needs, skipped)
        if missing:
            out.append(dict(row, task="—", measured=missing, verdict="—"))
        elif judge is None:
            measured, verdict = _shira_switch(extra)
            out.append(dict(row, task="CPU", measured=measured, verdict=verdict))
        else:
            for name, task in results.items():
                measured, verdict = judge(task)
                out.append(dict(row, task=name, measured=measured, verdict=verdict))
    return out
