"""Adapters for unseen tasks without training on them: SG-LoRA and ICM-LoRA against retrieval, merging, training.

On the zoo's held-out tasks (``make zoo``; MiniLM, binary tasks), every row is an encoder (base + some LoRA) read
through a linear probe fitted on ``probe`` labelled examples of the task (the same examples for every row of a
seed; the probe is the only thing that sees the task's labels, except in the trained rows):

- base: the bare encoder (zero adapter);
- trained LoRA: the zoo's adapter trained on the task (its own head, and the same probe protocol as the others);
- retrieved: the expert whose description is closest (cosine of MiniLM embeddings) to the task's;
- merge top-k: the plain average of the top-k retrieved experts' updates (``merging.combine(..., "cat")``, exact);
- SG-LoRA: generated from the description alone; ICM-LoRA: generated from the task vector of 16 labelled examples.

Time to obtain = what the row costs for a new task once the zoo and the generators exist (training seconds for the
trained row; generator fitting is reported apart). A seed changes the probe examples, the demonstrations and the
generators' training. ICM-LoRA's own claim (generated adapters as good as the trained ones for the tasks it was
trained on, at a fraction of their storage) is checked on expert tasks through their own heads.

    python bench/generation.py [--quick] [--seeds 0,1,2] [--zoo runs/zoo/minilm]

Writes docs/benchmarks/generation.{md,json,png} (``--quick``: 3 seeds, 100 test examples per task, 4 seen tasks);
``python bench/generation_report.py`` rewrites the page from the JSON.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generation_report as report  # noqa: E402
from common import command_line, load_average, machine, write_json  # noqa: E402

import lorakit  # noqa: E402
from lorakit import zoo as models  # noqa: E402
from lorakit.data import subsample  # noqa: E402
from lorakit.generate.features import accuracy, embed, fit_probe, pooled  # noqa: E402
from lorakit.generate.icm_lora import ICMLoRA, demonstrations  # noqa: E402
from lorakit.generate.sg_lora import SGLoRA  # noqa: E402
from lorakit.generate.tasks import by_name  # noqa: E402
from lorakit.generate.zooindex import Zoo  # noqa: E402
from lorakit.merging import combine  # noqa: E402
from lorakit.train import evaluate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROBE = 32  # labelled examples the probe head sees
SHOTS = 16  # ICM-LoRA's demonstrations, drawn from the probe examples
TOP_K = 3


def encoded(name: str, budget: dict, tokenizer, max_test: int, seeds=()):
    """The zoo's split of task ``name``: test cut to ``max_test`` (stratified); with ``seeds``, the train split
    keeps only the union of those seeds' probe examples (the only ones any row reads)."""
    task = by_name(name).load(budget["max_train"], budget["max_eval"])
    test = subsample(task.test, max_test, 0, "label")
    chosen = {s: probe_indices(task.train, s) for s in seeds}
    keep = sorted({i for idx in chosen.values() for i in idx}) if seeds else range(len(task.train))
    position = {i: k for k, i in enumerate(keep)}
    probes = {s: [position[i] for i in idx] for s, idx in chosen.items()}  # seed -> rows of the kept train split
    task = type(task)(task.kind, [task.train[i] for i in keep], task.validation, test, task.label_names, task.source)
    return task, task.encode(tokenizer, budget["max_length"]), probes


def features(model, state, data) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of the train pool and the test split with ``state`` loaded (None: the bare encoder)."""
    if state is not None:
        state.load_into(model)
    try:
        return tuple(pooled(model, data[s].features, data[s].pad_token_id) for s in ("train", "test"))
    finally:
        if state is not None:
            lorakit.unwrap(model)


def labels(split) -> torch.Tensor:
    return torch.tensor([f["labels"] for f in split])


def probe_accuracy(feats, data, probe_idx, seed) -> float:
    x_train, x_test = feats
    y = labels(data["train"])
    head = fit_probe(x_train[probe_idx], y[probe_idx], 2, seed=seed)
    return accuracy(head, x_test, labels(data["test"]))


def probe_indices(train: list[dict], seed: int) -> list[int]:
    """Positions in ``train`` of the seed's probe examples (stratified)."""
    rows = [dict(r, index=i) for i, r in enumerate(train)]
    return [r["index"] for r in subsample(rows, PROBE, seed, "label")]


def retrieve(zoo: Zoo, description: str) -> tuple[list[str], float]:
    """Experts by description cosine, best first, and the seconds it took."""
    start = time.perf_counter()
    experts = zoo.entries("expert")
    sims = embed([e["description"] for e in experts]) @ embed([description])[0]
    order = [experts[i]["name"] for i in sims.argsort(descending=True).tolist()]
    return order, time.perf_counter() - start


