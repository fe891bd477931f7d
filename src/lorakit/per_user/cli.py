"""``lorakit per-user``: train RecLoRA-style per-user adapters on MovieLens 100K and export one PEFT LoRA per user.

Writes OUT/users/ (``user-<id>/`` PEFT directories and ``users.json``, which ``lorakit serve --user-adapters``
reads) and OUT/summary.json (test AUC of the CRM and of the bank), staged and renamed into place at the end.
"""
from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``per-user`` subcommand."""
    from ..cli import count

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
    p.set_defaults(func=run, user_errors=(FileNotFoundError, FileExistsError))
    return p


def run(args: argparse.Namespace) -> int:
    from .. import zoo
    from ..core.outputs import check_output, staged
    from .bank import PersonalizedLoRA
    from .crm import train_crm
    from .few2many import auc, examples, export_users, fit_model, predict, sample_events
    from .movielens import fetch, read

    out = check_output(args.out, [args.data] if args.data else [], args.overwrite)
    if args.history < 0:
        raise ValueError(f"--history must be >= 0, found {args.history}")
    data = read(args.data or fetch())
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
    print(json.dumps(summary, indent=2))
    return 0
