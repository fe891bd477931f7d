"""Statistics, profiles and the written report (markdown, PNG, JSON) of bench/train_step.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TITLES = {"minilm": "all-MiniLM-L6-v2, sequence classification (3 labels)",
          "llama": "tiny Llama built from a config, causal-LM loss"}
TARGETS = {"minilm": "attention query, key, value and output dense", "llama": "q_proj, k_proj, v_proj, o_proj"}


def profile(steps: dict, label: str, n: int = 3) -> str:
    """torch.profiler table (self CPU time) of ``n`` steps per system, printed and returned."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    text = []
    for system, step in steps.items():
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(n):
                step()
        events = prof.key_averages()
        calls = sum(e.count for e in events if e.key.startswith("aten::")) // n
        table = events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40)
        text.append(f"{label} {system}: {calls} aten calls per step\n{table}")
    print("\n".join(text), flush=True)
    return "\n".join(text)


def verdict(row: dict) -> str:
    """Whether the issue's target (lorakit/peft at most 1.0 for time and for peak memory) holds for a case."""
    misses = [name for name, key in (("time", "time_ratio"), ("memory", "mem_ratio")) if row[key] > 1.0]
    return "yes" if not misses else "no (" + ", ".join(misses) + ")"


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def _name(method: str) -> str:
    return {"lora": "LoRA", "dora": "DoRA"}[method]


