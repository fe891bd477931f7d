"""The ``lorakit`` command: train, eval, info, merge, prune, fed, serve, methods, demo (``lorakit COMMAND --help`` for each).

User errors (a bad path, an unknown name, a file that does not fit) print one line to stderr and exit with
status 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

USER_ERRORS = (FileNotFoundError, FileExistsError, KeyError, ValueError, TypeError, ImportError, NotImplementedError)


class UserError(Exception):
    """An error the user can fix; printed as one line."""


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def cmd_info(args: argparse.Namespace) -> int:
    """Describe an adapter directory."""
    import lorakit

    path = Path(args.adapter_dir)
    state = lorakit.load_state(path, args.adapter_name, allow_pickle=args.allow_pickle)
    cfg = state.config
    ranks = sorted({state.module_config(p).r for p in state.modules()})
    files = [f for f in (path / (args.adapter_name or "")).iterdir() if f.is_file()]
    rows = [
        ("method", cfg.method_name),
        ("peft_type", cfg.peft_type),
        ("base model", cfg.base_model_name_or_path or "(not recorded)"),
        ("rank", str(cfg.r) + (f" (per module: {', '.join(map(str, ranks))})" if ranks != [cfg.r] else "")),
        ("lora_alpha", str(getattr(cfg, "lora_alpha", "-")) + (" (rsLoRA)" if getattr(cfg, "use_rslora", False) else "")),
        ("targets", ", ".join(cfg.target_modules) if isinstance(cfg.target_modules, list) else str(cfg.target_modules)),
        ("adapted modules", str(len(state.modules()))),
        ("modules_to_save", ", ".join(state.modules_to_save) or "-"),
        ("parameters", f"{state.num_parameters():,}"),
        ("size on disk", _human_bytes(sum(f.stat().st_size for f in files))),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"{path}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """Print the method registry as a table."""
    import lorakit

    rows = [("name", "peft_type", "layers", "trainable params / layer", "summary")]
    for name in lorakit.METHODS.names():
        m = lorakit.METHODS.get(name)
        cls = m.adapter_classes[0]
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        layers = ", ".join(sorted({t.__name__ for t in m.layer_types}))
        rows.append((name, m.config_class.peft_type, layers, cls.param_formula or "-", doc[:70]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from . import jobs

    jobs.train_job(args)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from . import jobs

    jobs.eval_job(args)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from . import jobs

    jobs.demo(args)
    return 0


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="minilm", help="zoo name or local HF model directory (default: minilm)")
    p.add_argument("--task", default="tweets", help="bundled task name or a local JSONL/CSV/datasets path (default: tweets)")
    p.add_argument("--kind", choices=["classification", "causal_lm"], default="classification")
    p.add_argument("--max-train", type=int, default=None, help="subsample the training split to this many examples")
    p.add_argument("--max-eval", type=int, default=None, help="subsample validation and test splits")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune an adapter on a task and save it in PEFT format")
    _train_args(p)
    p.add_argument("--method", default="lora", help="registered method (see `lorakit methods`)")
    p.add_argument("-r", "--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--targets", default="query,key,value", help="comma-separated module names, or a regex")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("-o", "--out", default="runs/train", help="output directory (adapter in OUT/adapter)")
    p.set_defaults(func=cmd_train)
    from .compress import cli as compress_cli

    compress_cli.add_train_arguments(p, cmd_train)
    compress_cli.add_prune_parser(sub, _train_args)

    p = sub.add_parser("eval", help="evaluate a saved adapter on a task split")
    _train_args(p)
    p.add_argument("adapter_dir", help="PEFT adapter directory (lorakit or peft)")
    p.add_argument("--split", default="test", choices=["validation", "test"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--allow-pickle", action="store_true", help="read adapter_model.bin (unpickling can run code)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("info", help="describe an adapter directory")
    p.add_argument("adapter_dir")
    p.add_argument("--adapter-name", default=None, help="sub-folder of a multi-adapter directory")
    p.add_argument("--allow-pickle", action="store_true", help="read adapter_model.bin (unpickling can run code)")
    p.set_defaults(func=cmd_info)

    from .merging import cli as merge_cli

    p = sub.add_parser("merge", help="merge adapters into one LoRA adapter (PEFT format)")
    merge_cli.add_arguments(p)
    p.set_defaults(func=merge_cli.run)

    from .federated import cli as fed_cli
    from .serve import cli as serve_cli

    p = sub.add_parser("fed", help="federated LoRA on Flower: the bundled experiment or your own settings")
    fed_cli.add_arguments(p)
    p.set_defaults(func=fed_cli.run)

    serve_cli.add_parser(sub)

    p = sub.add_parser("methods", help="list the registered adapter methods")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("demo", help="fine-tune LoRA on MiniLM for tweet sentiment and compare with a head-only baseline")
    p.add_argument("-o", "--out", default="runs/demo")
    p.add_argument("--max-train", type=int, default=None, help="training examples (default: the demo's budget)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def _version() -> str:
    from . import __version__

    return f"lorakit {__version__}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except USER_ERRORS as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"lorakit {args.command}: error: {msg.splitlines()[0] if msg else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorakit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
