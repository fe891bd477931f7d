"""Systems benchmark: the early-exit cascade over adapters and the adapter-ensemble search, on MiniLM + tweets.

Per seed (the seed draws the super-adapter's initial weights, its training order and the searches' draws; the data
subsample and the base are the same for every seed, so the base's hidden states below the searched blocks are
computed once): ``lorakit.search`` trains the super-adapter and runs NEAS (shrinking + evolution), random search at
the same number of scored ensembles, and the best single adapter, all within one parameter budget; every result is
then scored on the test split. The NEAS members, exported as PEFT states, form an ``AdapterCascade``, calibrated
on the validation split for 5% risk and run on the test split under ``torch.utils.flop_counter``: coverage at 5%
risk (the paper's cov@5) and compute against the full ensemble and the single best member (best cov@5 on
validation). The same cascade is also built from members trained apart (other seeds; rank 8 on the searched
blocks), the paper's setting. Writes docs/benchmarks/systems.{json,md,png}; ``--quick`` is the size the page is built from.

    PYTHONPATH=src OMP_NUM_THREADS=1 python bench/systems.py --quick
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine, write_json  # noqa: E402
from systems_report import write  # noqa: E402

from lorakit import zoo  # noqa: E402
from lorakit.data import load_task  # noqa: E402
from lorakit.search import Ensemble, Member  # noqa: E402
from lorakit.search.run import SearchConfig, batches, encode_fixed, search, space_for, with_prefix  # noqa: E402
from lorakit.search.supernet import Evaluator, SuperAdapter  # noqa: E402
from lorakit.serve.cascade import AdapterCascade  # noqa: E402
from lorakit.serve.selective import coverage_at_risk, msp  # noqa: E402

SIZES = {"quick": dict(train=800, val=250, test=500, length=24, steps=150, evaluations=30, shrink_samples=6,
                       independent_steps=100),
         "full": dict(train=4000, val=1000, test=2000, length=48, steps=400, evaluations=60, shrink_samples=12,
                      independent_steps=400)}
RISK = 0.05


def flops(fn) -> tuple[float, object]:
    """(floating-point operations, result) of ``fn()``."""
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return float(counter.get_total_flops()), out


def cov(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return coverage_at_risk(msp(probs), probs.argmax(-1) == labels, RISK)[0]


def cascade_rows(base, states, val: dict, test: dict) -> dict:
    """The cascade against the full ensemble and each member on the test split: cov@5, accuracy, compute."""
    cascade = AdapterCascade(base, states)
    window = cascade.calibrate(batches(val), risk=RISK)
    val_probs = torch.cat([cascade.member_probs(b) for b in batches(val)], 1)
    best = max(range(len(states)), key=lambda k: cov(val_probs[k], val["labels"]))
    one = batches(test)[0]
    f_member, _ = flops(lambda: cascade.member_logits(0, {k: one[k] for k in ("input_ids", "attention_mask")}))
    f_shared, _ = flops(lambda: cascade.member_probs(one))
    per = len(one["labels"])
    f_cascade, outs = flops(lambda: [cascade(b) for b in batches(test)])
    probs = torch.cat([cascade.member_probs(b) for b in batches(test)], 1)
    out = {k: torch.cat([getattr(o, k) for o in outs]) for k in ("probs", "stages", "members")}
    labels, n, m = test["labels"], len(test["labels"]), len(states)
    acc = lambda p: float((p.argmax(-1) == labels).double().mean())  # noqa: E731
    ens = probs.mean(0)
    rows = {
        "single_best": {"cov5": cov(probs[best], labels), "acc": acc(probs[best]), "member_forwards": 1.0,
                        "flops": f_member / per, "member": best},
        "member0": {"cov5": cov(probs[0], labels), "acc": acc(probs[0]), "member_forwards": 1.0, "flops": f_member / per},
        "ensemble": {"cov5": cov(ens, labels), "acc": acc(ens), "member_forwards": float(m),
                     "flops": m * f_member / per, "flops_shared_prefix": f_shared / per},
        "cascade": {"cov5": coverage_at_risk(msp(out["probs"]), out["probs"].argmax(-1) == labels, RISK)[0],
                    "acc": acc(out["probs"]), "member_forwards": float(out["members"].double().mean()),
                    "flops": f_cascade / n, "stage2_share": float((out["stages"] == 2).double().mean())},
    }
    return {"rows": rows, "window": window.to_dict(), "shared_blocks": cascade.shared, "members": m}


def independent(clean, data: dict, config: SearchConfig, steps: int) -> list:
    """M members trained apart (seeds 1000 x seed + k): rank 8 on query and value of the searched blocks, own head."""
    full = space_for(clean, dataclasses.replace(config, members=1, ranks=(8,)))
    only = dataclasses.replace(full, modules=((tuple(config.targets),),))
    one = Ensemble(config.layers, (Member(8, tuple(config.targets)),))
    states = []
    for k in range(config.members):
        seed = 1000 * config.seed + k
        sup = SuperAdapter(copy.deepcopy(clean), only, 8, config.alpha, seed=seed)
        sup.train(data["train"], steps, config.batch_size, config.lr, seed)
        states.append(sup.export(one, 0, "minilm"))
    return states


def run_seed(clean, tok, data: dict, config: SearchConfig, independent_steps: int) -> dict:
    """One seed: search, score the three searches on test, and the cascade of the NEAS members."""
    t0 = time.time()
    model = copy.deepcopy(clean)
    found = search(model, data["train"], data["validation"], config)
    test = Evaluator(found.sup, data["test"])
    labels = data["test"]["labels"]
    ens_acc = lambda e: float((test.ensemble(e).mean(0).argmax(-1) == labels).double().mean())  # noqa: E731
    space = found.space
    searched = {
        "neas": {**space.describe(found.neas.best), "val": found.neas.fitness, "test": ens_acc(found.neas.best),
                 "scored": len(found.neas.history), "within_budget": all(space.params(e) <= config.budget
                                                                        for e, _, _ in found.neas.history)},
        "random": {**space.describe(found.random.best), "val": found.random.fitness, "test": ens_acc(found.random.best),
                   "scored": len(found.random.history), "within_budget": all(space.params(e) <= config.budget
                                                                            for e, _, _ in found.random.history)},
        "single": {"rank": found.single[0].rank, "modules": list(found.single[0].modules), "val": found.single[1],
                   "params": space.layers * space.per_block(found.single[0]) + space.head,
                   "test": test.single(found.single[0])},
    }
    states = [found.sup.export(found.neas.best, k, "minilm") for k in range(config.members)]
    strip = lambda d: {k: v for k, v in d.items() if k != "prefix"}  # noqa: E731
    casc = cascade_rows(clean, states, strip(data["validation"]), strip(data["test"]))
    apart = cascade_rows(clean, independent(clean, data, config, independent_steps), strip(data["validation"]),
                         strip(data["test"]))
    return {"search": searched, "cascade": casc, "cascade_independent": apart, "loss_first": sum(found.losses[:10]) / 10,
            "loss_last": sum(found.losses[-10:]) / 10, "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the page's size (about 10 minutes on one CPU core)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--budget", type=int, default=40_000, help="parameters of all members' adapters and heads")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "benchmarks"))
    args = ap.parse_args(argv)
    size = SIZES["quick" if args.quick else "full"]
    torch.manual_seed(0)
    task = load_task("tweets").subsampled(size["train"], max(size["val"], size["test"]), seed=0)
    clean, tok = zoo.load("minilm", "seq_cls", num_labels=task.num_labels)
    clean.eval()
    splits = {"train": task.train, "validation": task.validation[:size["val"]], "test": task.test[:size["test"]]}
    config = SearchConfig(members=args.members, budget=args.budget, layers=2, targets=("query", "value"), lr=3e-3,
                          steps=size["steps"], evaluations=size["evaluations"], shrink_samples=size["shrink_samples"])
    space_for(clean, config).check_budget(args.budget)
    # the base's hidden states below the searched blocks: the same for every seed, computed once
    probe = SuperAdapter(copy.deepcopy(clean), space_for(clean, config), 1, 1.0)
    t0 = time.time()
    data = {k: with_prefix(probe, encode_fixed(v, tok, size["length"])) for k, v in splits.items()}
    prefix_s = round(time.time() - t0, 1)
    seeds = {}
    for seed in range(args.seeds):
        seeds[seed] = run_seed(clean, tok, data, dataclasses.replace(config, seed=seed), size["independent_steps"])
        print(f"seed {seed}: {seeds[seed]['seconds']} s", flush=True)
    result = {"settings": {**size, "members": args.members, "budget": args.budget, "risk": RISK, "layers": 2,
                           "targets": ["query", "value"], "ranks": list(config.ranks), "lr": config.lr, "model": "minilm",
                           "task": "tweets", "quick": args.quick, "prefix_seconds": prefix_s},
              "seeds": seeds, "machine": machine(), "command": command_line()}
    out = Path(args.out)
    write_json(out / "systems.json", result)
    print(write(out, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
