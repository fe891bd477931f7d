"""lorakit: low-rank adapters for PyTorch and Hugging Face models; `lorakit COMMAND --help` describes each command.

User errors (a bad path, an unknown name, a file that does not fit, an output that would overwrite something)
print one line to stderr and exit with status 2; anything else is a bug and keeps its traceback. No command
overwrites an input, or an existing output without ``--overwrite``; ``--help`` shows every option's default.
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


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to each option's help unless the help already states its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "(default" in help_text or action.default is argparse.SUPPRESS or action.required:
            return help_text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help (and every sub-command's) shows the defaults."""

    def __init__(self, *args, formatter_class=DefaultsFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def _add_action(self, action: argparse.Action) -> argparse.Action:
        if action.help is None and action.option_strings and action.default is not argparse.SUPPRESS:
            action.help = "(default: %(default)s)"  # argparse prints no line at all for an option without help
        return super()._add_action(action)

    def error(self, message: str) -> None:
        """A usage error: one line on stderr (``--help`` shows the usage), exit status 2."""
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def count(text: str) -> int:
    """An argparse type: a whole number >= 1 ("0", "-1" and "1.5" are refused)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, found {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, found {value}")
    return value


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def cmd_export(args: argparse.Namespace) -> int:
    """Write an adapter as a llama.cpp GGUF LoRA file."""
    import lorakit

    from .formats.gguf_lora import export_gguf

    state = lorakit.load_state(args.adapter_dir, allow_pickle=args.allow_pickle)
    model = args.model or state.config.base_model_name_or_path
    if not model:
        raise UserError(f"{args.adapter_dir} records no base model; pass --model (zoo name or HF model directory)")
    if Path(model).is_dir():
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
    else:
        from . import zoo

        config = zoo.load(model, "causal_lm")[0].config
    out = export_gguf(state, config, args.out, args.outtype, overwrite=args.overwrite)
    print(f"lorakit export: wrote {out} ({len(state.modules())} modules, {args.outtype}); "
          f"run it with llama.cpp: llama-cli -m BASE.gguf --lora {out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Describe an adapter directory."""
    import lorakit

    from .formats.peft import read_base

    path = Path(args.adapter_dir)
    state = lorakit.load_state(path, args.adapter_name, allow_pickle=args.allow_pickle)
    base = read_base(path, args.adapter_name)
    cfg = state.config
    ranks = sorted({state.module_config(p).r for p in state.modules()})
    files = [f for f in (path / (args.adapter_name or "")).iterdir() if f.is_file()]
    rows = [
        ("method", cfg.method_name),
        ("peft_type", cfg.peft_type),
        ("base model", cfg.base_model_name_or_path or "(not recorded)"),
        ("base fingerprint", f"{base['fingerprint']} ({base['architecture']})" if base else "(not recorded)"),
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


def _train_args(p: argparse.ArgumentParser, model_help: str = "zoo name or local HF model directory") -> None:
    p.add_argument("--model", default="minilm", help=model_help)
    p.add_argument("--task", default="tweets", help="bundled task name or a local JSONL/CSV/datasets path")
    p.add_argument("--kind", choices=["classification", "causal_lm"], default="classification", help="task kind")
    p.add_argument("--max-train", type=count, default=None, help="subsample the training split (default: all)")
    p.add_argument("--max-eval", type=count, default=None, help="subsample validation and test splits (default: all)")
    p.add_argument("--max-length", type=count, default=64, help="tokens per example")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsampling, the head and the data order")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lorakit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    from .optim import cli as optim_cli

    p = sub.add_parser("train", help="fine-tune an adapter on a task and save it in PEFT format")
    _train_args(p)
    p.add_argument("--method", default="lora", help="registered method (see `lorakit methods`)")
    p.add_argument("-r", "--rank", type=count, default=8, help="adapter rank")
    p.add_argument("--alpha", type=float, default=16, help="lora_alpha (scaling alpha / r)")
    p.add_argument("--dropout", type=float, default=0.0, help="lora_dropout")
    p.add_argument("--targets", default="query,key,value", help="comma-separated module names, or a regex")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    p.add_argument("--batch-size", type=count, default=16, help="examples per optimiser step")
    p.add_argument("--epochs", type=count, default=1, help="passes over the training split")
    p.add_argument("--max-steps", type=count, default=None, help="stop after this many steps (default: --epochs)")
    p.add_argument("--eval-every", type=count, default=50, help="evaluate and checkpoint every N steps")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (its settings must match)")
    p.add_argument("--overwrite", action="store_true", help="replace a run or files already in --out")
    p.add_argument("-o", "--out", default="runs/train", help="run directory (adapter in OUT/adapter)")
    p.add_argument("--pack", action="store_true",
                   help="causal_lm: pack training examples into rows of --max-length tokens (each attends to itself)")
    p.add_argument("--eval-generate", type=count, default=None, metavar="N",
                   help="causal_lm: also score greedy answers to N test prompts (exact match, token F1)")
    optim_cli.add_train_arguments(p)
    p.set_defaults(func=cmd_train)
    from .compress import cli as compress_cli

    compress_cli.add_train_arguments(p, cmd_train)
    compress_cli.add_prune_parser(sub, _train_args)
    from .train import multi_cli

    multi_cli.add_parser(sub, lambda train=p: train.parse_args([]))

    p = sub.add_parser("eval", help="evaluate a saved adapter on a task split")
    _train_args(p, model_help="zoo name or local HF model directory (default: the base model the adapter records, "
                              "else minilm)")
    p.set_defaults(model=None)
    p.add_argument("adapter_dir", help="PEFT adapter directory (lorakit or peft), or an entry name with --library")
    p.add_argument("--library", default=None, metavar="DIR", help="resolve adapter_dir as an entry of this library")
    p.add_argument("--split", default="test", choices=["validation", "test"], help="split to evaluate")
    p.add_argument("--batch-size", type=count, default=64, help="examples per forward pass")
    p.add_argument("--allow-pickle", action="store_true", help="read adapter_model.bin (unpickling can run code)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write an adapter for llama.cpp (--gguf)")
    p.add_argument("adapter_dir", help="PEFT adapter directory (lorakit or peft)")
    p.add_argument("--gguf", action="store_true", required=True, help="a GGUF LoRA file (llama-cli --lora FILE)")
    p.add_argument("-o", "--out", required=True, help="output .gguf file")
    p.add_argument("--model", default=None, help="the base (zoo name or HF directory; default: the one the adapter records)")
    p.add_argument("--outtype", choices=["f32", "f16"], default="f32", help="tensor type in the file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--allow-pickle", action="store_true", help="read adapter_model.bin (unpickling can run code)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="describe an adapter directory")
    p.add_argument("adapter_dir", help="PEFT adapter directory (lorakit or peft)")
    p.add_argument("--adapter-name", default=None, help="sub-folder of a multi-adapter directory (default: none)")
    p.add_argument("--allow-pickle", action="store_true", help="read adapter_model.bin (unpickling can run code)")
    p.set_defaults(func=cmd_info)

    from .merging import cli as merge_cli

    p = sub.add_parser("merge", help="merge adapters into one LoRA adapter (PEFT format)")
    merge_cli.add_arguments(p)
    p.set_defaults(func=merge_cli.run)

    from .search import cli as search_cli

    search_cli.add_parser(sub, _train_args, count)

    from .federated import cli as fed_cli
    from .serve import cli as serve_cli

    p = sub.add_parser("fed", help="federated LoRA on Flower: the bundled experiment or your own settings")
    fed_cli.add_arguments(p)
    p.set_defaults(func=fed_cli.run, user_errors=fed_cli.USER_ERRORS)

    serve_cli.add_parser(sub)
    from .library import cli as library_cli

    library_cli.add_parser(sub)

    from .per_user import cli as per_user_cli

    per_user_cli.add_parser(sub)
    from .generate import cli as generate_cli

    generate_cli.add_parser(sub)
    from .transfer import cli as transfer_cli

    transfer_cli.add_parser(sub)

    from .diffusion import cli as diffusion_cli

    diffusion_cli.add_parser(sub)

    p = sub.add_parser("methods", help="list the registered adapter methods")
    p.set_defaults(func=cmd_methods)
    optim_cli.add_parser(sub)

    p = sub.add_parser("demo", help="fine-tune LoRA on MiniLM for tweet sentiment and compare with a head-only baseline")
    p.add_argument("-o", "--out", default="runs/demo", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--max-train", type=count, default=None, help="training examples (default: the demo's budget)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and the head")
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
    except USER_ERRORS + getattr(args, "user_errors", ()) as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"lorakit {args.command}: error: {msg.splitlines()[0] if msg else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorakit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
