"""``lorakit per-user``: train RecLoRA-style per-user adapters on MovieLens 100K and export one PEFT LoRA per user.

Writes OUT/users/ (``user-<id>/`` PEFT directories and ``users.json``, which ``lorakit serve --user-adapters``
reads) and OUT/summary.json (test AUC of the CRM and of the bank), staged and renamed into place at the end.
With ``--library DIR`` every user's adapter is also added to that adapter library as ``user-<id>``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``per-user`` subcommand."""
    from ..cli import count
    from ..library import LibraryError

    p = subparsers.add_parser("per-user", help="per-user adapters (RecLoRA) on MovieLens 100K, one PEFT LoRA per user")
    p.add_argument("-o", "--out", required=True, help="output directory (users/ and summary.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--model", default="minilm", help="encoder with a classification head (zoo name or HF directory)")
    p.add_argument("--data", default=None, help="MovieLens 100K atomic files (default: fetched into lorakit's cache)")
    p.add_argument("--events", type=count, default=2000, help="training events the language model sees (Few2Many)")
    p.add_argument("--steps", type=count, default=125, help="optimiser steps (batch 16)")
    p.add_argument("--experts", type=count, default=4, help="LoRA pairs in the bank (K)")
    p.add_argument("--rank", type=count, default=2, help="rank of each pair (r); users' adapters have rank K·r")
    p.add_argument("--history", type=int, default=5, help="past events shown in the prompt (short history)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the event sample, the bank and the data order")
    p.add_argument("--library", default=None, metavar="DIR",
                   help="also add every user's adapter to this adapter library as user-<id> (tag 'user'); "
                        "users.json then names library entries (serve --library DIR --user-adapters ...)")
    p.set_defaults(func=run, user_errors=(FileNotFoundError, FileExistsError, LibraryError))
    return p


def check_library(root, names: list[str], overwrite: bool) -> None:
    """Refuse, before any work, a library that already holds any of ``names`` (unless ``overwrite``)."""
    from ..library import Library, LibraryError

    lib = Library(root)
    taken = sorted(set(names) & {e.name for e in lib.list()}) if lib.root.exists() else []
    if taken and not overwrite:
        raise LibraryError(f"{root}: already holds {len(taken)} of these users' entries (e.g. {taken[0]}); pass "
                           "--overwrite to replace them")


def add_to_library(root, users: Path, overwrite: bool) -> None:
    """Add each exported user adapter (``users.json``'s names) to the library at ``root``."""
    from ..library import Library

    lib = Library(root)
    for user, name in json.loads((users / "users.json").read_text()).items():
        lib.add(users / name, name=name, tags=["user"], overwrite=overwrite, command=f"lorakit per-user (user {user})")


def run(args: argparse.Namespace) -> int:
    from .. import zoo
    from ..core.outputs import check_output, staged
    from .bank import PersonalizedLoRA
    from .crm import train_crm
    from .few2many import auc, examples, export_users, fit_model, predict, sample_events, user_name
    from .movielens import fetch, read

    out = check_output(args.out, [args.data] if args.data else [], args.overwrite)
    if args.history < 0:
        raise ValueError(f"--history must be >= 0, found {args.history}")
    data = read(args.data or fetch())
    if args.library:
        check_library(args.library, [user_name(u) for u in data.users], args.overwrite)
    print(f"lorakit per-user: {len(data.users)} users, {len(data.train)} training events; fitting the CRM")
    crm = train_crm(data.train, list(data.movies), seed=args.seed)
    model, tok = zoo.load(args.model, "seq_cls", num_labels=2, seed=args.seed)
    bank = PersonalizedLoRA(model, crm.model.user.weight.detach(), experts=args.experts, r=args.rank,
                            lora_alpha=2.0 * args.rank, target_modules=("query", "value"),
                            modules_to_save=["classifier"], seed=args.seed)
    rows = examples(data, sample_events(data.train, args.events, args.seed), crm, tok, k=args.history)
    fit_model(bank, rows, tok.pad_token_id, lr=args.lr, batch_size=16, max_steps=args.steps, seed=args.seed)
    test = examples(data, data.test, crm, tok, k=args.history)
    labels = [e.label for e in data.test]
    summary = {"users": len(data.users), "test_events": len(labels), "crm_test_auc": auc(crm.scores(data.test), labels),
               "bank_test_auc": auc(predict(bank, test, tok.pad_token_id), labels), "experts": args.experts,
               "rank": args.rank, "events": args.events, "steps": args.steps}
    with staged(out) as tmp:
        export_users(bank, crm, data.users, tmp / "users")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.library:  # each add is atomic; the copies come from OUT/users, now in place
        add_to_library(args.library, Path(out) / "users", args.overwrite)
    print(json.dumps(summary, indent=2))
    return 0
