"""The page of bench/merge.py: summaries over seeds, the tables, the LoRA-LEGO paragraph and the bar chart."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from common import decide, read_json, write_json

SPREAD = 0.015  # a budget tells methods apart when a row's sd over seeds is at most 1.5 points

TASKS = ("tweets", "fortunes", "wordnet-category", "wordnet-pos")
GROUPS = {"reference": "#888888", "merge": "#1f77b4", "router": "#d62728", "joint": "#2ca02c"}
REFERENCES = {
    "base_heads": "base encoder + the individual runs' heads",
    "probe": "base encoder + head trained alone (linear probe)",
    "individual": "individual adapters (each task its own LoRA)",
    "ensemble": "output ensemble of the four adapters",
}
JOINT_NAMES = {"multitask_lora": "multi-task LoRA (shared, all tasks at once)", "smora": "smora (trained on all tasks)"}
ROUTER_NAMES = {"meteora": "meteora (frozen task LoRAs)", "lora_mixer": "lora_mixer (frozen task LoRAs)"}


def rows(results: dict) -> list[dict]:
    """One row per method with its per-seed test accuracies, normalised per task by the individual adapter."""
    found: dict[str, dict] = {}

    def add(key, label, group, seed, acc, extra=None):
        indiv = results[seed]["refs"]["individual"]["test"]
        row = found.setdefault(key, {"key": key, "label": label, "group": group, "raw": [], "norm": [], "extra": []})
        row["raw"].append([acc[t] for t in TASKS])
        row["norm"].append([acc[t] / indiv[t] if indiv[t] else float("nan") for t in TASKS])
        row["extra"].append(extra or {})

    for seed, res in results.items():
        if not res.get("refs"):
            continue
        for key, label in REFERENCES.items():
            add(key, label, "reference", seed, res["refs"][key]["test"])
        for m, r in res["merges"].items():
            add(m, m, "merge", seed, r["test"], r)
        for group, names, part in (("router", ROUTER_NAMES, "routers"), ("joint", JOINT_NAMES, "joint")):
            for k, label in names.items():
                if res[part].get(k):
                    add(k, label, group, seed, res[part][k]["test"], res[part][k])
    for row in found.values():
        norm = np.array(row["norm"])
        row["task_mean"] = norm.mean(0)
        row["mean"], row["worst"] = norm.mean(1), norm.min(1)  # per seed
    return list(found.values())


def _pm(values, pct=True) -> str:
    v = np.asarray(values, dtype=float) * (100 if pct else 1)
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v.mean():.1f}"


def _chosen(row: dict) -> str:
    if row["group"] == "merge":
        picks = dict.fromkeys(_point(e) for e in row["extra"])
        return "; ".join(picks)
    e = row["extra"][0]
    if row["group"] == "router":
        return f"top-2 of 4; {e['trainable']:,} router params"
    if row["group"] == "joint":
        return f"{e['steps']} steps, batch mixed; {e['trainable']:,} trainable"
    return ""


def _point(e: dict) -> str:
    return ", ".join([f"λ={e['weight']:g}", *(f"{k}={v:g}" for k, v in sorted(e["knobs"].items()))])


def _rank(row: dict) -> str:
    e = row["extra"][0]
    if row["group"] == "merge":
        r = sorted({x["rank"] for x in row["extra"]})
        return "/".join(map(str, r)) + (f" (min {min(x['rank_min'] for x in row['extra'])})"
                                         if any(x["rank_min"] != x["rank"] for x in row["extra"]) else "")
    if row["group"] in ("router", "joint"):
        return f"{e['rank']} ({e['active_rank']} active/token)" if e["rank"] != e["active_rank"] else str(e["rank"])
    return {"individual": "8 each", "ensemble": "4 × 8", "base_heads": "0", "probe": "0"}.get(row["key"], "")


def _time(row: dict) -> str:
    e = row["extra"]
    if row["group"] == "merge":
        return f"{np.median([x['merge_ms'] for x in e]):.0f} ms"
    if row["group"] in ("router", "joint"):
        return f"{np.median([x['train_s'] for x in e]):.0f} s training"
    return ""


def main_table(table: list[dict]) -> list[str]:
    lines = ["| method | kind | chosen on validation | merged rank | build time | " + " | ".join(TASKS)
             + " | **mean** | **worst** |", "|---|---|---|---|---|" + "---|" * len(TASKS) + "---|---|"]
    for row in table:
        per = [_pm(np.array(row["norm"])[:, i]) for i in range(len(TASKS))]
        lines.append(f"| {row['label']} | {row['group']} | {_chosen(row)} | {_rank(row)} | {_time(row)} | "
                     + " | ".join(per) + f" | **{_pm(row['mean'])}** | **{_pm(row['worst'])}** |")
    return lines


def raw_table(table: list[dict]) -> list[str]:
    lines = ["| method | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
    for row in table:
        raw = np.array(row["raw"])
        lines.append(f"| {row['label']} | " + " | ".join(_pm(raw[:, i]) for i in range(len(TASKS))) + " |")
    return lines


def cross_table(results: dict) -> list[str]:
    seeds = [s for s, r in results.items() if r.get("refs")]
    lines = ["| LoRA of \\ head of | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
    for a in TASKS:
        cells = []
        for t in TASKS:
            v = [results[s]["refs"]["cross"]["test"][a][t] / results[s]["refs"]["individual"]["test"][t] for s in seeds]
            cells.append(f"**{_pm(v)}**" if a == t else _pm(v))
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return lines


def grid_table(results: dict) -> list[str]:
    """Every grid point's validation accuracy (normalised, per task and mean) on the seed that chose."""
    first = next((r for r in results.values() if r.get("refs") and "val" in r["refs"]["individual"]), None)
    if first is None:
        return ["(no validation results in this run)"]
    indiv = first["refs"]["individual"]["val"]
    lines = ["| method | grid point | " + " | ".join(TASKS) + " | mean | chosen |", "|---|---|" + "---|" * len(TASKS) + "---|---|"]
    for m, e in first["merges"].items():
        for v in e["grid"]:
            norm = [v["val"][t] / indiv[t] for t in TASKS]
            lines.append(f"| {m} | {_point(v)} | " + " | ".join(f"{100 * x:.1f}" for x in norm)
                         + f" | {100 * np.mean(norm):.1f} | {'✓' if _point(v) == _point(e) else ''} |")
    return lines


