"""Figures written by jobs and benchmarks (matplotlib, headless)."""
from __future__ import annotations

import os
from pathlib import Path


def training_curves(histories: dict[str, list[dict]], path: Path) -> Path:
    """Training loss and validation accuracy per step, one line per run; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, history in histories.items():
        train = [(h["step"], h["loss"]) for h in history if "loss" in h]
        evals = [(h["step"], h["eval_accuracy"]) for h in history if "eval_accuracy" in h]
        if train:
            ax_loss.plot(*zip(*train), label=name)
        if evals:
            ax_acc.plot(*zip(*evals), marker="o", label=name)
    ax_loss.set(xlabel="optimiser step", ylabel="training loss", title="loss")
    ax_acc.set(xlabel="optimiser step", ylabel="accuracy", title="validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    return save(fig, path)


def save(fig, path: Path) -> Path:
    """Write a matplotlib figure as PNG atomically (beside ``path``, then renamed) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
