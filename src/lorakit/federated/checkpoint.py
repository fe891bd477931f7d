"""The federated server's state and its checkpoint on disk, so a restarted server resumes where it stopped.

Layout of a checkpoint directory: ``global-<round>/`` (the global adapter, a PEFT directory),
``updates/round-<r>/`` (each merged round update of a restarting strategy, PEFT directories) and
``server-opt-<round>.safetensors`` (the server optimiser's moments, when there is one) and ``server.json``
(round, node sync state, per-round log). ``server.json`` is replaced atomically last, so a
crash mid-write leaves the previous checkpoint valid.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from safetensors.torch import load_file, save_file

from ..core.state import AdapterState
from ..formats.peft import load_state, save_state


@dataclass
class ServerState:
    """Everything the server needs to continue: the round reached, the global adapter and the round updates."""

    round: int
    adapter: AdapterState  # the global adapter (restarting strategies: a fresh adapter and the averaged head)
    history: dict[int, AdapterState] = field(default_factory=dict)  # merged round updates (restarting strategies)
    synced: dict[str, int] = field(default_factory=dict)  # node id -> last round update it folded in
    log: list[dict] = field(default_factory=list)  # one record per finished round
    opt: dict = field(default_factory=dict)  # the server optimiser's state (name -> tensor), if any


def save(state: ServerState, directory: str | os.PathLike) -> Path:
    """Write ``state`` under ``directory`` (atomic at the level of ``server.json``)."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    for rnd, update in state.history.items():
        if not (root / "updates" / f"round-{rnd}").exists():
            save_state(update, root / "updates" / f"round-{rnd}")
    save_state(state.adapter, root / f"global-{state.round}")
    meta = {"round": state.round, "synced": state.synced, "log": state.log, "global": f"global-{state.round}"}
    if state.opt:
        meta["opt"] = f"server-opt-{state.round}.safetensors"
        save_file({k: v.contiguous() for k, v in state.opt.items()}, str(root / meta["opt"]))
    tmp = root / "server.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, root / "server.json")
    for old in [*root.glob("global-*"), *root.glob("server-opt-*")]:  # older ones are no longer referenced
        if old.name not in (meta["global"], meta.get("opt")):
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    return root


def load(directory: str | os.PathLike) -> Optional[ServerState]:
    """The checkpointed state, or None when ``directory`` holds no checkpoint."""
    root = Path(directory)
    if not (root / "server.json").is_file():
        return None
    meta = json.loads((root / "server.json").read_text())
    history = {}
    for path in (root / "updates").glob("round-*"):
        rnd = int(path.name.split("-")[1])
        if rnd <= meta["round"]:
            history[rnd] = load_state(path)
        else:  # written by a round that crashed before its server.json: it will be redone
            shutil.rmtree(path, ignore_errors=True)
    adapter = load_state(root / meta["global"])
    opt = load_file(str(root / meta["opt"])) if "opt" in meta else {}
    return ServerState(meta["round"], adapter, dict(sorted(history.items())), meta["synced"], meta["log"], opt)