def grid_notes(results: dict) -> list[str]:
    """Choices on the edge of their grid's λ range, and the check that lego with k = Σr equals a rescaled cat."""
    first = next((r for r in results.values() if r.get("refs") and "val" in r["refs"]["individual"]), None)
    if first is None:
        return []
    notes, merges = [], first["merges"]
    edge = []
    for m, e in merges.items():
        lams = sorted({v["weight"] for v in e["grid"]})
        if len(lams) > 2 and e["weight"] in (lams[0], lams[-1]):
            edge.append(f"`{m}` (λ={e['weight']:g} of {', '.join(f'{x:g}' for x in lams)})")
    if edge:
        notes.append("Chosen at the edge of a λ grid of three points, so a wider grid might do better: "
                     + "; ".join(edge) + ". The two-point λ grids of the other methods pick an edge by construction.")
    if "lego" in merges and "cat" in merges:
        cat = {v["weight"]: v["val"] for v in merges["cat"]["grid"]}
        pairs = [(v, cat[v["weight"] / 2]) for v in merges["lego"]["grid"]
                 if v["knobs"].get("rank") == 32 and v["weight"] / 2 in cat]
        if pairs:
            same = all(abs(v["val"][t] - c[t]) < 1e-6 for v, c in pairs for t in TASKS)
            lams = ", ".join(f"{v['weight']:g}" for v, _ in pairs)
            notes.append(f"Check: `lego` with k = 32 = Σr (singleton clusters; output reweighting √(8/32) = 1/2) at λ "
                         f"{lams} gave {'the same' if same else 'different'} validation accuracies as `cat` at half "
                         "that λ" + (", as it should." if same else " (it should give the same)."))
    return notes


def router_table(results: dict) -> list[str]:
    lines = ["| router | " + " | ".join(TASKS) + " | final training loss (task + router loss) |",
             "|---|" + "---|" * len(TASKS) + "---|"]
    for k, label in ROUTER_NAMES.items():
        done = [r["routers"][k] for r in results.values() if r["routers"].get(k)]
        if done:
            lines.append(f"| {label} | " + " | ".join(_pm([d["routing"][t] for d in done]) for t in TASKS)
                         + f" | {_pm([d['final_loss'] for d in done], pct=False)} |")
    return lines