def run_heldout(zoo, model, tokenizer, seeds, max_test, log) -> list[dict]:
    budget = zoo.index["budget"]
    rows = []
    generators = {}
    for seed in seeds:
        sg = SGLoRA(top_k=TOP_K, seed=seed).fit(zoo)
        icm = ICMLoRA(seed=seed).fit(zoo, model, tokenizer, {e["name"]: e["demos"] for e in zoo.entries("expert")})
        generators[seed] = (sg, icm)
        log(f"seed {seed}: SG-LoRA fitted in {sg.fit_seconds:.1f} s, ICM-LoRA in {icm.fit_seconds:.1f} s")
    for entry in zoo.entries("heldout"):
        name = entry["name"]
        task, data, probes = encoded(name, budget, tokenizer, max_test, seeds)
        ranked, t_retrieve = retrieve(zoo, entry["description"])
        start = time.perf_counter()
        merged = combine([zoo.state(n) for n in ranked[:TOP_K]], "cat", [1 / TOP_K] * TOP_K)
        t_merge = t_retrieve + time.perf_counter() - start
        fixed = {"base": (None, 0.0), "trained": (zoo.state(name), entry["metrics"]["train_seconds"]),
                 "retrieved": (zoo.state(ranked[0]), t_retrieve), "merge_topk": (merged, t_merge)}
        cached = {key: features(model, state, data) for key, (state, _) in fixed.items()}
        for seed in seeds:
            sg, icm = generators[seed]
            idx = probes[seed]
            out = {key: (cached[key], seconds) for key, (_, seconds) in fixed.items()}
            start = time.perf_counter()
            state = sg.generate(entry["description"])
            seconds = time.perf_counter() - start
            out["sg_lora"] = (features(model, state, data), seconds)
            start = time.perf_counter()
            demos = demonstrations([task.train[i] for i in idx], task.label_names, SHOTS)
            state = icm.generate(icm.task_vector(model, tokenizer, demos))
            seconds = time.perf_counter() - start
            out["icm_lora"] = (features(model, state, data), seconds)
            for key, (feats, seconds) in out.items():
                rows.append({"task": name, "seed": seed, "row": key, "accuracy": probe_accuracy(feats, data, idx, seed),
                             "seconds": seconds, "retrieved": ranked[0], "top_k": ranked[:TOP_K],
                             "sg_weights": sg.weights(entry["description"]) if key == "sg_lora" else None})
            rows.append({"task": name, "seed": seed, "row": "trained_own_head", "seconds": fixed["trained"][1],
                         "accuracy": entry["metrics"]["test_accuracy"]})
        log(f"{name}: done ({len(seeds)} seeds)")
    storage = {"icm_generator_bytes": generators[seeds[0]][1].nbytes(),
               "icm_factors": generators[seeds[0]][1].factors.basis.shape[0],
               "icm_adapter_bytes": generators[seeds[0]][1].adapter_bytes,
               "sg_generator_bytes": generators[seeds[0]][0].nbytes(),
               "fit_seconds": {str(s): {"sg_lora": g[0].fit_seconds, "icm_lora": g[1].fit_seconds}
                               for s, g in generators.items()}}
    return rows, storage, generators


def run_seen(zoo, tokenizer, generators, seen: int, max_test: int, log) -> list[dict]:
    """ICM-LoRA on tasks it was trained on: generated vs trained adapter, both through the task's own head."""
    budget = zoo.index["budget"]
    rows = []
    for entry in zoo.entries("expert")[:: max(1, len(zoo.entries("expert")) // seen)][:seen]:
        name = entry["name"]
        _, data, _ = encoded(name, budget, tokenizer, max_test)
        model = models.load(zoo.index["base"], num_labels=len(entry["labels"]))[0]
        trained = zoo.state(name, with_head=True)

        def test_accuracy(state) -> float:
            state.load_into(model)
            try:
                return evaluate(model, data["test"])["accuracy"]
            finally:
                lorakit.unwrap(model)

        trained_acc = test_accuracy(trained)  # the same adapter for every seed: evaluated once
        for seed, (_, icm) in generators.items():
            generated = icm.generate(icm.task_vector(model, tokenizer, entry["demos"]))
            generated = lorakit.AdapterState(trained.config, generated.tensors, trained.modules_to_save)
            rows.append({"task": name, "seed": seed, "row": "trained", "accuracy": trained_acc})
            rows.append({"task": name, "seed": seed, "row": "icm_lora", "accuracy": test_accuracy(generated)})
        log(f"seen {name}: done")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 seeds, 100 test examples per task, 4 seen tasks")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: 0,1,2 quick, 0..4 full)")
    p.add_argument("--seen", type=int, default=None, help="seen tasks for ICM-LoRA's own claim (default: 4 quick, all)")
    p.add_argument("--max-test", type=int, default=None, help="test examples per task (default: 100 quick, 200)")
    p.add_argument("--zoo", default="runs/zoo/minilm")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    args = p.parse_args(argv)
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    started, load_start, t0 = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), load_average(), time.time()
    seeds = [int(s) for s in (args.seeds or ("0,1,2" if args.quick else "0,1,2,3,4")).split(",")]
    zoo = Zoo.open(args.zoo)
    model, tokenizer = models.load(zoo.index["base"], num_labels=2)
    zoo.check_base(model)

    def log(msg):
        print(f"[{time.time() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)

    max_test = args.max_test or (100 if args.quick else zoo.index["budget"]["max_eval"])
    n_seen = args.seen or (4 if args.quick else len(zoo.entries("expert")))
    heldout, storage, generators = run_heldout(zoo, model, tokenizer, seeds, max_test, log)
    log("held-out stage done")
    seen = run_seen(zoo, tokenizer, generators, n_seen, max_test, log)
    result = {"command": command_line(), "quick": args.quick, "seeds": seeds, "machine": machine(),
              "started": started, "load_start": load_start, "load_end": load_average(),
              "wall_minutes": round((time.time() - t0) / 60, 1), "probe": PROBE, "max_test": max_test, "seen_tasks": n_seen, "shots": SHOTS, "top_k": TOP_K,
              "zoo": {"root": args.zoo, "base": zoo.index["base"], "budget": zoo.index["budget"],
                      "experts": len(zoo.entries("expert")), "heldout": [e["name"] for e in zoo.entries("heldout")],
                      "descriptions": {e["name"]: e["description"] for e in zoo.entries()}},
              "heldout": heldout, "seen": seen, "storage": storage}
    out = Path(args.out)
    write_json(out / "generation.json", result)
    report.write(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
