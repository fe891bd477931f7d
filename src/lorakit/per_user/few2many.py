"""RecLoRA's Few2Many training, evaluation by AUC, and the export of one PEFT adapter per user.

Few2Many: the CRM trains on every training event (the full space), the language model on a small sample of them
(``train_events``), while the gate reads the CRM's user vector, so the few events the language model sees reach
every user. ``examples`` builds the text of each event (short history from the retriever, candidate), ``fit_model``
trains a `PersonalizedLoRA` with lorakit's `fit`, ``predict`` scores events, ``export_users`` writes each user's
adapter as a PEFT directory plus ``users.json`` (user id -> directory), all into a staged folder renamed at the end.
"""
from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path

import torch

from ..core import fingerprint
from ..formats.peft import save_state
from ..train import fit
from .bank import PersonalizedLoRA
from .crm import CRM
from .movielens import Event, RecData
from .retriever import prompt, short_history

USERS_FILE = "users.json"


def sample_events(events: list[Event], n: int, seed: int = 0) -> list[Event]:
    """``n`` events drawn without replacement (seeded): the language model's small training space."""
    if n > len(events):
        raise ValueError(f"asked for {n} training events, only {len(events)} exist")
    return random.Random(seed).sample(events, n)


def examples(data: RecData, events: list[Event], crm: CRM, tokenizer, k: int = 5, strategy: str = "relevant",
             max_length: int = 128) -> list[dict]:
    """Tokenised examples {input_ids, labels, users} for ``events`` (``users``: the CRM's row of the user)."""
    texts = [prompt(data.movies, short_history(data.history(e), e.item, k, crm, strategy), e.item) for e in events]
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return [{"input_ids": i, "labels": e.label, "users": crm.user_index[e.user]} for i, e in zip(ids, events)]


def collate(pad_id: int):
    """Right-padding collate for `examples`."""
    def run(rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[j, : len(r["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([r["labels"] for r in rows]),
                "users": torch.tensor([r["users"] for r in rows])}
    return run


def fit_model(model: PersonalizedLoRA, train: list[dict], pad_id: int, **train_options):
    """Train the bank, the gate and the head with lorakit's `fit` (options: TrainConfig fields)."""
    return fit(model, train, collate_fn=collate(pad_id), **train_options)


@torch.no_grad()
def predict(model: PersonalizedLoRA, rows: list[dict], pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """Like probabilities (softmax of class 1) for tokenised examples."""
    model.eval()
    out, run = [], collate(pad_id)
    for start in range(0, len(rows), batch_size):
        batch = run(rows[start: start + batch_size])
        batch.pop("labels")
        out.append(torch.softmax(model(**batch).logits, -1)[:, 1])
    return torch.cat(out)


def auc(scores: torch.Tensor, labels: list[int]) -> float:
    """Area under the ROC curve (ties count half), by ranks."""
    s = scores.double()
    y = torch.tensor(labels, dtype=torch.bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        raise ValueError("AUC needs both likes and dislikes among the events")
    greater = (s[y][:, None] > s[~y][None, :]).double().sum()
    ties = (s[y][:, None] == s[~y][None, :]).double().sum()
    return float((greater + 0.5 * ties) / (pos * neg))


def user_name(user: int) -> str:
    """The adapter name of ``user`` in an export (and in a library)."""
    return f"user-{user}"


def export_users(model: PersonalizedLoRA, crm: CRM, users: list[int], out: str | Path, overwrite: bool = False) -> Path:
    """One PEFT directory per user under ``out`` plus ``users.json``; written staged, renamed into place at the end."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: exists; choose another folder or pass overwrite=True")
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=".lorakit-users-", dir=out.parent))
    try:
        base = fingerprint.record(model.model)
        index = {}
        for user in users:
            name = user_name(user)
            save_state(model.user_state(crm.user_index[user]), staged / name, base=base)
            index[str(user)] = name
        (staged / USERS_FILE).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return out