def summary(table: list[dict]) -> list[str]:
    """Headline comparisons, computed from the table."""
    by = {r["key"]: r for r in table}
    m = lambda r: 100 * r["mean"].mean()  # noqa: E731
    w = lambda r: 100 * r["worst"].mean()  # noqa: E731
    merges = sorted((r for r in table if r["group"] == "merge"), key=lambda r: -m(r))
    others = sorted((r for r in table if r["key"] != "individual"), key=lambda r: -m(r))
    out = []
    if merges:
        b = merges[0]
        out.append(f"- Best merge on the mean: `{b['key']}` ({m(b):.1f}, worst task {w(b):.1f}); best on the worst task: "
                   f"`{max(merges, key=w)['key']}` ({w(max(merges, key=w)):.1f}); the plain average `linear` gives "
                   f"{m(by['linear']):.1f}." if "linear" in by else "")
        if "ensemble" in by:
            n = sum(m(r) > m(by["ensemble"]) for r in merges)
            out.append(f"- {n} of {len(merges)} merges beat the output ensemble of the four adapters ({m(by['ensemble']):.1f}), "
                       "which runs four encoders per example.")
    for k in ("meteora", "lora_mixer", "multitask_lora", "smora"):
        if k in by:
            out.append(f"- {by[k]['label']}: {m(by[k]):.1f} (worst task {w(by[k]):.1f}).")
    if "meteora" in by:
        loss = np.mean([e["final_loss"] for e in by["meteora"]["extra"]])
        out.append(f"- MeteoRA's final training loss (task loss + 50 × gate cross-entropy) is {loss:.1f} on average: its "
                   "gate had not converged in this budget (see the router diagnostics), so its row is a lower bound "
                   "for a longer-trained gate.")
    if others:
        out.append(f"- Nothing reaches the individual adapters (100 by definition): the closest is `{others[0]['label']}` "
                   f"at {m(others[0]):.1f}; the bare encoder with the individual heads (every merge at λ = 0) gives "
                   f"{m(by['base_heads']):.1f}." if "base_heads" in by else "")
    return [x for x in out if x]


def spread_check(table: list[dict], seeds: list) -> list[str]:
    """Whether the seeds can tell merges apart: each row's sample sd of the mean column, and paired verdicts."""
    sd = {r["key"]: float(np.std(r["mean"], ddof=1)) if len(r["mean"]) > 1 else float("nan") for r in table
          if r["key"] != "individual"}
    wide = [k for k, v in sd.items() if not v <= SPREAD]
    lines = ["## Is the budget telling methods apart?", "",
             f"A comparison means something only where the spread over seeds (sample sd of the per-seed mean "
             f"normalised accuracy) is at most {100 * SPREAD:g} points; {len(seeds)} seeds here.", "",
             f"- Largest sd on the mean column: {100 * max(sd.values()):.1f} points (`{max(sd, key=sd.get)}`); "
             + (f"rows above {100 * SPREAD:g} points: {', '.join(f'`{k}` ({100 * sd[k]:.1f})' for k in wide)}: their "
                "differences from other rows are not resolved at this budget." if wide else
                f"every row is within {100 * SPREAD:g} points.")]
    by = {r["key"]: r for r in table}
    merges = sorted((r for r in table if r["group"] == "merge"), key=lambda r: -r["mean"].mean())
    pairs = [(merges[0]["key"], "linear"), ("lego", "knots")] if merges else []
    for a, b in pairs:
        if a in by and b in by and a != b:
            text, verdict = decide(list(by[a]["mean"] - by[b]["mean"]), "beats")
            lines.append(f"- `{a}` against `{b}` on the mean column: {text} (in normalised points); "
                         f"`{a}` beats `{b}` (lower one-sided 95% bound > 0): {verdict}.")
    return lines + [""]


