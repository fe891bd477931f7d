"""The papers' headline claims that can be checked at this scale, each judged from the benchmark's own runs.

A claim whose method or initialiser is not registered on this checkout gets the row "not measured: ... not
available", written from the registries at run time. "Matches" means a mean test accuracy no more than
``tol`` below the other's, with tol = max(1 point, sqrt(sd_a² + sd_b²)) over the seeds; "beats" means more
than ``tol`` above.
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
from common import read_json, write_json

TOL_FLOOR = 0.01
SWITCH = dict(dim=4096, r=32, repeats=15, minilm_r=8)


def summarize(entry: dict) -> dict | None:
    """Mean and sample standard deviation of a row's test accuracy over its seeds, with its parameter counts."""
    runs = (entry or {}).get("runs") or []
    if not runs:
        return None
    acc = [r["test"]["accuracy"] for r in runs]
    return dict(mean=float(np.mean(acc)), std=float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0, n=len(acc),
                trainable=runs[0]["trainable"], adapter=runs[0]["adapter"])


def tol(a: dict, b: dict) -> float:
    """How far apart two mean accuracies may be and still count as equal."""
    return max(TOL_FLOOR, math.hypot(a["std"], b["std"]))


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


def _curve(entry: dict) -> tuple[np.ndarray, np.ndarray] | None:
    runs = [r["history"] for r in (entry or {}).get("runs", []) if r.get("history")]
    if not runs:
        return None
    n = min(len(h) for h in runs)
    steps = np.array([s for s, _ in runs[0][:n]])
    return steps, np.mean([[loss for _, loss in h[:n]] for h in runs], axis=0)


