"""The page of bench/training_strategies.py: accuracy table, claim rows and speed targets with their thresholds,
and a plot, all computed from the JSON it writes (``python bench/training_strategies_report.py JSON`` redraws it)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from common import ci, ratio_ci

LABELS = {
    "lora": "LoRA r=8 (q,k,v)", "head": "classifier head alone", "lora_dropout": "LoRA r=8 + dropout 0.1", "full": "full fine-tuning",
    "lora_pro": "LoRA-Pro r=8", "allora": "ALLoRA r=8 (s=1, no dropout)", "lora_plus": "LoRA+ r=8 (ratio 16)",
    "lora_fa": "LoRA-FA r=8", "lisa": "LISA (gamma=2 of 6 blocks)",
    "lisa_frozen_embeddings": "LISA, input embeddings frozen (not the paper's rule)", "increlora": "IncreLoRA r=4 -> total 144",
    "lora_qkvo_r4": "LoRA r=4 on q,k,v,o (24 modules)", "diffora": "DiffoRA r=8, 12 of the 24 q,k,v,o modules",
}


def _acc(runs: dict, name: str) -> list[float]:
    return [r["accuracy"] for r in runs[name]]


def _paired(runs: dict, a: str, b: str) -> tuple[float, float]:
    """Mean and 95% half-width of the per-seed difference a - b."""
    return ci([x - y for x, y in zip(_acc(runs, a), _acc(runs, b))])


def _missing(runs: dict, *names: str) -> str:
    """'' when every system ran, else which did not."""
    gone = [LABELS.get(n, n) for n in names if n not in runs]
    return f"not run: {', '.join(gone)}" if gone else ""


def _verdict(met) -> str:
    return "not run" if met is None else "met" if met else "**not met**"


def budget(result: dict) -> list[dict]:
    """Rows that say whether the budget separates anything: LoRA above the majority class and the head alone,
    with a small spread over seeds (thresholds fixed before the run)."""
    runs, rows = result["runs"], []
    mean, half = ci(_acc(runs, "lora"))
    majority = result["majority_share"]
    rows.append(dict(claim="the budget lifts LoRA above the majority class",
                     threshold="lower end of LoRA's 95% CI > majority share + 0.05",
                     measured=f"LoRA {mean:.4f} ± {half:.4f}, majority {majority:.4f}",
                     met=bool(mean - half > majority + 0.05)))
    diff, dhalf = _paired(runs, "lora", "head")
    rows.append(dict(claim="LoRA beats the classifier head trained alone", threshold="paired 95% interval of the "
                     "accuracy difference above 0", measured=f"accuracy difference {diff:+.4f} ± {dhalf:.4f} (paired "
                     "over seeds)", met=bool(diff - dhalf > 0)))
    rows.append(dict(claim="the spread over seeds is small", threshold="LoRA's 95% CI half-width <= 0.03",
                     measured=f"± {half:.4f}", met=bool(half <= 0.03)))
    return rows


def claims(result: dict) -> list[dict]:
    """Each claim: statement, threshold, measured value, met or not."""
    runs, timing = result["runs"], result["timing"]
    mem = {k: v["peak_rss"] for k, v in timing.items()}
    rows = budget(result)
    row = dict(claim="LoRA-Pro narrows the gap between LoRA and full fine-tuning",
               threshold="full > LoRA and (full - LoRA-Pro) <= 0.75 x (full - LoRA)")
    if _missing(runs, "full", "lora", "lora_pro"):
        rows.append({**row, "measured": _missing(runs, "full", "lora", "lora_pro"), "met": None})
    else:
        full, lora, pro = (np.mean(_acc(runs, k)) for k in ("full", "lora", "lora_pro"))
        gap, gap_pro = full - lora, full - pro
        rows.append({**row, "measured": f"full - LoRA {gap:+.4f}, full - LoRA-Pro {gap_pro:+.4f}",
                     "met": bool(gap > 0 and gap_pro <= 0.75 * gap)})
    for claim, a, b, extra in (
        ("ALLoRA beats LoRA with dropout in short training", "allora", "lora_dropout", None),
        ("LISA beats LoRA at similar memory (peak RSS <= 1.5x LoRA's)", "lisa", "lora", "mem"),
        ("IncreLoRA beats fixed-rank LoRA at the same final budget (total rank 144)", "increlora", "lora", None),
        ("DiffoRA's chosen modules beat LoRA on all modules at the same budget", "diffora", "lora_qkvo_r4", None),
    ):
        threshold = "paired 95% interval of the accuracy difference above 0"
        if extra == "mem":
            threshold += ", and peak RSS ratio <= 1.5"
        if _missing(runs, a, b) or (extra == "mem" and a not in mem):
            rows.append(dict(claim=claim, threshold=threshold, measured=_missing(runs, a, b) or "not timed", met=None))
            continue
        diff, half = _paired(runs, a, b)
        met = diff - half > 0  # the paired 95% interval lies above 0
        text = f"accuracy difference {diff:+.4f} ± {half:.4f} (paired over seeds)"
        if extra == "mem":
            ratio = mem[a] / mem[b]
            met, text = met and ratio <= 1.5, text + f"; peak RSS {ratio:.2f}x"
        rows.append(dict(claim=claim, threshold=threshold, measured=text, met=bool(met)))
    return rows


def targets(result: dict) -> list[dict]:
    """The speed/memory targets, as ratios in one run."""
    t = result["timing"]
    med = {k: v["time"]["median"] for k, v in t.items()}
    rows = []
    ck_mem, ck_time = t["lora_ckpt"]["peak_rss"] / t["lora"]["peak_rss"], med["lora_ckpt"] / med["lora"]
    rows.append(dict(claim="gradient checkpointing: peak memory <= 0.5x at <= 1.4x the time (LoRA)",
                     measured=f"peak RSS {ck_mem:.2f}x, time {ck_time:.2f}x", met=bool(ck_mem <= 0.5 and ck_time <= 1.4)))
    for a, b, limit, text in (("lora_pro", "lora", 1.5, "LoRA-Pro step <= 1.5x a LoRA step"),
                              ("lora", "floor", 1.15, "LoRA step <= 1.15x the floor (forward + backward to the inputs)")):
        lo, hi = ratio_ci(t[a]["times"], t[b]["times"])
        r = med[a] / med[b]
        rows.append(dict(claim=text, measured=f"{r:.2f}x (95% CI {lo:.2f}-{hi:.2f}); floor {med['floor']:.1f} ms",
                         met=bool(r <= limit)))
    return rows


def lisa_memory(result: dict) -> list[str]:
    """Where LISA's memory goes, from the timing rows (peak RSS, optimiser state) of LISA with and without
    trainable input embeddings."""
    t = result["timing"]
    if not all(k in t for k in ("lora", "lisa", "lisa_frozen_embeddings")):
        return []
    lora, lisa, frozen = (t[k]["peak_rss"] for k in ("lora", "lisa", "lisa_frozen_embeddings"))
    state, state_frozen = t["lisa"]["state_bytes"], t["lisa_frozen_embeddings"]["state_bytes"]
    return ["", "### Where LISA's memory goes", "",
            f"LISA's peak RSS rise is {lisa / lora:.2f}x LoRA's; its AdamW state {_mib(state)}, of which the word "
            f"embeddings (30,522 x 384 = 11.7M of MiniLM's 22.7M parameters, always trained by the paper's rule) "
            f"hold {_mib(state - state_frozen)}; with them frozen (`embeddings=False`, not the paper's rule) the "
            f"state is {_mib(state_frozen)} and the peak {frozen / lora:.2f}x LoRA's. The state of blocks that stop "
            "training is dropped at each switch (checked by tests/train/test_lisa.py). What remains over LoRA is "
            "inherent to full-weight training of the sampled blocks: their gradients and AdamW moments, and the "
            "optimiser's temporaries of the largest tensor, besides the activations every variant keeps."]


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    names = list(runs)
    means, halves = zip(*(ci(_acc(runs, n)) for n in names))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh(range(len(names)), means, xerr=list(halves), color="#4c72b0")
    ax.set_yticks(range(len(names)), [LABELS.get(n, n) for n in names], fontsize=8)
    ax.set_xlabel("test accuracy (mean, 95% CI over seeds)")
    ax.set_xlim(min(means) - 0.1, max(means) + 0.05)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _speed_cells(t: dict | None, lora_t: float, lora_m: int) -> tuple[str, str, str]:
    """Step time, peak RSS and optimiser state cells of one system ('-' where not measured)."""
    if not t:
        return "-", "-", "-"
    state = _mib(t["state_bytes"]) if t.get("state_bytes") is not None else "-"
    return (f"{t['time']['median']:.0f} ms ({t['time']['median'] / lora_t:.2f}x)",
            f"{_mib(t['peak_rss'])} ({t['peak_rss'] / lora_m:.2f}x)", state)


def _mib(b) -> str:
    return f"{b / 2**20:.1f} MiB"


def write(out: Path, result: dict) -> Path:
    """docs page + plot; returns the page's path."""
    runs, timing, s, m = result["runs"], result["timing"], result["settings"], result["machine"]
    lora_t, lora_m = timing["lora"]["time"]["median"], timing["lora"]["peak_rss"]
    lines = [
        "# Training strategies against LoRA (MiniLM / tweets)", "",
        "Generated by `bench/training_strategies.py` (report: `bench/training_strategies_report.py`).", "",
        f"Command: `{result['command']}`  ", f"Machine: {m['cpu']}, {m['threads']} torch thread(s), load {m['load']}; "
        f"torch {m['torch']}, transformers {m['transformers']}. Training: {sum(len(r) for r in runs.values())} runs, "
        f"{sum(x['wall_s'] for r in runs.values() for x in r) / 60:.0f} min of wall time in all (parallel `--only` "
        "workers on a shared machine; wall times are not comparable between rows).", "",
        f"all-MiniLM-L6-v2 with a new 3-way head on the bundled tweets: {s['max_train']} training and {s['max_eval']} "
        f"test examples (seed 0), {s['max_length']} tokens, batch {s['batch_size']}, **{s['steps']} steps for every "
        f"system**, cosine schedule with 5% warm-up, seeds 0-{s['seeds'] - 1}. Step time: median of interleaved steps "
        f"on one batch of {s['timing_batch']}; peak memory: rise of the peak RSS over the loaded model during 3 steps, "
        "one forked process per system. Ratios are to LoRA in the same run.", "",
        "| system | test accuracy (95% CI) | per seed | trainable params | step time | peak RSS rise | optimiser state |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rs in runs.items():
        mean, half = ci(_acc(runs, name))
        step, memory, state = _speed_cells(timing.get(name), lora_t, lora_m)
        lines.append(f"| {LABELS.get(name, name)} | {mean:.4f} ± {half:.4f} | {', '.join(f'{a:.3f}' for a in _acc(runs, name))} "
                     f"| {rs[0]['trainable']:,} | {step} | {memory} | {state} |")
    for name in s["specs"]:
        if name not in runs:  # not trained in time; its step time and memory if they were measured
            step, memory, state = _speed_cells(timing.get(name), lora_t, lora_m)
            lines.append(f"| {LABELS.get(name, name)} | not run (machine time ran out) | - | - | {step} | {memory} | {state} |")
    for key, label in (("lora_ckpt", "LoRA + gradient checkpointing (full)"), ("floor", "floor: forward + backward to the inputs")):
        t = timing[key]
        lines.append(f"| {label} | - | - | - | {t['time']['median']:.0f} ms ({t['time']['median'] / lora_t:.2f}x) "
                     f"| {_mib(t['peak_rss'])} ({t['peak_rss'] / lora_m:.2f}x) | - |")
    lines += ["", "## Claims (each with a threshold that can fail)", "", "| claim | threshold | measured | result |",
              "|---|---|---|---|"]
    lines += [f"| {c['claim']} | {c['threshold']} | {c['measured']} | {_verdict(c['met'])} |"
              for c in claims(result)]
    lines += ["", f"The most frequent class is {result['majority_share']:.3f} of the test examples. The first three "
              "rows check that the budget separates systems at all; the claim rows after them mean little where "
              "those are not met."]
    lines += lisa_memory(result)
    lines += ["", "## Speed and memory targets (ratios in one run)", "", "| target | measured | result |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {c['measured']} | {'met' if c['met'] else '**not met**'} |" for c in targets(result)]
    lines += ["", "## Settings", "", "| system | settings |", "|---|---|"]
    cell = lambda v: ", ".join(f"{kk}={vv}" for kk, vv in v.items()).replace("|", "\\|")  # noqa: E731
    lines += [f"| {LABELS.get(k, k)} | {cell(v)} |" for k, v in s["specs"].items()]
    lines += ["", "LoRA-Pro's optimiser state is two fp32 moments of every adapted weight's full shape (out x in) plus "
              "AdamW moments of the head: the same order as full fine-tuning's AdamW state on those layers, as the paper "
              "states. The 'optimiser state' column measures it after the timed steps.", "",
              f"![accuracy]({plot(result, out / 'training-strategies.png').name})", ""]
    page = out / "training-strategies.md"
    page.parent.mkdir(parents=True, exist_ok=True)
    tmp = page.with_name(".training-strategies.md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(page)
    return page


if __name__ == "__main__":
    source = Path(sys.argv[1])
    print(write(source.parent, json.loads(source.read_text())))