def lego_paragraph(table: list[dict]) -> list[str]:
    by = {r["key"]: r for r in table}
    if "lego" not in by or "knots" not in by:
        return ["LoRA-LEGO or KnOTS did not finish in this run, so they are not compared here."]
    lego, knots = by["lego"], by["knots"]
    merges = sorted((r for r in table if r["group"] == "merge"), key=lambda r: -r["mean"].mean())
    place = [r["key"] for r in merges].index("lego") + 1
    d_mean = 100 * (lego["mean"].mean() - knots["mean"].mean())
    d_worst = 100 * (lego["worst"].mean() - knots["worst"].mean())
    behind = [t for i, t in enumerate(TASKS) if lego["task_mean"][i] < knots["task_mean"][i]]
    verdict = "level with" if abs(d_mean) < 0.05 else "behind" if d_mean < 0 else "ahead of"
    text = (f"**Where LoRA-LEGO stands.** On these four tasks `lego` is {verdict} `knots`"
            + ("" if verdict == "level with" else f" by {abs(d_mean):.1f} points") + " of "
            f"mean normalised accuracy ({100 * lego['mean'].mean():.1f} vs {100 * knots['mean'].mean():.1f}) and "
            + (f"level on the worst task" if abs(d_worst) < 0.05 else f"{'behind' if d_worst < 0 else 'ahead'} by "
               f"{abs(d_worst):.1f} on the worst task") + f"; it ranks {place} of "
            f"{len(merges)} merge methods (best: `{merges[0]['key']}`, {100 * merges[0]['mean'].mean():.1f}), at merged rank "
            f"{_rank(lego)} against KnOTS's {_rank(knots)}. "
            f"Per task it is behind KnOTS on {', '.join(behind) if behind else 'none of the tasks'}. Published "
            "comparisons put LoRA-LEGO behind KnOTS on vision tasks (ViT merging benchmarks); here the tasks are text "
            "classification on a 22M-parameter encoder with rank-8 LoRAs, so agreement or disagreement with those "
            "results is only indicative.")
    why = ("Why LEGO can trail (here on the tasks listed above; against KnOTS in the published vision comparisons): (1) k-means pools rank-1 units of different tasks into one centroid whenever they are "
           "close in `[b; a]` space; the centroid averages directions, and the parameter reweighting restores the "
           "norms but not the directions, so each task keeps only part of its update; KnOTS instead aligns the tasks "
           "in a shared SVD basis and merges there without dropping rank (its merged rank is up to Σr). "
           "(2) LEGO's merged rank is k; with k below Σr = 32 it must discard or average, and with k = Σr and "
           "singleton clusters it becomes a rescaled `cat` (the √(r̄/k) output reweighting then halves every "
           "update), so the grid's best k is a trade-off KnOTS does not face. (3) The units' canonical sign and gauge "
           "make the clustering order-invariant but are arbitrary with respect to the tasks, and the two rescalings "
           "are reconstructions of the paper's prose (see docs/merging.md), not its code.")
    ahead = [r for r in merges if r["mean"].mean() > lego["mean"].mean()]
    if ahead:
        close = all(r["mean"].mean() - lego["mean"].mean() < max(r["mean"].std(), lego["mean"].std()) for r in ahead)
        names = ", ".join(f"`{r['key']}` ({100 * r['mean'].mean():.1f})" for r in ahead)
        text += (f" Merges ahead of `lego` on the mean: {names}"
                 + ("; every gap is within one standard deviation over seeds." if close else "."))
    best_task = [max(merges, key=lambda r, i=i: r["task_mean"][i]) for i in range(len(TASKS))]
    trail = [f"{t} (`{b['key']}` {100 * b['task_mean'][i]:.1f} vs {100 * lego['task_mean'][i]:.1f})"
             for i, (t, b) in enumerate(zip(TASKS, best_task)) if b["key"] != "lego"]
    if trail:
        text += " Per task, the best merge beats `lego` on " + "; ".join(trail) + "."
    return [text, "", why]


def plot(table: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.36 * len(table) + 1.4))
    y = np.arange(len(table))[::-1]
    means = [100 * r["mean"].mean() for r in table]
    errs = [100 * r["mean"].std() for r in table]
    ax.barh(y, means, xerr=errs, color=[GROUPS[r["group"]] for r in table], alpha=0.85, capsize=2)
    ax.scatter([100 * r["worst"].mean() for r in table], y, marker="|", s=120, color="black", zorder=3, label="worst task")
    ax.set_yticks(y, [r["label"] for r in table], fontsize=8)
    ax.axvline(100, color="black", lw=0.6, ls=":")
    ax.set_xlabel("test accuracy / individual adapter's (%), mean over tasks")
    ax.set_title("bars: mean over tasks (±1 sd over seeds); ticks: worst task", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in GROUPS.values()]
    ax.legend(handles + [ax.collections[-1]], list(GROUPS) + ["worst task"], fontsize=7, loc="upper left",
              bbox_to_anchor=(1.01, 1))
    ax.set_xlim(left=max(0, min(100 * r["worst"].mean() for r in table) - 10))
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def missing(info: dict, results: dict) -> list[str]:
    out = []
    for seed in info["seeds"]:
        r = results.get(seed, {})
        if not r.get("refs"):
            out.append(f"seed {seed}: the task adapters or the references")
            continue
        gone = [m for m in info["grids"] if m not in r["merges"]]
        gone += [k for part in ("routers", "joint") for k, v in r[part].items() if not v]
        if gone:
            out.append(f"seed {seed}: {', '.join(gone)}")
    return out


