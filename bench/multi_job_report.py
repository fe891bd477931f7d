"""The written report (markdown) of bench/multi_job.py, from its JSON."""
from __future__ import annotations

TARGET = 1.3  # the throughput target: multi-job tokens/s at least 1.3x sequential on this CPU
LABELS = {"sequential": "sequential (lorakit fit, one job after another)",
          "multi": "lorakit multi-job (per-job segment kernel)",
          "multi_serve_op": "lorakit multi-job (serving operator + backward)",
          "multi_unfused": "lorakit multi-job (unfused add)", "peft": "PEFT multi-adapter, mixed batches"}


def _mib(b: float) -> str:
    return f"{b / 2**20:.0f}"


def render(data: dict) -> str:
    """Markdown: throughput, ratios, peak memory and equality per job count, then the claim row."""
    m = data["machine"]
    lines = [
        "# Multi-job LoRA training",
        "",
        "Several LoRA jobs trained at once on one frozen base (`lorakit train-many`, `lorakit.train.multi`), against "
        "the same jobs trained one after another with `lorakit.train.fit` and against PEFT's multi-adapter model "
        "with mixed batches (`adapter_names`). Workload: all-MiniLM-L6-v2 sequence classification on the bundled "
        "tweets task, LoRA on " + ", ".join(data["targets"]) + " plus one classification head per job; jobs differ in "
        "rank (4/8/16), lr, batch size (8/16), seed and data (64 examples each). Padded tokens per shared "
        f"micro-batch: {data['max_tokens']}.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, **{m['threads']} torch thread (OMP_NUM_THREADS={m['omp']}, the same "
        f"for every system, for fairness)**; torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}; "
        f"load average at the end {m['load']} (the machine is shared: absolute times move, the systems alternate "
        "run by run so the ratios are taken under the same load).",
        "",
        f"Command: `{data['command']}`",
        "",
        "Time: median of the runs, from the loaded base to every adapter trained (setup included), as wall-clock "
        "time and as this process's CPU time (less moved by other processes on the shared cores). Tokens: real "
        "(unpadded) training tokens. Peak: rise of the peak RSS over the loaded base in a forked process. "
        "max |diff|: the largest difference of any trained tensor of any job from the sequential run.",
        "",
        "| jobs | system | wall s (median) | wall runs (s) | tokens/s | × seq | CPU s (median) | tokens/CPU-s | × seq (CPU) "
        "| peak MiB | peak × seq | max abs diff |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in data["rows"]:
        for s in row["median_s"]:
            runs = ", ".join(f"{t:.1f}" for t in row["seconds"][s])
            diff = row["max_abs_diff_vs_sequential"].get(s)
            lines.append(
                f"| {row['jobs']} | {LABELS[s]} | {row['median_s'][s]:.2f} | {runs} | {row['tokens_per_s'][s]:.0f} | "
                f"{row['speedup_vs_sequential'][s]:.2f} | {row['median_cpu_s'][s]:.2f} | "
                f"{row['tokens_per_cpu_s'][s]:.0f} | {row['cpu_speedup_vs_sequential'][s]:.2f} | "
                f"{_mib(row['peak_rss_rise_bytes'][s])} | {row['peak_ratio_vs_sequential'][s]:.2f} | "
                f"{'-' if diff is None else f'{diff:.1e}'} |")
    if all("padded_tokens" in r for r in data["rows"]):
        lines += ["", "Tokens through the base, padding included (each job's own batches vs the shared micro-batches "
                  "as `multi_pack.pack` cuts them):", "", "| jobs | real tokens | sequential (padded) | shared (padded) "
                  "| sequential / shared |", "|---:|---:|---:|---:|---:|"]
        for r in data["rows"]:
            p = r["padded_tokens"]
            lines.append(f"| {r['jobs']} | {r['tokens']} | {p['sequential']} | {p['shared']} | "
                         f"{p['sequential'] / p['shared']:.2f} |")
    lines += ["", "![CPU-time throughput against sequential](multi-job.png)", "", "## Claim", "", f"| claim | threshold | " + " | ".join(f"N={r['jobs']}" for r in data["rows"]) + " | holds |",
              "|---|---|" + "---:|" * len(data["rows"]) + "---|"]
    for key, what in (("speedup_vs_sequential", "wall-clock"), ("cpu_speedup_vs_sequential", "CPU-time")):
        got = [r[key]["multi"] for r in data["rows"]]
        lines.append(f"| multi-job throughput vs sequential ({what}) | >= {TARGET}x | "
                     + " | ".join(f"{g:.2f}x" for g in got) + f" | {'yes' if min(got) >= TARGET else 'no'} |")
    eq = [r["max_abs_diff_vs_sequential"]["multi"] for r in data["rows"]]
    lines.append("| every job equals its sequential run (fp32) | max abs diff <= 1e-4 | "
                 + " | ".join(f"{e:.1e}" for e in eq) + f" | {'yes' if max(eq) <= 1e-4 else 'no'} |")
    if data.get("op"):
        lines += ["", "## The batched operator alone (forward + backward, one 384x384 layer, rank 16)", "",
                  "CPU ms, median of 15; tokens already in slot order (as the trainer lays them out). `fused` adds the "
                  "update into the base output in place; `unfused` adds a separate update tensor.", "",
                  "| slots | tokens | case | CPU ms |", "|---:|---:|---|---:|"]
        lines += [f"| {o['slots']} | {o['tokens']} | {o['case']} | {o['cpu_ms']:.2f} |" for o in data["op"]]
    if data.get("notes"):
        lines += ["", "## Notes", "", data["notes"]]
    if data.get("profile"):
        lines += ["", "## Profile (torch.profiler, self CPU time)", "", "```", data["profile"], "```"]
    return "\n".join(lines) + "\n"


def plot(data: dict, path) -> None:
    """CPU-time throughput of each system against sequential, by number of jobs, with the target line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    jobs = [r["jobs"] for r in data["rows"]]
    for s in data["rows"][0]["cpu_speedup_vs_sequential"]:
        ax.plot(jobs, [r["cpu_speedup_vs_sequential"][s] for r in data["rows"]], marker="o", label=LABELS[s])
    ax.axhline(TARGET, color="grey", linestyle="--", linewidth=1, label=f"target {TARGET}x")
    ax.set_xscale("log", base=2)
    ax.set_xticks(jobs, [str(j) for j in jobs])
    ax.set_xlabel("jobs")
    ax.set_ylabel("throughput / sequential (CPU time)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