def _lora_ga(task: dict) -> tuple[str, str]:
    ga, lora = _curve(task["rows"].get("lora_ga")), _curve(task["rows"].get("lora"))
    if ga is None or lora is None:
        return "not run in this configuration", "—"
    (steps, g), (_, l_) = ga, lora
    level = l_[-1]
    reached = np.nonzero(g <= level)[0]
    own = int(steps[np.nonzero(l_ <= level)[0][0]])
    quarter = max(1, len(steps) // 4)
    early = f"mean loss over the first {int(steps[quarter - 1])} steps {g[:quarter].mean():.3f} vs LoRA {l_[:quarter].mean():.3f}"
    if not len(reached):
        return f"never reached LoRA's final loss {level:.3f}; {early}", "no"
    speedup = own / int(steps[reached[0]])
    text = f"LoRA's final loss {level:.3f} reached at step {int(steps[reached[0]])} vs {own} ({speedup:.1f}x); {early}"
    return text, "yes" if speedup >= 2 else "partly (faster, < 2x)" if speedup > 1 else "no"


def _dylora(task: dict) -> tuple[str, str]:
    runs = task["rows"].get("dylora", {}).get("runs") or []
    if not runs or not runs[0].get("rank_sweep"):
        return "not run in this configuration", "—"
    parts, ok = [], []
    for b in runs[0]["rank_sweep"]:
        dy = [r["rank_sweep"][b]["accuracy"] for r in runs]
        dyn = dict(mean=float(np.mean(dy)), std=float(np.std(dy, ddof=1)) if len(dy) > 1 else 0.0)
        sep = summarize(task["rows"].get("lora" if int(b) == max(int(k) for k in runs[0]["rank_sweep"]) else f"lora_r{b}"))
        if sep is None:
            continue
        parts.append(f"r={b}: {_acc(dyn)} vs {_acc(sep)}")
        ok.append(dyn["mean"] >= sep["mean"] - tol(dyn, sep))
    if not parts:
        return "separately trained LoRA ranks not run", "—"
    verdict = "yes" if all(ok) else "partly" if sum(ok) * 2 >= len(ok) else "no"
    return "DyLoRA at rank vs LoRA trained at that rank: " + "; ".join(parts), verdict


def _versus_lora(name: str, beats: bool):
    def judge(task: dict) -> tuple[str, str]:
        x, lora = summarize(task["rows"].get(name)), summarize(task["rows"].get("lora"))
        if x is None or lora is None:
            return "not run in this configuration", "—"
        fewer = lora["adapter"] / max(1, x["adapter"])
        text = f"{_acc(x)} vs LoRA {_acc(lora)}, {fewer:.0f}x fewer adapter parameters ({x['adapter']:,} vs {lora['adapter']:,})"
        t = tol(x, lora)
        if x["mean"] > lora["mean"] + t:
            return text, "yes"
        if x["mean"] >= lora["mean"] - t:
            return text, "partly (matches, does not beat)" if beats else "yes"
        return text, "no"
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
    x, lora, r1 = summarize(task["rows"].get("nola")), summarize(task["rows"].get("lora")), task.get("lora_r1")
    if x is None or lora is None or not r1:
        return "not run in this configuration", "—"
    smaller = x["adapter"] < r1["adapter"]
    same = x["mean"] >= lora["mean"] - tol(x, lora)
    text = (f"{x['adapter']:,} adapter parameters vs rank-1 LoRA's {r1['adapter']:,}; accuracy {_acc(x)} vs "
            f"LoRA (r=8) {_acc(lora)}")
    return text, "yes" if smaller and same else "partly" if smaller or same else "no"


def _randlora(task: dict) -> tuple[str, str]:
    x, lora, full = (summarize(task["rows"].get(k)) for k in ("randlora", "lora", "full"))
    if x is None or lora is None or full is None:
        return "not run in this configuration", "—"
    text = (f"{_acc(x)} with {x['adapter']:,} adapter parameters; LoRA {_acc(lora)} with {lora['adapter']:,}; "
            f"full fine-tuning {_acc(full)}")
    if full["mean"] <= lora["mean"] + tol(full, lora):
        return text + ": full fine-tuning is not ahead of LoRA here, so there is no gap to close", "not checkable"
    closed = (x["mean"] - lora["mean"]) / (full["mean"] - lora["mean"])
    text += f": closes {100 * closed:.0f}% of the LoRA-to-full gap"
    return text, "yes" if x["mean"] > lora["mean"] + tol(x, lora) else "partly" if closed > 0 else "no"


CLAIMS = [  # (paper, its claim, what must be registered, judge(task) or judge(extra) for task-free claims)
    ("LoRA-GA (arXiv:2407.05000)", "converges 2-4x faster than LoRA at the same lr", ["lora_ga"], _lora_ga),
    ("DyLoRA (arXiv:2210.07558)", "one training serves every rank 1..r about as well as LoRA trained at that rank",
     ["dylora"], _dylora),
    ("LoRA-SB (arXiv:2411.19557)", "beats LoRA with 27-90x fewer trainable parameters", ["lora_sb"],
     _versus_lora("lora_sb", beats=True)),
    ("LoRA-XS (arXiv:2405.17604)", "competitive with LoRA at far fewer parameters", ["lora_xs"],
     _versus_lora("lora_xs", beats=False)),
    ("SHiRA (arXiv:2406.13175)", "fused adapter switching on CPU up to 10x faster than fusing a LoRA (checked: >= 5x)",
     ["shira"], None),
    ("NOLA (arXiv:2310.02556)", "fewer parameters than rank-1 LoRA without accuracy loss", ["nola"], _nola),
    ("RandLoRA (arXiv:2502.00987)", "full-rank updates close the gap between LoRA and full fine-tuning at a "
     "similar parameter count", ["randlora"], _randlora),
]


def table(results: dict, skipped: dict, extra: dict) -> list[dict]:
    """One entry per claim and task (one per claim for task-free ones): what we measured, and the verdict."""
    out = []
    for paper, claim, needs, judge in CLAIMS:
        missing = _missing(needs, skipped)
        if missing:
            out.append(dict(paper=paper, claim=claim, task="—", measured=missing, verdict="—"))
        elif judge is None:
            measured, verdict = _shira_switch(extra)
            out.append(dict(paper=paper, claim=claim, task="CPU", measured=measured, verdict=verdict))
        else:
            for name, task in results.items():
                measured, verdict = judge(task)
                out.append(dict(paper=paper, claim=claim, task=name, measured=measured, verdict=verdict))
    return out