def invocations(info: dict) -> list[str]:
    """The commands that filled the cache this page reads, with their wall times."""
    runs = info.get("invocations") or []
    if not runs:
        return []
    total = sum(r["wall_s"] for r in runs)
    stamp = "%Y-%m-%d %H:%M:%S %Z"
    span = (time.mktime(time.strptime(max(r["finished"] for r in runs), stamp))
            - time.mktime(time.strptime(min(r["started"] for r in runs), stamp)))
    lines = [f"The cache was filled by these commands (each resumes from the cache of the earlier ones): {total / 60:.1f} "
             f"min of wall time summed, {span / 60:.1f} min from the first start to the last finish (runs may overlap).", "", "| command | started | wall time | jobs computed | load average at start / end |",
             "|---|---|---|---|---|"]
    lines += [f"| `{r['command']}`" + (f" ({r['note']})" if r.get("note") else "") + f" | {r['started']} | "
              f"{r['wall_s'] / 60:.1f} min | {r['computed']} | {r['load_start']} / {r['load_end']} |" for r in runs]
    return lines + [""]


def write(out: Path, info: dict, results: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "merging.json", {"info": info, "results": results})
    table = rows(results)
    b, m = info["budget"], info["machine"]
    lines = ["# Merging and routing task LoRAs: four MiniLM classification tasks", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch threads {m['threads']}; torch {m['torch']}, transformers "
             f"{m['transformers']}, Python {m['python']}. Load average at start {info['load_start']}, at end "
             f"{info['load_end']} (a shared machine: other jobs ran at the same time, which stretches the times).", "",
             f"Command: `{info['command']}`  ", f"Wall time of this command: {info['wall_s'] / 60:.1f} min ({info['started']} "
             f"to {info['finished']}; it computed {info['computed']} jobs and took the rest from the cache).", "",
             *invocations(info)]
    if info["quick"]:
        lines += ["**Quick smoke run: tiny data and 4 training steps; the numbers mean nothing.**", ""]
    gone = missing(info, results)
    if gone:
        lines += ["**Missing from this page** (not finished when it was written): " + "; ".join(gone) + ".", ""]
    tasks = info["tasks"]
    lines += [
        "## Setup", "",
        "Tasks (bundled with lorakit, `lorakit.data.load_task`): " + "; ".join(
            f"`{n}` ({t['num_labels']} classes; train {t['sizes']['train']}, validation {t['sizes']['validation']}, "
            f"test {t['sizes']['test']})" for n, t in tasks.items())
        + f". Subsets are stratified and drawn with seed 0; tokens cut at {b['max_length']}. Seeds {info['seeds']}: a "
        "seed changes every head and adapter initialisation and the data order, not the examples.",
        "",
        f"- **Individual adapters.** all-MiniLM-L6-v2 (`BertForSequenceClassification`, the checkpoint's pooler frozen) with "
        f"a LoRA of rank {b['rank']} (α = {2 * b['rank']}) on query/key/value of all 6 layers and the task's classifier head, "
        f"trained jointly: {b['steps']} AdamW steps, batch {b['batch_size']}, lr {b['lr']:g}. The head starts from the "
        "task's linear probe (LP-FT; the probe is described below): from a random head, that budget left the adapters "
        "below the probe. Saved as PEFT directories.",
        "- **Merges.** Every method of `lorakit.merging.MERGERS` merges the four LoRAs (heads left out, every adapter "
        "weighted λ). The merged LoRA goes on the bare encoder and task t is read through task t's own head from "
        "its individual run. λ and the method's knobs are chosen from the grid below on the first seed's adapters, by the "
        "mean over tasks of validation accuracy / the individual adapter's validation accuracy, and that choice is "
        "tested on every seed. "
        "Dense methods (ties, dare_*, magnitude_prune) re-factor at rank 16; `svd` and `lego` search k.",
        f"- **Routers over the frozen task LoRAs** (`meteora`, `lora_mixer` regime ii), loaded from the four PEFT "
        f"directories with `from_adapters(..., top_k=2)`; only the router trains ({b['router_steps']} steps, batch "
        f"{b['batch_size']} mixed across tasks, lr {b['meteora_lr']:g} for MeteoRA's gate, which starts at N(0, 1), and "
        f"{b['router_lr']:g} for LoRA-Mixer's) with the task loss through the individual runs' "
        "frozen heads; MeteoRA adds its supervised gate loss (50 × CE against the task id of every token), LoRA-Mixer "
        "its balance/specialisation loss. At test time the router sees only the tokens; the head is the task's.",
        f"- **Trained on all tasks at once** (shared adapter, per-task heads starting from the probes, batches mixed "
        "across tasks, "
        f"{b['joint_steps']} steps of batch {b['batch_size']}, lr {b['lr']:g}: the compute of {b['joint_steps'] / b['steps']:g} "
        f"individual adapters, so each task sees {b['joint_steps'] / b['steps'] / len(TASKS):.2g} times the examples its "
        f"own adapter saw): a rank-{b['rank']} LoRA (the multi-task reference) and SMoRA (r = {b['smora_rank']} rank-1 experts, "
        f"{b['smora_top_k']} active per token, α = {2 * b['smora_rank']}).",
        "- **Base references.** The bare encoder read through the individual runs' heads (what any merge gives with λ = 0, "
        "the floor of merging), and the bare encoder with a head trained alone on its frozen features (linear probe: "
        "300 full-batch AdamW steps, lr 1e-2, on the training subset; the starting point of every trained head).",
        "- **Output ensemble.** For an example of task t: task t's head applied to the pooled output of each of the four "
        "adapted encoders (base + LoRA i, i = 1..4), the four softmax distributions averaged; 4 forward passes per "
        "example, no task routing (the head is the task's, as for merges).", "",
        "**Normalised accuracy** = test accuracy / the individual adapter's test accuracy on the same task and seed. "
        "Per seed, *mean* averages it over the four tasks and *worst* takes the lowest task; the table gives mean ± sample sd "
        "over seeds. Merged rank: the rank of the merged LoRA (all modules alike unless a minimum is given). Build "
        "time: median over seeds of the `combine` call (merges) or of the training (routers, joint).", "",
        "## Results", "", "![normalised accuracy per method](merging.png)", "",
        *main_table(table), "", *summary(table), "", *spread_check(table, info["seeds"]),
        *lego_paragraph(table), "",
        "### Test accuracy (%, not normalised)", "", *raw_table(table), "",
        "### Interference: each task LoRA read through each task's head", "",
        "Normalised test accuracy of base + LoRA of task a (row) with the head of task t (column); the diagonal is 100 by "
        "definition. An off-diagonal cell near the base-heads row means the other task's LoRA barely disturbs task t.", "",
        *cross_table(results), "",
        "### Router diagnostics", "",
        "Share of a task's real test tokens (64 examples) whose largest mean gate over the 18 routed layers is that "
        "task's own LoRA. MeteoRA is trained for this; LoRA-Mixer's router is not told the task, so low values there "
        "are not a failure in themselves. `wordnet-category` and `wordnet-pos` share their inputs (WordNet glosses; "
        "every `wordnet-category` text is a noun gloss, and a quarter of `wordnet-pos` texts are too), so no router "
        "that reads the tokens can separate those two tasks fully, and merging them asks one encoder for two labellings "
        "of the same texts.", "", *router_table(results), "",
        "### Hyperparameter grids (validation)", "",
        f"Normalised validation accuracy (%, {b['max_val']} examples per task) of every grid point on seed "
        f"{info['seeds'][0]}'s adapters; ✓ marks the choice used for every seed.", "", *grid_table(results), "",
        *[x for n in grid_notes(results) for x in (n, "")]]
    (out / "merging.md").write_text("\n".join(lines) + "\n")
    if table:
        plot(table, out / "merging.png")
    return out / "merging.md"


def main() -> int:
    """Rewrite docs/benchmarks/merging.md from docs/benchmarks/merging.json (no recomputation)."""
    out = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
    data = read_json(out / "merging.json")
    results = {int(seed): r for seed, r in data["results"].items()}
    print(f"wrote {write(out, data['info'], results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
