"""Helpers for the "the CLI loses nothing" tests: tiny adapters on disk and byte-for-byte snapshots."""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import torch
from torch import nn

import lorakit


class Net(nn.Module):
    """Two Linear layers and a classifier head, seeded."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.q = nn.Linear(8, 8)
        self.v = nn.Linear(8, 4)
        self.classifier = nn.Linear(4, 2)

    def forward(self, x):
        return self.classifier(self.v(self.q(x)))


def save_adapter(path: Path, seed: int = 0, base_seed: int = 0, r: int = 2, **config) -> Path:
    """A LoRA adapter (non-zero B) on ``Net(base_seed)``, saved with lorakit."""
    model = lorakit.apply(Net(base_seed), lorakit.LoRAConfig(r=r, lora_alpha=4, target_modules=["q", "v"], **config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in lorakit.adapters(model).values():
            layer.lora_B.weight.normal_()
    return lorakit.save_peft(model, path)


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file under ``roots`` with the SHA-256 of its bytes (a file root stands for itself)."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        out.update({str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
    return out


def one_line_error(capsys, *needles: str) -> str:
    """The captured stderr, checked to be a single error line that contains every needle."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def write_task(path: Path, n: int = 32) -> Path:
    """A two-class CSV task."""
    rows = [{"text": ("good fine " if i % 2 else "bad poor ") * 2 + str(i), "label": "pos" if i % 2 else "neg"}
            for i in range(n)]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    return path
