"""``lorakit fed``: run the bundled federated experiment, or write the Flower app for ``flwr run``.

``lorakit fed run [--engine simulation|deployment|inprocess] [--strategy flora] [--num-rounds 20] ...`` runs the
tweets task over 10 clients with a Dirichlet label skew (every run-config key is an option) and writes
``OUT/history.json``, printing each round as it ends; ``lorakit fed app DIR`` writes a Flower app directory to
submit with ``flwr run DIR``. ``fed run`` keeps the server's checkpoint in ``OUT/checkpoint`` (a rerun with
``--resume`` continues from it) and the final global adapter in ``OUT/adapter`` (PEFT format, with the base
model's record). Settings are checked before any engine starts; an existing ``OUT`` is refused unless
``--resume`` (same settings) or ``--overwrite``.
The ``lorakit`` command hooks it in with ``p = sub.add_parser("fed"); add_arguments(p); p.set_defaults(func=run)``,
or calls ``cli_main(argv)`` with the arguments after ``fed``. ``python -m lorakit.federated`` is the same.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..core.outputs import OutputError, check_output, file_above, staged
from .aggregation import STRATEGIES
from .experiment import Settings

ENGINES = ("simulation", "deployment", "inprocess")


HELP = {
    "dp": "server-fixed, server-adaptive, client-fixed or client-adaptive: Flower's DP clipping wrappers ",
    "secagg": "Flower's SecAgg+: the server sees only the masked weighted sum (every strategy but flora; with dp: "
              "client-fixed only) ",
    "personal": "module names whose adapters stay on each client (FedPer), e.g. o_proj or classifier ",
    "personal_dir": "where each client writes its personalised PEFT adapter (fed run: OUT/personal) ",
    "task": "tweets, toy or chat (instruction tuning of a causal LM) ",
    "data": "task chat: a chat JSONL file or directory ",
}


def _settings_options(p: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(Settings):
        if f.name in ("out_dir",):
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"(default: {f.default!r})"
        if f.name == "strategy":
            help_text = f"one of {', '.join(STRATEGIES.names())} {help_text}"
        if f.name == "checkpoint_dir":
            help_text = "where the server checkpoints each round (default: OUT/checkpoint; fed app: none)"
        help_text = HELP.get(f.name, "") + help_text
        if isinstance(f.default, bool):
            p.add_argument(flag, action="store_true", default=None, help=HELP.get(f.name, "") + "(default: off)")
            continue
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
    run_p.add_argument("--resume", action="store_true", help="continue the run in OUT from its checkpoint")
    run_p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    _settings_options(run_p)
    app_p = sub.add_parser("app", help="write a Flower app directory for `flwr run DIR <connection>`")
    app_p.add_argument("directory", help="the app directory to write (must not exist)")
    app_p.add_argument("--overwrite", action="store_true", help="replace an existing DIRECTORY")
    _settings_options(app_p)


def settings_from(args: argparse.Namespace, **extra) -> Settings:
    """Settings from the parsed options (unset ones keep their defaults)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if getattr(args, f.name, None) is not None}
    return Settings(**{**given, **extra})


def check_settings(settings: Settings) -> None:
    """Refuse an unknown strategy, task or model here, before an engine starts."""
    from .. import zoo

    STRATEGIES.get(settings.strategy)
    from .experiment import TASKS

    if settings.task not in TASKS:
        raise ValueError(f"unknown task {settings.task!r}; the federated experiment knows {', '.join(TASKS)}")
    if settings.data and not Path(settings.data).exists():
        raise FileNotFoundError(f"--data {settings.data}: no such file or directory")
    if settings.task != "toy" and settings.model not in zoo.names() and not Path(settings.model).is_dir():
        raise ValueError(f"unknown model {settings.model!r}: not a zoo name ({', '.join(zoo.names())}) and not a "
                         "local Hugging Face model directory")
    if settings.personal:  # the module names need the adapter: build it once here, before an engine starts
        from .experiment import Experiment
        from .personal import check_options

        fresh = Experiment(settings).fresh_state()
        check_options(settings, [*fresh.tensors, *fresh.modules_to_save])


def _check_out(out: Path, settings: Settings, resume: bool, overwrite: bool) -> None:
    """Refuse an OUT that holds something, unless resuming the same run or told to overwrite."""
    if not resume:
        check_output(out, overwrite=overwrite)
        return
    server = Path(settings.checkpoint_dir) / "server.json"
    if file_above(out.resolve()) is not None or not server.is_file():
        raise OutputError(f"--resume: no federated run checkpoint to continue ({server} not found)")
    history = out / "server" / "history.json"
    if not history.is_file():
        raise OutputError(f"--resume: {history} not found, so the run's settings are unknown; use --overwrite")
    saved = json.loads(history.read_text())["settings"]
    ours = settings.to_config()
    diff = next((k for k in ours if saved.get(k) != ours[k]), None)
    if diff is not None:
        raise OutputError(f"--resume: {out} ran with --{diff} {saved.get(diff)!r}, this run asks for {ours[diff]!r}; "
                          "resume with the same settings")


