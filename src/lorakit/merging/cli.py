"""``lorakit merge A B C --method lego --rank 16 --weights 0.5 0.3 0.2 -o OUT``: merge adapter directories.

The ``lorakit`` command hooks it in with ``p = sub.add_parser("merge"); add_arguments(p); p.set_defaults(func=run)``,
or calls ``cli_main(argv)`` with the arguments after ``merge``. User errors print one line to stderr and return 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..formats.peft import AdapterFileError, load_state, save_state
from .combine import combine
from .protocol import MERGERS, MergeError

USER_ERRORS = (MergeError, AdapterFileError, FileNotFoundError, KeyError, ValueError, TypeError)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``merge`` command's arguments to ``p``."""
    p.add_argument("adapters", nargs="+", help="adapter directories (PEFT or lorakit format)")
    p.add_argument("--method", required=True, help=f"merge method: {', '.join(MERGERS.names())}")
    p.add_argument("--weights", nargs="+", help="one weight per adapter, spaces or commas (default: 1 each)")
    p.add_argument("--rank", type=int, help="rank of the merged adapter (lego: the number of clusters)")
    p.add_argument("--density", type=float, help="fraction of entries kept (ties, dare_*, magnitude_prune, knots)")
    p.add_argument("--majority", choices=["total", "frequency"], help="sign election (ties, dare_ties, knots)")
    p.add_argument("--seed", type=int, help="seed of the random methods (dare_*, knots, lego)")
    p.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE", help="any other setting, e.g. inner=dare_ties")
    p.add_argument("--modules-to-save", default=None, help="when modules_to_save differ: 'drop', 'mean' or an adapter index")
    p.add_argument("--allow-pickle", action="store_true", help="read adapter_model.bin files (unpickling can run code)")
    p.add_argument("-o", "--out", required=True, help="output adapter directory")


def _value(text: str):
    low = text.lower()
    if low in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[low]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def run(args: argparse.Namespace) -> int:
    """Load, merge and save; prints one summary line."""
    weights = [float(w) for item in args.weights for w in item.split(",") if w] if args.weights else None
    knobs = {k: getattr(args, k) for k in ("rank", "density", "majority") if getattr(args, k) is not None}
    for item in args.set:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise MergeError(f"--set {item!r}: expected KNOB=VALUE")
        knobs[key.strip().replace("-", "_")] = _value(text.strip())
    policy = args.modules_to_save
    policy = int(policy) if policy is not None and policy.lstrip("-").isdigit() else policy
    states = [load_state(d, allow_pickle=args.allow_pickle) for d in args.adapters]
    merged = combine(states, args.method, weights, modules_to_save=policy, seed=args.seed, **knobs)
    path = save_state(merged, args.out)
    ranks = sorted({merged.module_config(p).r for p in merged.modules()})
    print(f"merged {len(states)} adapters with {args.method} into {path} "
          f"({len(merged.modules())} modules, rank {'/'.join(map(str, ranks))})")
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
    """``lorakit merge`` as a function: ``argv`` are the arguments after ``merge``; returns the exit status."""
    parser = _Parser(prog="lorakit merge", description="Merge adapter directories into one LoRA adapter (see docs/merging.md).")
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed
        return int(e.code or 0)
    try:
        return run(args)
    except USER_ERRORS as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"lorakit merge: error: {(msg.splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        return 2
