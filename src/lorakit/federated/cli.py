"""``lorakit fed``: run the bundled federated experiment, or write the Flower app for ``flwr run``.

``lorakit fed run [--engine simulation|deployment|inprocess] [--strategy flora] [--num-rounds 20] ...`` runs the
tweets task over 10 clients with a Dirichlet label skew (every run-config key is an option) and writes
``OUT/history.json``; ``lorakit fed app DIR`` writes a Flower app directory to submit with ``flwr run DIR``.
The ``lorakit`` command hooks it in with ``p = sub.add_parser("fed"); add_arguments(p); p.set_defaults(func=run)``,
or calls ``cli_main(argv)`` with the arguments after ``fed``. ``python -m lorakit.federated`` is the same.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from .aggregation import STRATEGIES
from .experiment import Settings

ENGINES = ("simulation", "deployment", "inprocess")


def _settings_options(p: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(Settings):
        if f.name in ("out_dir",):
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"default: {f.default!r}"
        if f.name == "strategy":
            help_text += f"; one of {', '.join(STRATEGIES.names())}"
        p.add_argument(flag, type=type(f.default), default=None, help=help_text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``fed`` command's sub-commands and options to ``p``."""
    sub = p.add_subparsers(dest="fed_command", required=True, metavar="{run,app}")
    run_p = sub.add_parser("run", help="run the federated experiment and write OUT/history.json")
    run_p.add_argument("--engine", choices=ENGINES, default="simulation",
                       help="Flower's simulation engine (Ray), a loopback deployment (SuperLink + SuperNodes), or "
                            "the same apps in this process without Flower's runtime (default: simulation)")
    run_p.add_argument("-o", "--out", default="runs/fed", help="output directory (default: runs/fed)")
    run_p.add_argument("--timeout", type=float, default=24 * 3600, help="seconds before the run is stopped")
    _settings_options(run_p)
    app_p = sub.add_parser("app", help="write a Flower app directory for `flwr run DIR <connection>`")
    app_p.add_argument("directory")
    _settings_options(app_p)


def settings_from(args: argparse.Namespace, **extra) -> Settings:
    """Settings from the parsed options (unset ones keep their defaults)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if getattr(args, f.name, None) is not None}
    return Settings(**{**given, **extra})


def run(args: argparse.Namespace) -> int:
    """Run or write the app; prints where the results are."""
    from . import runner

    if args.fed_command == "app":
        path = runner.write_app(args.directory, settings_from(args))
        print(f"wrote the Flower app to {path}; submit it with: flwr run {path} <connection>")
        return 0
    out = Path(args.out)
    settings = settings_from(args, out_dir=str((out / "server").resolve()))
    STRATEGIES.get(settings.strategy)  # an unknown strategy fails here, before anything starts
    if args.engine == "inprocess":
        from .local import run_in_process

        rounds = run_in_process(settings).state.log
    else:
        engine = runner.simulate if args.engine == "simulation" else runner.deploy
        rounds = engine(settings, workdir=str(out / "flower"), timeout=args.timeout)["rounds"]
    (out / "history.json").write_text(json.dumps({"settings": settings.to_config(), "rounds": rounds}, indent=1))
    print(f"{'round':>5} {'accuracy':>9} {'accepted':>9} {'up KiB':>8} {'down KiB':>9}")
    for r in rounds:
        print(f"{r['round']:>5} {r.get('accuracy', float('nan')):>9.4f} {r.get('accepted', '-'):>9} "
              f"{r.get('uplink-bytes', 0) / 1024:>8.1f} {r.get('downlink-bytes', 0) / 1024:>9.1f}")
    print(f"history: {out / 'history.json'}")
    return 0


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
    """``lorakit fed`` as a function: ``argv`` are the arguments after ``fed``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="lorakit fed", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed
        return int(e.code or 0)
    try:
        return run(args)
    except (KeyError, ValueError, TypeError, RuntimeError, TimeoutError, FileNotFoundError) as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"lorakit fed: error: {msg.splitlines()[0] if msg else type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli_main())
