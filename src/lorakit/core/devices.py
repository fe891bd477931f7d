"""Which torch device a ``--device`` value means, and what this machine has.

``auto`` is CUDA, else MPS, else the CPU. A device that is not there is an error that names it and lists the
devices that are (``ValueError``: the CLI prints it in one line and exits 2). ``cuda:N`` picks one GPU.
"""
from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda", "mps")


def mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def available_devices() -> list[str]:
    """The devices torch can use here, e.g. ``['cpu']`` or ``['cpu', 'cuda:0', 'cuda:1']``."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if mps_available():
        found.append("mps")
    return found


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for a --device value (auto, cpu, cuda, cuda:N, mps); raises ValueError when it is absent."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu")
    kind, _, index = name.partition(":")
    if kind not in DEVICES[1:] or (index and not (kind == "cuda" and index.isdigit())):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, not {name!r}")
    have = available_devices()
    wanted = f"cuda:{index or 0}" if kind == "cuda" else kind
    if wanted not in have:
        why = {"cuda": f"torch {torch.__version__} sees no CUDA GPU" if not torch.cuda.is_available()
               else f"torch sees {torch.cuda.device_count()} CUDA GPU(s)",
               "mps": "this torch build or machine has no MPS (Apple GPU) support"}[kind]
        raise ValueError(f"device '{name}' is not available ({why}); available here: {', '.join(have)}; "
                         "use --device auto to pick the best one")
    return torch.device(name)