def _tables(rows: list[dict]) -> list[str]:
    out = ["| method | trainable params | lorakit ms, median (p10-p90) | peft ms, median (p10-p90) "
           "| time ratio (95% CI) | CPU-time ratio (95% CI) | memory ratio | target met |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        a, b = r["stats"]["lorakit"]["wall"], r["stats"]["peft"]["wall"]
        out.append(f"| {_name(r['method'])} | {r['trainable']:,} | {a['median']:.1f} ({a['p10']:.1f}-{a['p90']:.1f}) "
                   f"| {b['median']:.1f} ({b['p10']:.1f}-{b['p90']:.1f}) | {r['time_ratio']:.3f} "
                   f"({r['time_ci'][0]:.3f}-{r['time_ci'][1]:.3f}) | {r['cpu_ratio']:.3f} "
                   f"({r['cpu_ci'][0]:.3f}-{r['cpu_ci'][1]:.3f}) | {r['mem_ratio']:.3f} | {verdict(r)} |")
    out += ["", "Memory in MiB (peak RSS rise: median, with min-max over the probes):", "",
            "| method | lorakit peak RSS rise | peft peak RSS rise | ratio | lorakit live peak | peft live peak | ratio "
            "| lorakit autograd-saved | peft autograd-saved |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m = r["mem"]
        spread = {s: f"{_mib(m[s]['rss'])} ({_mib(min(m[s]['rss_runs']))}-{_mib(max(m[s]['rss_runs']))})" for s in m}
        live = f"{r['live_ratio']:.3f}" if r["live_ratio"] is not None else "-"
        out.append(f"| {_name(r['method'])} | {spread['lorakit']} | {spread['peft']} | {r['mem_ratio']:.3f} "
                   f"| {_mib(m['lorakit']['live'])} | {_mib(m['peft']['live'])} | {live} "
                   f"| {_mib(r['saved']['lorakit'])} | {_mib(r['saved']['peft'])} |")
    out += ["", "Loss before / after the check step (eval mode, same weights): " + "; ".join(
        f"{_name(r['method'])}: lorakit {r['losses']['lorakit'][0]:.6f} / {r['losses']['lorakit'][1]:.6f}, "
        f"peft {r['losses']['peft'][0]:.6f} / {r['losses']['peft'][1]:.6f}" for r in rows) + "."]
    return out


def plot(path: Path, results: list[dict]) -> None:
    """Step-time distributions (wall clock, then process CPU time) per case and system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(3.2 * len(results), 6.4), squeeze=False)
    rng = np.random.default_rng(0)
    for row, clock in enumerate(("wall", "cpu")):
        for ax, r in zip(axes[row], results):
            data = [np.asarray(r["times"][s][clock]) * 1e3 for s in ("lorakit", "peft")]
            ax.boxplot(data, showfliers=False)
            ax.set_xticks([1, 2], ["lorakit", "peft"])
            for i, d in enumerate(data, 1):
                ax.plot(i + rng.uniform(-0.12, 0.12, len(d)), d, ".", alpha=0.5, ms=4)
            ratio = r["time_ratio"] if clock == "wall" else r["cpu_ratio"]
            ax.set_title(f"{r['model']} {_name(r['method'])}: ratio {ratio:.2f}", fontsize=9)
            ax.set_ylabel("wall-clock ms per step" if clock == "wall" else "CPU ms per step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _live_note(results: list[dict]) -> str:
    if any(r.get("live_ratio") is None for r in results):
        return ""
    worst = max(results, key=lambda r: r["live_ratio"])
    return (f" Live peak memory (fixed mmap threshold, see below): largest ratio {worst['live_ratio']:.3f} "
            f"({worst['model']} {_name(worst['method'])}).")


def write(out: Path, results: list[dict], info: dict, command: str, settings: dict) -> None:
    """training.md, training.png and training.json in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    plot(out / "training.png", results)
    (out / "training.json").write_text(json.dumps(dict(machine=info, command=command, settings=settings,
                                                       results=results), indent=1, default=str))
    met = [f"{r['model']} {_name(r['method'])}" for r in results if verdict(r) == "yes"]
    missed = [f"{r['model']} {_name(r['method'])} ({verdict(r)[4:-1]})" for r in results if verdict(r) != "yes"]
    shrunk = f" Batches divided by {settings['shrink']} (smoke run)." if settings["shrink"] > 1 else ""
    lines = [
        "# Training step: lorakit against peft",
        "",
        "One training step (forward + backward + AdamW step + zero_grad) of lorakit's LoRA and DoRA against peft's "
        "LoRA and `use_dora=True`, on the same model, batch and config (r=8, lora_alpha=16, no dropout). Before "
        "timing, lorakit's adapter (B drawn non-zero) is copied into peft through the PEFT file format; the run stops "
        "unless both hold the same number of trainable parameters and give the same loss before and after one "
        "AdamW step. The systems then alternate step by step in one process, swapping which goes first every round "
        "(lorakit, peft, peft, lorakit, ...): timed against an identical copy of itself, a system ran the first step "
        "of a pair about 0.7% slower, a bias that plain alternation would hand to one side." + shrunk,
        "",
        "**Target (from the issue): ratio lorakit/peft at most 1.0 for both time and memory.** "
        + (f"Met for: {', '.join(met)}. " if met else "")
        + (f"Not met for: {', '.join(missed)}." if missed else "Met for every case.")
        + _live_note(results),
        "",
        "## Machine",
        "",
        "| CPU | cores | torch threads | OMP_NUM_THREADS | torch | transformers | peft | python | load average at start |",
        "|---|---:|---:|---|---|---|---|---|---|",
        f"| {info['cpu']} | {info['cores']} | {info['threads']} | {info['omp']} | {info['torch']} | "
        f"{info['transformers']} | {info['peft']} | {info['python']} | {info['load']} |",
        "",
        "## Reproduce",
        "",
        "```",
        command,
        "```",
        "",
        f"{settings['steps']} timed steps per system after {settings['warmup']} warm-up steps each. Step time: "
        "wall clock, median with p10-p90; the time ratio is median(lorakit) / median(peft), with a bootstrap 95% "
        "interval, and the target is judged on it. The CPU-time ratio does the same with the process's CPU time, "
        "which other work on the machine disturbs far less.",
        "",
        "Memory, three measures. *Peak RSS rise* (the one the target is judged on): how far the peak resident set "
        "size (Linux VmHWM, reset once the base model is loaded) rises while the adapter is added and "
        f"{settings['probe_steps']} steps run, in a forked process per system and probe, glibc's allocator as it "
        f"comes; median of {settings['repeats']} probe(s). glibc raises its mmap threshold as blocks are freed, so "
        "this figure depends on the order of allocations and moves between identical runs. *Live peak*: the same "
        "with the mmap threshold fixed at 64 KiB, so freed tensors go back to the system and the peak follows live "
        "memory; it repeats to within a few hundred KiB. *Autograd-saved*: bytes of the non-parameter tensors "
        "autograd holds for backward after one forward, counted exactly. The rises include adapter weights, the "
        "trainable classifier copy (MiniLM), gradients, AdamW state and activations.",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == model]
        b, t = rows[0]["batch"]
        lines += [f"## {TITLES[model]}, batch {b} x {t} tokens", "",
                  f"{rows[0]['base_params']:,} base parameters; adapters on {TARGETS[model]}.", ""]
        lines += _tables(rows) + [""]
    lines += ["## Step-time distributions", "", "Top row wall clock, bottom row process CPU time.", "",
              "![step times](training.png)", ""]
    profiles = [r["profile"] for r in results if r.get("profile")]
    if profiles:
        lines += ["## Profile (self CPU time, 3 steps per system)", "", "```", *profiles, "```", ""]
    lines += ["Timings on a machine whose cores other work shares are noisy; the load average above says how busy "
              "it was. Rerun the command on a quiet machine before drawing fine conclusions.", ""]
    (out / "training.md").write_text("\n".join(lines))


if __name__ == "__main__":  # re-render a report from its JSON: python bench/training_report.py <dir>/training.json
    import sys

    data = json.loads(Path(sys.argv[1]).read_text())
    write(Path(sys.argv[1]).parent, data["results"], data["machine"], data["command"], data["settings"])
