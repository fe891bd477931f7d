"""``lorakit library add|list|search|show|remove --library DIR``: manage an adapter library and search it.

``add`` takes an adapter directory; when it sits in a ``lorakit train`` run directory, the run's settings
(``run.json``) become the entry's provenance and its test metrics (``summary.json``) the entry's metrics unless
``--metric`` is given. An adapter that records no base model (made by peft) needs ``--model`` to fingerprint
it. User errors print one line and exit 2 (``lorakit.cli.main``). Other commands take library names with
``--library DIR`` (``resolve``): ``lorakit eval``, ``lorakit merge`` and ``lorakit serve``.
"""
from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from .manifest import Entry, LibraryError
from .store import Library

KINDS = {"SEQ_CLS": "seq_cls", "CAUSAL_LM": "causal_lm"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``library`` command and its sub-commands."""
    p = subparsers.add_parser("library", help="an adapter library: add, list, search, show, remove")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=type(p))

    def action(name: str, help_text: str, func) -> argparse.ArgumentParser:
        q = sub.add_parser(name, help=help_text)
        q.add_argument("--library", required=True, metavar="DIR", help="the library directory")
        q.set_defaults(func=func)
        return q

    q = action("add", "copy an adapter directory into the library", cmd_add)
    q.add_argument("adapter_dir", help="PEFT adapter directory (lorakit or peft)")
    q.add_argument("--name", default=None, help="entry name (default: the adapter folder's name)")
    q.add_argument("--description", default="", help="what task the adapter does (used by search)")
    q.add_argument("--tag", action="append", default=[], help="a tag (repeatable)")
    q.add_argument("--metric", action="append", default=[], metavar="KEY=VALUE", help="a metric (repeatable)")
    q.add_argument("--model", default=None, help="base model (zoo name or directory) when the adapter records none")
    q.add_argument("--overwrite", action="store_true", help="replace an entry of the same name")
    q.add_argument("--allow-pickle", action="store_true", help="read adapter_model.bin (unpickling can run code)")
    q = action("import-zoo", "add a task zoo's adapters (`make zoo`) with their descriptions and metrics", cmd_import_zoo)
    q.add_argument("zoo_dir", help="a task zoo directory (holds index.json), e.g. runs/zoo/minilm")
    q.add_argument("--split", choices=["expert", "heldout", "all"], default="expert",
                   help="which tasks (default: expert; held-out tasks stay out of the library for evaluation)")
    q.add_argument("--overwrite", action="store_true", help="replace entries of the same names")
    q = action("list", "list the entries", cmd_list)
    q.add_argument("--json", action="store_true", help="print the entries as JSON")
    q = action("show", "print one entry", cmd_show)
    q.add_argument("name")
    q = action("remove", "delete an entry", cmd_remove)
    q.add_argument("name")
    q = action("search", "find entries for a task description", cmd_search)
    q.add_argument("query", help="what the adapter should do, in words")
    q.add_argument("-k", type=int, default=5, help="entries to show")
    q.add_argument("--by", choices=["description", "weights"], default="description",
                   help="match descriptions, or adapter weights through the AutoLoRA encoder")
    q.add_argument("--fingerprint", default=None, help="only entries for this base model fingerprint")
    return p


def _metrics(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise LibraryError(f"--metric {pair!r}: expected KEY=VALUE")
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = value
    return out


def _base_model(adapter_dir: Path, name: str):
    """The base model ``name`` loaded for the adapter's task type (and head size), to fingerprint it."""
    from .. import zoo
    from ..formats.peft import load_state

    state = load_state(adapter_dir)
    task = KINDS.get(state.config.task_type or "", "base")
    heads = [t["weight"].shape[0] for t in state.modules_to_save.values() if "weight" in t]
    return zoo.load(name, task=task, num_labels=heads[0] if task == "seq_cls" and heads else None)[0]


def cmd_add(args: argparse.Namespace) -> int:
    source = Path(args.adapter_dir)
    run, summary = source.parent / "run.json", source.parent / "summary.json"
    metrics = _metrics(args.metric)
    if not metrics and summary.is_file():
        metrics = {k: v for k, v in json.loads(summary.read_text()).get("test", {}).items() if isinstance(v, (int, float))}
    command = None
    if run.is_file():
        settings = json.loads(run.read_text()).get("settings", {})
        command = "lorakit train " + " ".join(f"--{k.replace('_', '-')} {shlex.quote(str(v))}"
                                               for k, v in settings.items() if v not in (None, False, [], ""))
    base = _base_model(source, args.model) if args.model else None
    entry = Library(args.library).add(source, name=args.name, description=args.description, tags=args.tag,
                                      metrics=metrics, overwrite=args.overwrite, base=base, command=command,
                                      allow_pickle=args.allow_pickle)
    print(f"added {entry.name} ({entry.method}, base {entry.fingerprint}) to {args.library}")
    return 0


def cmd_import_zoo(args: argparse.Namespace) -> int:
    from ..generate.zooindex import Zoo

    zoo = Zoo.open(args.zoo_dir)
    library = Library(args.library)
    tasks = zoo.entries(None if args.split == "all" else args.split)
    for task in tasks:
        metrics = {k: v for k, v in task.get("metrics", {}).items() if isinstance(v, (int, float))}
        library.add(zoo.root / task["path"], name=task["name"], description=task["description"],
                    tags=("zoo", task["split"]), metrics=metrics, overwrite=args.overwrite,
                    command=f"make zoo ({zoo.index['base']})")
    print(f"added {len(tasks)} {args.split} adapters from {args.zoo_dir} to {args.library}")
    return 0


def _row(e: Entry) -> tuple[str, ...]:
    return (e.name, e.method, f"{e.fingerprint} ({e.base.get('model') or e.base.get('architecture')})",
            ",".join(e.tags) or "-", (e.description or "-")[:60])


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def cmd_list(args: argparse.Namespace) -> int:
    entries = Library(args.library).list()
    if args.json:
        print(json.dumps([e.to_json() for e in entries], indent=2))
    elif not entries:
        print(f"{args.library}: no entries")
    else:
        _table([("name", "method", "base", "tags", "description"), *map(_row, entries)])
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    library = Library(args.library)
    print(json.dumps({**library.get(args.name).to_json(), "path": str(library.path_of(args.name))}, indent=2))
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    entry = Library(args.library).remove(args.name)
    print(f"removed {entry.name} from {args.library}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise LibraryError(f"-k must be a whole number >= 1, found {args.k}")
    hits = Library(args.library).search(args.query, args.k, args.by, fingerprint=args.fingerprint)
    if not hits:
        print(f"{args.library}: no entries to search" + (" (none has a description)" if args.by == "description" else ""))
        return 0
    _table([("score", "name", "description"), *((f"{s:.3f}", e.name, (e.description or "-")[:70]) for e, s in hits)])
    return 0


def resolve(library: str, name: str, base=None) -> str:
    """The adapter directory of the library entry ``name`` (checked against ``base`` when given)."""
    return str(Library(library).path_of(name, base=base))
