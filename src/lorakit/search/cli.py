"""Search K-member adapter ensembles under a parameter budget (NEAS-style) for an early-exit cascade.

``lorakit search-ensemble`` writes the members as PEFT directories and a calibrated cascade spec
(``lorakit serve --cascade NAME=OUT/cascade.json``). The base model loads with the zoo's default weights (seed 0),
so the spec's members fit the base that ``AdapterCascade.from_spec`` loads; ``--seed`` draws the subsample, the
super-adapter's initial weights, its data order and the searches.

Every flag and the budget are checked before the model trains; a budget below the smallest ensemble of the space
is refused naming the budget and that minimum.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..core.outputs import check_output, staged


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, found {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected whole numbers >= 1, found {text!r}")
    return values


def add_parser(sub, common, count) -> None:
    """Register ``search-ensemble`` (``common`` adds --model/--task/... as ``lorakit train`` has them)."""
    p = sub.add_parser("search-ensemble", help="search adapter ensembles under a parameter budget (NEAS) for a cascade",
                       description=__doc__.splitlines()[0])
    common(p)
    p.set_defaults(max_length=32)
    for action in p._actions:
        if action.dest == "seed":
            action.help = "seed of the subsample, the super-adapter's weights, its data order and the searches"
    p.add_argument("--members", type=count, default=3, help="ensemble size K")
    p.add_argument("--budget", type=count, required=True, help="parameters of all members' adapters and heads together")
    p.add_argument("--layers", type=count, default=2, help="searched blocks (the top ones); the base below runs once")
    p.add_argument("--targets", default="query,value", help="comma-separated module kinds members may adapt")
    p.add_argument("--ranks", type=_ints, default=(1, 2, 4, 8), help="rank choices (DyLoRA slices of the largest)")
    p.add_argument("--alpha", type=float, default=16.0, help="lora_alpha (scale alpha / rank)")
    p.add_argument("--steps", type=count, default=200, help="super-adapter training steps")
    p.add_argument("--batch-size", type=count, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--evaluations", type=count, default=40, help="ensembles scored by each search (equal budget)")
    p.add_argument("--shrink-rounds", type=int, default=2, help="diversity-guided shrinking rounds (0: none)")
    p.add_argument("--shrink-samples", type=count, default=10, help="ensembles scored per shrinking round")
    p.add_argument("--diversity-weight", type=float, default=0.5, help="lambda in accuracy + lambda x disagreement")
    p.add_argument("--risk", type=float, default=0.05, help="the cascade's target risk (selective classification)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("-o", "--out", default="runs/search", help="output directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import jobs, zoo
    from ..core import fingerprint
    from ..formats.peft import save_state
    from ..serve.cascade import AdapterCascade, write_spec
    from .run import SearchConfig, batches, encode_fixed, search, space_for

    if not 0 < args.risk < 1:
        raise ValueError(f"--risk {args.risk}: expected a value in (0, 1)")
    if args.kind != "classification":
        raise ValueError("search-ensemble searches classifiers: --kind classification")
    out = check_output(args.out, overwrite=args.overwrite)
    config = SearchConfig(members=args.members, budget=args.budget, layers=args.layers,
                          targets=tuple(jobs._targets(args.targets)), ranks=args.ranks, alpha=args.alpha,
                          steps=args.steps, batch_size=args.batch_size, lr=args.lr, evaluations=args.evaluations,
                          shrink_rounds=args.shrink_rounds, shrink_samples=args.shrink_samples,
                          diversity_weight=args.diversity_weight, seed=args.seed)
    from ..data import load_task

    jobs._quiet_transformers()
    task = load_task(args.task, kind=args.kind).subsampled(args.max_train, args.max_eval, seed=args.seed)
    model, tokenizer = zoo.load(args.model, "seq_cls", num_labels=task.num_labels)
    space = space_for(model, config)
    space.check_budget(config.budget)  # refused here, before anything trains
    base_record = fingerprint.record(model)
    train, val = (encode_fixed(split, tokenizer, args.max_length) for split in (task.train, task.validation))
    found = search(model, train, val, config, space)
    best = found.neas.best
    summary = {"budget": config.budget, "members": config.members,
               "neas": {**space.describe(best), "val_accuracy": found.neas.fitness, "scored": len(found.neas.history)},
               "random": {**space.describe(found.random.best), "val_accuracy": found.random.fitness,
                          "scored": len(found.random.history)},
               "best_single": {"rank": found.single[0].rank, "modules": list(found.single[0].modules),
                               "val_accuracy": found.single[1]},
               "final_loss": sum(found.losses[-10:]) / len(found.losses[-10:])}
    base, _ = zoo.load(args.model, "seq_cls", num_labels=task.num_labels)
    with staged(out) as tmp:
        dirs = [save_state(found.sup.export(best, k, args.model), tmp / f"member{k}", base=base_record)
                for k in range(config.members)]
        cascade = AdapterCascade(base, dirs, tokenizer=tokenizer, max_length=args.max_length)
        window = cascade.calibrate(batches(val), risk=args.risk)
        write_spec(tmp / "cascade.json", args.model, dirs, window, label_names=task.label_names,
                   max_length=args.max_length)
        (tmp / "search.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"lorakit search-ensemble: wrote {config.members} members and {Path(out) / 'cascade.json'}")
    return 0
