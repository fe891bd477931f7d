"""``lorakit merge A B C --method lego --rank 16 --weights 0.5 0.3 0.2 -o OUT``: merge adapter directories.

The ``lorakit`` command hooks it in with ``p = sub.add_parser("merge"); add_arguments(p); p.set_defaults(func=run)``,
or calls ``cli_main(argv)`` with the arguments after ``merge``. User errors print one line to stderr and return 2.
``-o`` may not name (or lie inside, or contain) an input, nor an existing path unless ``--overwrite``; the result
appears whole or not at all. Inputs must record the same base model: compared by their base records
(architecture, shapes, weight fingerprint) where every input has one, else by the recorded names.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..core import fingerprint
from ..core.outputs import OutputError, check_output, staged
from ..formats.peft import AdapterFileError, load_state, read_base, save_state
from .combine import combine
from .protocol import MERGERS, MergeError

USER_ERRORS = (MergeError, AdapterFileError, OutputError, FileNotFoundError, KeyError, ValueError, TypeError)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``merge`` command's arguments to ``p``."""
    p.add_argument("adapters", nargs="+", help="adapter directories (PEFT or lorakit format), or entry names with --library")
    p.add_argument("--library", default=None, metavar="DIR", help="resolve the adapters as entries of this library")
    p.add_argument("--method", required=True, help=f"merge method: {', '.join(MERGERS.names())}")
    p.add_argument("--weights", nargs="+", help="one weight per adapter, spaces or commas (default: 1 each)")
    p.add_argument("--rank", type=int, help="rank of the merged adapter (lego: the number of clusters) "
                                            "(default: the method's)")
    p.add_argument("--density", type=float, help="fraction of entries kept (ties, dare_*, magnitude_prune, knots) "
                                                 "(default: the method's)")
    p.add_argument("--majority", choices=["total", "frequency"], help="sign election (ties, dare_ties, knots) "
                                                                      "(default: the method's)")
    p.add_argument("--seed", type=int, help="seed of the random methods (dare_*, knots, lego) (default: the method's)")
    p.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE", help="any other setting, e.g. inner=dare_ties")
    p.add_argument("--modules-to-save", default=None,
                   help="modules_to_save: 'drop', 'mean' or an adapter index (default: kept where the adapters "
                        "agree, refused where they differ)")
    p.add_argument("--allow-pickle", action="store_true", help="read adapter_model.bin files (unpickling can run code)")
    p.add_argument("-o", "--out", required=True, help="output adapter directory (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (never an input)")


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
    dirs = args.adapters
    if args.library:  # entries made for different bases are refused below, naming both fingerprints
        from ..library.cli import resolve

        dirs = [resolve(args.library, name) for name in args.adapters]
    out = check_output(args.out, inputs=dirs, overwrite=args.overwrite)
    states = [load_state(d, allow_pickle=args.allow_pickle) for d in dirs]
    states, base = _same_base(states, [read_base(d) for d in dirs], dirs)
    merged = combine(states, args.method, weights, modules_to_save=policy, seed=args.seed, **knobs)
    with staged(out) as tmp:
        save_state(merged, tmp, base=base)
    path = out
    ranks = sorted({merged.module_config(p).r for p in merged.modules()})
    print(f"merged {len(states)} adapters with {args.method} into {path} "
          f"({len(merged.modules())} modules, rank {'/'.join(map(str, ranks))})")
    return 0


def _same_base(states: list, records: list, dirs: Sequence[str]) -> tuple[list, dict | None]:
    """Refuse inputs made for different base models; returns the states (one base name) and the base record."""
    if any(r is None for r in records):
        return states, None  # some inputs record no base: combine compares the recorded names
    for d, r in zip(dirs[1:], records[1:]):
        diff = fingerprint.mismatch(records[0], r)
        if diff:
            raise MergeError(f"{dirs[0]} and {d} were made for different base models (fingerprints "
                             f"{records[0]['fingerprint']} and {r['fingerprint']}): {diff}")
    name = next((s.config.base_model_name_or_path for s in states if s.config.base_model_name_or_path), None)
    return [s.replace(base_model_name_or_path=name) for s in states], records[0]


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
    """``lorakit merge`` as a function: ``argv`` are the arguments after ``merge``; returns the exit status."""
    from ..cli import Parser

    parser = Parser(prog="lorakit merge", description="Merge adapter directories into one LoRA adapter (see docs/merging.md).")
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
