"""Training checkpoints for exact resume, written atomically.

A checkpoint is one `torch.save` file `checkpoint-<step>.pt` holding the trainable parameters by name, the
optimiser and scheduler states, the position in the data (epoch and step within it; the order of an epoch is a
function of the seed and the epoch, as in `DistributedSampler`), the torch / numpy / python RNG states of every
process, the history so far and the elapsed time. Files are pickles: load only checkpoints you wrote.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

PATTERN = re.compile(r"checkpoint-(\d+)\.pt$")


def rng_state() -> dict:
    """The RNG states of this process."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and python's random."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the same directory, fsync, then os.replace onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` goes."""
    return Path(output_dir) / f"checkpoint-{step:08d}.pt"


def latest(output_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step in output_dir, or None."""
    found = [(int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*.pt") if (m := PATTERN.search(p.name))]
    return max(found)[1] if found else None


def resolve(resume: bool | str, output_dir: str | None) -> Path | None:
    """The checkpoint that `TrainConfig.resume` designates, or None to start fresh."""
    if isinstance(resume, str):
        path = Path(resume)
        if path.is_dir():
            path = latest(path)
            if path is None:
                raise FileNotFoundError(f"{resume}: no checkpoint-*.pt files to resume from")
        if not path.is_file():
            raise FileNotFoundError(f"{resume}: no such checkpoint; pass resume=True to take the latest in output_dir")
        return path
    return latest(output_dir) if resume and output_dir and Path(output_dir).is_dir() else None


def load_trainable(named: dict[str, torch.nn.Parameter], saved: dict[str, torch.Tensor], where: Path) -> None:
    """Copy saved tensors into the trainable parameters, which must have the same names."""
    missing, unexpected = sorted(set(named) - set(saved)), sorted(set(saved) - set(named))
    if missing or unexpected:
        raise ValueError(
            f"{where} does not match the model's trainable parameters: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}; resume with the same model and adapter configuration"
        )
    with torch.no_grad():
        for name, param in named.items():
            param.copy_(saved[name])
