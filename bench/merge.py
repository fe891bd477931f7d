"""Merging and routing task LoRAs on four MiniLM classification tasks (the benchmark of issue 4).

Each task (bundled data: tweets, fortunes, wordnet-category, wordnet-pos) gets its own LoRA (q/k/v, rank 8) and
its own head, trained jointly, for every seed. Then, per seed: every merger in ``lorakit.merging.MERGERS`` merges
the four LoRAs (heads excluded) with hyperparameters chosen on validation data from a small grid, and the merged
LoRA is scored on task t with task t's own head; MeteoRA and LoRA-Mixer (regime ii) route over the four frozen
LoRAs loaded from their PEFT directories, with the task heads of the individual runs; SMoRA and a plain LoRA are
trained on all tasks at once (shared adapter, new per-task heads). References: the bare encoder with the
individual heads, the bare encoder with a head trained alone (linear probe), the individual adapters, and an
output ensemble (task t's head on each of the four adapted encoders, probabilities averaged). Accuracy is
normalised by the individual adapter's test accuracy on the same task and seed.

    HF_HUB_OFFLINE=1 python bench/merge.py [--quick] [--seeds 0,1,2] [--report-only]

Writes merging.md, merging.png and merging.json to docs/benchmarks/ (``--quick``: runs/bench-merge/quick/).
Every training run (adapters as PEFT directories) and every evaluation is cached under runs/bench-merge/<budget>/,
so an interrupted run resumes; ``--report-only`` writes the page from the cache alone.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge_report as report  # noqa: E402
import merge_tasks as mt  # noqa: E402
from common import command_line, load_average, machine, read_json, write_json  # noqa: E402

import lorakit  # noqa: E402
from lorakit.merging import MERGERS, combine  # noqa: E402
from lorakit.methods import lora_mixer, meteora  # noqa: E402
from lorakit.methods.smora import SMoRAConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ROUTERS = ("meteora", "lora_mixer")  # over the four frozen task LoRAs, with the individual heads
JOINT = ("multitask_lora", "smora")  # trained on all tasks at once, heads from the probes
ROUTER_FIELDS = ("router_steps", "router_lr", "meteora_lr")


@dataclass(frozen=True)
class Budget:
    """Training and data sizes shared by every row."""

    steps: int = 60  # per task adapter, batch ``batch_size``
    batch_size: int = 16
    max_train: int = 600
    max_val: int = 80  # per task, for choosing hyperparameters
    max_eval: int = 200  # per task, test
    max_length: int = 32
    rank: int = 8
    lr: float = 2e-3  # LoRA and head; heads start from the linear probe (LP-FT), as a head from N(0, 0.02) lags far
    # behind the probe after 60 steps at 1e-3 (measured: wordnet-category 14% vs the probe's 50%)
    joint_steps: int = 120  # multi-task LoRA / SMoRA, batch ``batch_size`` mixed across tasks (2 adapters' compute)
    router_steps: int = 100  # gate / router training over the frozen LoRAs, batch ``batch_size`` mixed across tasks
    router_lr: float = 1e-2  # LoRA-Mixer's router (starts as nn.Linear's default, small)
    meteora_lr: float = 5e-2  # MeteoRA's gate starts at N(0, 1): at 1e-2 for 40 steps its CE was still 8.4
    smora_rank: int = 32  # 32 rank-1 experts, 8 active per token: as many active ranks as a rank-8 LoRA
    smora_top_k: int = 8

    def key(self) -> str:
        """The cache folder: a hash of the fields the task adapters depend on (router settings are checked per file)."""
        text = json.dumps({k: v for k, v in dataclasses.asdict(self).items() if k not in ROUTER_FIELDS}, sort_keys=True)
        return f"s{self.steps}-n{self.max_train}-" + hashlib.sha1(text.encode()).hexdigest()[:8]


# Hyperparameter grids, per method: (weight λ given to every adapter, knobs). Small on purpose; chosen on the first
# seed's adapters by the mean over tasks of validation accuracy / the individual adapter's, then used for every seed. ``rank`` of the dense methods: 16 (twice an input's rank, half of Σr).
def grids(quick: bool) -> dict[str, list[tuple[float, dict]]]:
    lam = [0.5, 0.75, 1.0]
    g = {
        "linear": [(1.0, {})],  # the plain average: λ cancels (linear normalises the weights)
        "task_arithmetic": [(w, {}) for w in lam],
        "cat": [(w, {}) for w in lam],
        "svd": [(w, {"rank": k}) for k in (8, 16) for w in (0.75, 1.0)],
        "ties": [(w, {"density": d, "rank": 16}) for d in (0.2, 0.5) for w in (1.0, 1.5)],
        "magnitude_prune": [(w, {"density": d, "rank": 16}) for d in (0.2, 0.5) for w in (0.5, 1.0)],
        "dare_linear": [(w, {"density": d, "rank": 16}) for d in (0.5, 0.8) for w in (0.5, 1.0)],
        "dare_ties": [(w, {"density": d, "rank": 16}) for d in (0.5, 0.8) for w in (1.0, 1.5)],
        "knots": [(w, {"density": d}) for d in (0.2, 0.5) for w in (1.0, 1.5)],
        "lego": [(w, {"rank": k}) for k in (8, 16, 32) for w in (1.0, 1.5)],
    }
    unknown = [m for m in MERGERS.names() if m not in g]
    g.update({m: [(1.0, {})] for m in unknown})  # a merger registered later runs at its defaults
    return {m: v[:1] for m, v in g.items()} if quick else g


def config_id(weight: float, knobs: dict) -> str:
    return "-".join([f"w{weight:g}", *(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in sorted(knobs.items()))])


class Run:
    """One benchmark run: the data, the budget, the cache folder and the jobs."""

    def __init__(self, budget: Budget, cache: Path, report_only: bool, quick: bool):
        self.budget, self.root, self.report_only, self.quick = budget, cache / budget.key(), report_only, quick
        b = budget
        self.tasks, self.val, self.test, self.pad = mt.load_tasks(b.max_train, b.max_val, b.max_eval, b.max_length)
        self.base = mt.base_model()
        self.grids = grids(quick)
        self._probes: dict = {}
        self.computed = 0  # jobs computed by this invocation

    # -- cache -----------------------------------------------------------------------------------------
    def cached(self, rel: str, compute, spec: dict | None = None):
        """The JSON at ``rel`` under the cache, computed (and written) when missing or made with another ``spec``,
        unless report-only."""
        path = self.root / rel
        data = read_json(path)
        if data is not None and spec is not None and data.get("spec") != spec:
            data = None
        if data is None and not self.report_only:
            self.computed += 1
            t0 = time.perf_counter()
            print(f"{rel} ...", end=" ", flush=True)
            data = compute()
            write_json(path, data)
            print(f"{time.perf_counter() - t0:.0f} s", flush=True)
            gc.collect()
        return data

    def adapter_dir(self, seed: int, name: str) -> Path:
        return self.root / f"seed{seed}" / "adapters" / name

    def states(self, seed: int) -> list:
        return [lorakit.load_state(self.adapter_dir(seed, n)) for n in mt.TASK_NAMES]

    def heads(self, seed: int) -> dict:
        return {n: mt.head_of(s) for n, s in zip(mt.TASK_NAMES, self.states(seed))}

    def score(self, feats_val, feats_test, heads) -> dict:
        out = {"val": mt.per_task(heads, feats_val, self.val)} if feats_val is not None else {}
        if feats_test is not None:
            out["test"] = mt.per_task(heads, feats_test, self.test)
        return out

    # -- jobs ------------------------------------------------------------------------------------------
    def train_adapter(self, seed: int, name: str) -> dict:
        b = self.budget
        model, secs, loss = mt.train_single(self.tasks[name], self.probes(seed)[name], seed, b.rank, b.steps,
                                            b.batch_size, b.lr)
        lorakit.save_peft(model, self.adapter_dir(seed, name))
        return {"train_s": round(secs, 1), "final_loss": loss, "load": load_average()}

    def base_train_features(self) -> dict:
        """Bare-encoder features of every task's training set (seed-independent; kept as a .pt file)."""
        path = self.root / "base-train-features.pt"
        if path.is_file():
            return torch.load(path)
        out = {}
        for name, task in self.tasks.items():
            split = mt.Split([dict(f) for f in task["train"]], {name: slice(0, len(task["train"]))})
            out[name] = (mt.pooled(self.base, split, self.pad), split.labels(name))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, path)
        return out

    def probes(self, seed: int) -> dict:
        """Per task, a head trained alone on the bare encoder's features (the start of every trained head)."""
        if seed not in self._probes:
            train = self.base_train_features()
            self._probes[seed] = {n: mt.train_probe(*train[n], self.tasks[n]["num_labels"], seed) for n in mt.TASK_NAMES}
        return self._probes[seed]

    def references(self, seed: int, with_val: bool) -> dict:
        """Test accuracy of the individual adapters (each read through every task's head: the cross matrix), the
        bare encoder with those heads and with probes, and the output ensemble; with ``with_val`` also the
        individual adapters' validation accuracy (the normaliser of the hyperparameter choice)."""
        states, names = [mt.lora_only(s) for s in self.states(seed)], mt.TASK_NAMES
        heads = self.heads(seed)
        feats = {n: mt.features_of(self.base, s, self.test, self.pad) for n, s in zip(names, states)}
        base = mt.features_of(self.base, None, self.test, self.pad)
        probes = self.probes(seed)
        cross = {a: mt.per_task(heads, feats[a], self.test) for a in names}
        ens = {}
        for t in names:
            sl = self.test.slices[t]
            p = sum(mt.probs(heads[t], feats[a][sl]) for a in names) / len(names)
            ens[t] = mt.accuracy(p, self.test.labels(t))
        out = {"cross": {"test": cross}, "individual": {"test": {n: cross[n][n] for n in names}},
               "base_heads": {"test": mt.per_task(heads, base, self.test)},
               "probe": {"test": mt.per_task(probes, base, self.test)}, "ensemble": {"test": ens}}
        if with_val:
            out["individual"]["val"] = {n: mt.per_task({n: heads[n]}, mt.features_of(self.base, s, self.val, self.pad),
                                                        self.val)[n] for n, s in zip(names, states)}
        return out

    def merged(self, seed: int, method: str, weight: float, knobs: dict):
        states = [mt.lora_only(s) for s in self.states(seed)]
        extra = {"seed": seed} if MERGERS.get(method).random else {}
        t0 = time.perf_counter()
        state = combine(states, method, [weight] * len(states), modules_to_save="drop", **knobs, **extra)
        secs = time.perf_counter() - t0
        ranks = [t["lora_A.weight"].shape[0] for t in state.tensors.values()]
        return state, {"merge_ms": round(1e3 * secs, 1), "rank": max(ranks), "rank_min": min(ranks)}

    def merge_eval(self, seed: int, method: str, weight: float, knobs: dict, split: str) -> dict:
        state, info = self.merged(seed, method, weight, knobs)
        data = self.val if split == "val" else self.test
        feats = mt.features_of(self.base, state, data, self.pad)
        acc = mt.per_task(self.heads(seed), feats, data)
        return {"weight": weight, "knobs": knobs, split: acc, **info}

    def router(self, seed: int, kind: str) -> dict:
        """MeteoRA or LoRA-Mixer over the four frozen task LoRAs (PEFT directories); only the router trains."""
        b = self.budget
        dirs = [self.adapter_dir(seed, n) for n in mt.TASK_NAMES]
        model = mt.base_model()
        build = meteora.from_adapters if kind == "meteora" else lora_mixer.from_adapters
        torch.manual_seed(seed)  # the router's initialisation
        build(model, dirs, top_k=2)
        heads = self.heads(seed)
        wrapper = mt.MultiHead(model, list(heads.values()))
        trainable = sum(p.numel() for p in wrapper.parameters() if p.requires_grad)
        spec = self.router_spec(kind)
        secs, loss = mt.train_multitask(wrapper, self.tasks, seed, spec["steps"], b.batch_size, spec["lr"], self.pad)
        return {"spec": spec, **self.score(None, mt.pooled(model, self.test, self.pad), heads),
                "train_s": round(secs, 1), "final_loss": loss, "trainable": trainable, "top_k": 2,
                "rank": b.rank * len(dirs), "active_rank": 2 * b.rank, "routing": self.routing_accuracy(model)}

    def router_spec(self, kind: str) -> dict:
        b = self.budget
        return {"steps": b.router_steps, "lr": b.meteora_lr if kind == "meteora" else b.router_lr}

    def routing_accuracy(self, model) -> dict:
        """Per task: the share of real test tokens whose top expert (mean gate over layers) is the task's own."""
        from lorakit.methods.routing import routed_layers
        out = {}
        for name in mt.TASK_NAMES:
            data = mt.Split(self.test.features[self.test.slices[name]][:64], {name: slice(0, 64)})
            batch = mt.collate([{k: f[k] for k in ("input_ids", "attention_mask")} for f in data.features], self.pad)
            with torch.inference_mode():
                model.eval().bert(**batch)
            gates = torch.stack([m.last_gates for m in routed_layers(model).values()]).mean(0)  # [b, seq, E]
            top = gates.argmax(-1)[batch["attention_mask"].bool()]
            out[name] = (top == mt.TASK_NAMES.index(name)).float().mean().item()
        return out

    def joint(self, seed: int, kind: str) -> dict:
        """A LoRA (rank ``rank``) or SMoRA shared by all tasks, with new per-task heads, trained on all at once."""
        b = self.budget
        model = mt.base_model()
        config = (mt.lora_config(b.rank) if kind == "multitask_lora" else
                  SMoRAConfig(r=b.smora_rank, lora_alpha=2 * b.smora_rank, top_k=b.smora_top_k, target_modules=mt.TARGETS))
        torch.manual_seed(seed)
        lorakit.apply(model, config)
        heads = [copy.deepcopy(h).requires_grad_(True) for h in self.probes(seed).values()]  # LP-FT, as the adapters
        wrapper = mt.MultiHead(model, heads)
        trainable = sum(p.numel() for p in wrapper.parameters() if p.requires_grad)
        secs, loss = mt.train_multitask(wrapper, self.tasks, seed, b.joint_steps, b.batch_size, b.lr, self.pad)
        named = dict(zip(mt.TASK_NAMES, wrapper.heads))
        return {**self.score(None, mt.pooled(model, self.test, self.pad), named),
                "train_s": round(secs, 1), "final_loss": loss, "trainable": trainable, "steps": b.joint_steps,
                "rank": config.r, "active_rank": b.smora_top_k if kind == "smora" else config.r}

    # -- the whole benchmark -----------------------------------------------------------------------------
    def run_all(self, seeds: list[int]) -> dict:
        """Everything, seed by seed, cached job by job; parts missing from the cache (report-only) are left out.

        The first seed's adapters choose each merger's grid point on validation data; every seed is tested with it."""
        results, choice = {}, {}
        for seed in seeds:
            res = results[seed] = {"train": {}, "merges": {}, "routers": {}, "joint": {}}
            for name in mt.TASK_NAMES:
                res["train"][name] = self.cached(f"seed{seed}/train-{name}.json", lambda n=name: self.train_adapter(seed, n))
            if any(v is None for v in res["train"].values()):
                continue
            select = seed == seeds[0]
            res["refs"] = self.cached(f"seed{seed}/references.json", lambda: self.references(seed, select))
            for method, grid in self.grids.items():
                if select and res["refs"] is not None:
                    choice[method] = self.choose(seed, method, grid, res["refs"]["individual"]["val"])
                if not choice.get(method):
                    continue
                best = choice[method]
                cid = config_id(best["weight"], best["knobs"])
                test = self.cached(f"seed{seed}/test/{method}/{cid}.json",
                                   lambda m=method: self.merge_eval(seed, m, best["weight"], best["knobs"], "test"))
                if test is not None:
                    res["merges"][method] = {**test, "val": best["val"], "grid": best["grid"] if select else None}
            for kind in ROUTERS:
                res["routers"][kind] = self.cached(f"seed{seed}/{kind}.json", lambda k=kind: self.router(seed, k),
                                                   self.router_spec(kind))
            for kind in JOINT:
                res["joint"][kind] = self.cached(f"seed{seed}/{kind}.json", lambda k=kind: self.joint(seed, k))
        return results

    def choose(self, seed: int, method: str, grid: list, indiv: dict):
        """The grid point with the best mean normalised validation accuracy (the first on ties), with the grid."""
        vals = []
        for weight, knobs in grid:
            v = self.cached(f"seed{seed}/val/{method}/{config_id(weight, knobs)}.json",
                            lambda w=weight, k=knobs: self.merge_eval(seed, method, w, k, "val"))
            if v is not None:
                vals.append(v)
        if len(vals) < len(grid):
            return None
        best = max(vals, key=lambda v: sum(v["val"][t] / max(indiv[t], 1e-9) for t in indiv))
        return {**best, "grid": vals}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: seed 0, 4 steps, tiny data, first grid point")
    ap.add_argument("--seeds", help="comma-separated seeds (default 0,1,2; quick 0)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine, 2 threads ran 5x slower per step)")
    for f in dataclasses.fields(Budget):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default),
                        help=f"default {f.default}")
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / "bench-merge")
    ap.add_argument("--out", type=Path, help="folder for merging.md/.png/.json")
    ap.add_argument("--report-only", action="store_true", help="write the page from cached results only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    quick = dict(steps=4, max_train=64, max_val=16, max_eval=24, joint_steps=4, router_steps=2) if args.quick else {}
    budget = Budget(**{**quick, **{f.name: getattr(args, f.name) for f in dataclasses.fields(Budget)
                                   if getattr(args, f.name) is not None}})
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    out = args.out or (args.cache / "quick" if args.quick else ROOT / "docs" / "benchmarks")
    info = {"machine": machine(), "command": command_line(argv), "budget": dataclasses.asdict(budget),
            "seeds": seeds, "quick": args.quick, "load_start": load_average(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "report_only": args.report_only}
    print(f"# {info['machine']}\n# cache {args.cache / budget.key()}", flush=True)
    run = Run(budget, args.cache, args.report_only, args.quick)
    info["grids"] = {m: [[w, k] for w, k in g] for m, g in run.grids.items()}
    info["tasks"] = {n: {k: t[k] for k in ("num_labels", "label_names", "sizes")} for n, t in run.tasks.items()}
    results = run.run_all(seeds)
    info.update(load_end=load_average(), finished=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                wall_s=round(time.perf_counter() - start), computed=run.computed)
    # every invocation that computed something is logged beside the cache, so the page can say what built it
    log = run.root / "invocations.json"
    history = read_json(log) or []
    if run.computed:
        history.append({k: info[k] for k in ("command", "started", "finished", "wall_s", "computed", "load_start", "load_end")})
        write_json(log, history)
    info["invocations"] = history
    page = report.write(out, info, results)
    print(f"wrote {page}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
