"""``lorakit optimizers`` and the training options of ``lorakit train``: --optimizer, --schedule, precision,
gradient checkpointing and device.

Hook into the main parser with ``add_parser(subparsers)`` and ``add_train_arguments(train_parser)``; the train job
calls ``check(args)`` before loading anything, then ``fit_options(args)`` and ``schedule_from_args(args, splits)``.
"""
from __future__ import annotations

import argparse
import ast
import inspect

FULL_WEIGHT_SCHEDULES = ("lisa",)  # schedules that train the model's own weights, not an adapter


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``optimizers`` subcommand."""
    p = subparsers.add_parser("optimizers", help="list the registered optimisers and training schedules")
    p.set_defaults(func=run)
    return p


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The optimiser, schedule, precision, checkpointing and device options of ``lorakit train``."""
    p.add_argument("--optimizer", default="adamw", help="registered optimiser (see `lorakit optimizers`; default: adamw)")
    p.add_argument("--optimizer-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the optimiser, e.g. lr_ratio=16 for lora_plus (repeatable)")
    p.add_argument("--schedule", default=None, help="training schedule: lisa, increlora or diffora (default: none)")
    p.add_argument("--schedule-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the schedule, e.g. gamma=2 for lisa, budget=48 for increlora (repeatable)")
    p.add_argument("--gradient-checkpointing", nargs="?", const="full", default=False, choices=["full", "selective"],
                   help="recompute activations in backward: every block (full, the default when given without a value) "
                        "or only each block's attention core and FFN widening (selective: less time, more memory)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CPU or CUDA)")
    p.add_argument("--fp16", action="store_true", help="float16 autocast with loss scaling (CUDA only)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="default: auto")


def parse_options(pairs: list[str], what: str) -> dict:
    """KEY=VALUE strings as a dict; values are Python literals where they parse (numbers, True, None)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--{what}-option expects KEY=VALUE, got {pair!r}")
        try:
            out[key.strip().replace("-", "_")] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip().replace("-", "_")] = value
    return out


def check(args: argparse.Namespace) -> None:
    """Unknown names and conflicting flags, before any model is loaded."""
    from ..train.schedules import SCHEDULES
    from . import OPTIMIZERS

    OPTIMIZERS.get(getattr(args, "optimizer", "adamw"))
    if getattr(args, "schedule", None):
        SCHEDULES.get(args.schedule)
    if getattr(args, "bf16", False) and getattr(args, "fp16", False):
        raise ValueError("--bf16 and --fp16 exclude each other; pick one")


def fit_options(args: argparse.Namespace) -> dict:
    """The ``fit`` keywords these options set."""
    precision = "bf16" if getattr(args, "bf16", False) else "fp16" if getattr(args, "fp16", False) else "fp32"
    return dict(optimizer=getattr(args, "optimizer", "adamw"),
                optimizer_options=parse_options(getattr(args, "optimizer_option", []), "optimizer"),
                precision=precision, gradient_checkpointing=getattr(args, "gradient_checkpointing", False))


def schedule_from_args(args: argparse.Namespace, splits: dict):
    """The schedule --schedule names, or None; DiffoRA's gates learn on the validation split."""
    from ..train.schedules import create

    name = getattr(args, "schedule", None)
    if not name:
        return None
    options = {"seed": args.seed, **parse_options(getattr(args, "schedule_option", []), "schedule")}
    if name == "diffora":
        options.setdefault("search_data", splits["validation"])
    return create(name, **options)


def run(args: argparse.Namespace) -> int:
    """Print the optimisers and schedules with their options."""
    from ..train.schedules import SCHEDULES
    from . import OPTIMIZERS

    rows = [("kind", "name", "options", "summary")]
    for registry, kind, hook in ((OPTIMIZERS, "optimiser", "from_model"), (SCHEDULES, "schedule", "__init__")):
        for name in registry.names():
            entry = registry.get(name)
            params = inspect.signature(getattr(entry, hook)).parameters.values()
            opts = [f"{p.name}={p.default}" for p in params
                    if p.name not in ("self", "model", "lr", "weight_decay", "search_data", "collate")]
            rows.append((kind, name, " ".join(opts) or "-", entry.summary))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
        if i == 0:
            print("  ".join("-" * w for w in widths) + "  " + "-" * 7)
    return 0