HEADER = f"{'round':>5} {'accuracy':>9} {'accepted':>9} {'up KiB':>8} {'down KiB':>9}"


def print_round(record: dict) -> None:
    """One row of the progress table (after a personalised run: one row per client)."""
    if "personalised" in record:
        for c in record["personalised"]:
            print(f"client {c['partition']}: personalised accuracy {c['personal-accuracy']:.4f}, "
                  f"global part alone {c['global-accuracy']:.4f}", flush=True)
        return
    print(f"{record['round']:>5} {record.get('accuracy', float('nan')):>9.4f} {record.get('accepted', '-'):>9} "
          f"{record.get('uplink-bytes', 0) / 1024:>8.1f} {record.get('downlink-bytes', 0) / 1024:>9.1f}", flush=True)


def save_final_adapter(settings: Settings, out: Path) -> str:
    """Write the checkpoint's global adapter to OUT/adapter; returns a line saying where it is."""
    from ..core import fingerprint
    from ..formats.peft import save_state
    from . import checkpoint
    from .experiment import Experiment

    state = checkpoint.load(settings.checkpoint_dir)
    if state is None:
        return f"no checkpoint in {settings.checkpoint_dir}: the final adapter was not kept"
    if settings.personal:
        return f"global adapter: {settings.checkpoint_dir} (without the personal modules, which stay per client)"
    if state.history:
        return (f"global model: {settings.checkpoint_dir} (strategy {settings.strategy!r} folds each round's update "
                "into the base weights, so no single adapter holds it)")
    base = Experiment(settings).base_model()
    name = settings.model if settings.task != "toy" else None
    path = save_state(state.adapter.replace(base_model_name_or_path=name), out / "adapter",
                      base=fingerprint.record(base))
    return f"adapter: {path}"


def run(args: argparse.Namespace) -> int:
    """Run or write the app; prints each round and where the results are."""
    from . import runner

    if args.fed_command == "app":
        settings = settings_from(args)
        check_settings(settings)
        path = check_output(args.directory, overwrite=args.overwrite, flag="fed app")
        with staged(path) as tmp:
            runner.write_app(tmp, settings)
        print(f"wrote the Flower app to {path}; submit it with: flwr run {path} <connection>")
        return 0
    out = Path(args.out)
    settings = settings_from(args, out_dir=str((out / "server").resolve()))
    if args.checkpoint_dir is None:
        settings = dataclasses.replace(settings, checkpoint_dir=str((out / "checkpoint").resolve()))
    if settings.personal and not settings.personal_dir:
        settings = dataclasses.replace(settings, personal_dir=str((out / "personal").resolve()))
    check_settings(settings)
    _check_out(out, settings, args.resume, args.overwrite)
    if not args.resume and out.exists():  # checked: --overwrite was given
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    print(HEADER, flush=True)
    if args.engine == "inprocess":
        from .local import run_in_process

        rounds = run_in_process(settings, on_round=print_round).state.log
    else:
        engine = runner.simulate if args.engine == "simulation" else runner.deploy
        rounds = engine(settings, workdir=str(out / "flower"), timeout=args.timeout, on_round=print_round)["rounds"]
    tmp = out / "history.json.tmp"
    tmp.write_text(json.dumps({"settings": settings.to_config(), "rounds": rounds}, indent=1))
    os.replace(tmp, out / "history.json")
    print(f"history: {out / 'history.json'}\n{save_final_adapter(settings, out)}")
    if settings.dp:
        print(privacy_summary(settings, rounds))
    if settings.personal:
        print(f"personalised adapters: {settings.personal_dir} (serve them with --adapters {settings.personal_dir} "
              f"--user-adapters {Path(settings.personal_dir) / 'users.json'})")
    return 0


def privacy_summary(settings: Settings, rounds: list[dict]) -> str:
    """One line: the epsilon the run spent, and who clipped (under SecAgg+ the server cannot verify it)."""
    spent = [r for r in rounds if "epsilon" in r]
    eps = f"epsilon {spent[-1]['epsilon']:.4g} at delta {settings.dp_delta:g} after {len(spent)} noised round(s)" \
        if spent else "no round was noised"
    if settings.secagg:
        return (f"DP ({settings.dp}, with SecAgg+): {eps}; each client clips before masking and the server cannot "
                "verify it (it never sees an update), so epsilon holds for clients that run the clipping mod")
    return f"DP ({settings.dp}): {eps}"


# what a federated run reports as one line: bad settings, and an engine that failed or timed out
USER_ERRORS = (KeyError, ValueError, TypeError, RuntimeError, TimeoutError, FileNotFoundError, ImportError)


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
    """``lorakit fed`` as a function: ``argv`` are the arguments after ``fed``; returns the exit status."""
    from ..cli import Parser

    parser = Parser(prog="lorakit fed", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed
        return int(e.code or 0)
    try:
        return run(args)
    except USER_ERRORS as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"lorakit fed: error: {msg.splitlines()[0] if msg else type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli_main())
