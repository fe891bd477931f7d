"""Personalised federated adapters: FedPer's personal layers, as adapters kept on each client.

FedPer (Arivazhagan et al., "Federated Learning with Personalization Layers", arXiv:1912.00818): the network is
split into base layers, trained by every client and averaged by the server, and personalisation layers, trained
by each client on its own data and never sent. Here the split is by adapted module: modules named in
``personal`` (LoRA target modules such as ``o_proj``, or saved modules such as the ``classifier`` head, FedPer's
own choice) are personal. Each client trains its whole adapter every round, keeps the personal part in the
node's ``context.state`` (so it carries over between rounds) and sends only the rest, which the run's strategy
aggregates into the global adapter. After the last round the server sends the final global adapter to every
node (message type ``query.personalise``); each node joins it with its personal part, writes that as one PEFT
adapter (``personal-dir/client-<k>/``) and replies with the accuracy of its personalised model and of the
global one (the personal part at its initialisation) on its own mix of categories. The server writes
``personal-dir/users.json`` (``client-<k>`` -> adapter), which ``lorakit serve --user-adapters`` reads.

Restarts: a node keeps the personal part it finished in each of its last two rounds (``remember``) and trains
round t from the latest one finished before t (``restore``), so a server that resumes from its checkpoint and
redoes a round the node had already trained loses nothing and counts nothing twice. With ``personal-dir`` the
node also writes them to its own disk (``client-<k>.rounds/``, next to its exported adapter; never sent), so a
resumed run, which Flower starts as a new run with fresh node state, picks them up; without it a resumed run
starts the personal parts afresh (logged).

Deviations from FedPer: the personal layers are adapters on frozen base layers (or copies of saved modules),
not whole layers; restarting strategies (FLoRA, fedavg_dense) are refused, since they fold the global update
into each client's base weights and no single adapter on the original base would then hold a client's model.
Per-client evaluation: the bundled tasks have no per-client test split, so a client's score is the mean over
categories of the held-out score on that category, weighted by the category's share of the client's shard.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from safetensors.numpy import load_file, save_file

from ..core.state import AdapterState

MESSAGE = "query.personalise"
ROUNDS = "personal-rounds"  # the rounds in which the node finished "personal" and "personal-prev"
IGNORED = ("out-dir", "checkpoint-dir", "personal-dir", "reply-timeout")  # not part of a run's identity
LOG = logging.getLogger("flwr")


def names(settings) -> set[str]:
    """The personal module names of a run (empty: no personalisation)."""
    return {n.strip() for n in settings.personal.split(",") if n.strip()}


def is_personal(path: str, personal: set[str]) -> bool:
    """Whether module ``path`` (e.g. ``model.layers.0.self_attn.o_proj``) is one of the personal modules."""
    return path in personal or path.rsplit(".", 1)[-1] in personal


def split(state: AdapterState, personal: set[str]) -> tuple[AdapterState, AdapterState]:
    """(the global part, the personal part) of an adapter."""
    parts = []
    for keep in (False, True):
        pick = lambda group: {p: t for p, t in group.items() if is_personal(p, personal) == keep}  # noqa: E731
        parts.append(AdapterState(state.config, pick(state.tensors), pick(state.modules_to_save),
                                  {} if keep else state.base_tensors))
    return parts[0], parts[1]


def join(shared: AdapterState, mine: AdapterState) -> AdapterState:
    """One adapter from a global part and a personal part."""
    return AdapterState(shared.config, {**shared.tensors, **mine.tensors},
                        {**shared.modules_to_save, **mine.modules_to_save}, shared.base_tensors)


def check_strategy(settings) -> None:
    """Refuse personalisation with a restarting strategy (no adapter on the original base holds the result)."""
    from .aggregation import STRATEGIES

    if STRATEGIES.get(settings.strategy).restart:
        raise ValueError(f"personal cannot be combined with the restarting strategy {settings.strategy!r}: it folds "
                         "each round's update into the base, so no adapter on the original base holds a client's "
                         "model; use fedit, ffa_lora, lora_fair or zero_pad")


def check_options(settings, module_names: list[str]) -> None:
    """Refuse personal module names the adapter does not have, or that name every module."""
    personal = names(settings)
    unknown = sorted(n for n in personal if not any(is_personal(p, {n}) for p in module_names))
    if unknown:
        raise ValueError(f"personal: {', '.join(unknown)} name no adapted or saved module; adapted: "
                         f"{', '.join(sorted({p.rsplit('.', 1)[-1] for p in module_names}))}")
    if all(is_personal(p, personal) for p in module_names):
        raise ValueError("personal names every adapted module: nothing would be federated")


def write_users(directory: str | os.PathLike, clients: list[int]) -> Path:
    """Write ``users.json`` (``client-<k>`` -> adapter ``client-<k>``) atomically; returns its path."""
    path = Path(directory) / "users.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({f"client-{k}": f"client-{k}" for k in sorted(clients)}, indent=1))
    os.replace(tmp, path)
    return path


def _snapshots(settings, partition: int) -> tuple[Path, str] | None:
    """(this node's snapshot folder, the run's fingerprint), or None without ``personal-dir``."""
    from .experiment import stable_seed

    if not settings.personal_dir:
        return None
    identity = {k: v for k, v in settings.to_config().items() if k not in IGNORED}
    return Path(settings.personal_dir) / f"client-{partition}.rounds", f"{stable_seed(sorted(identity.items())):016x}"


def remember(store: RecordDict, settings, partition: int, rnd: int, arrays: ArrayRecord) -> None:
    """Keep the personal part finished in round ``rnd`` (and the previous round's), in the node's state and, with
    ``personal-dir``, on its disk (atomically; the last two rounds)."""
    rounds = dict(store[ROUNDS]) if ROUNDS in store else {}
    if "personal" in rounds and int(rounds["personal"]) < rnd:
        store["personal-prev"], rounds["personal-prev"] = store["personal"], rounds["personal"]
    store["personal"], rounds["personal"] = arrays, rnd
    store[ROUNDS] = ConfigRecord(rounds)
    where = _snapshots(settings, partition)
    if where is None:
        return
    folder, run = where
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{run}-round-{rnd}.safetensors.tmp"
    save_file({k: np.ascontiguousarray(a.numpy()) for k, a in arrays.items()}, str(tmp))
    os.replace(tmp, folder / f"{run}-round-{rnd}.safetensors")
    for old in sorted(folder.glob(f"{run}-round-*.safetensors"), key=_round_of)[:-2]:
        old.unlink(missing_ok=True)


def restore(store: RecordDict, settings, partition: int, before: int) -> ArrayRecord | None:
    """The personal part this node finished last before round ``before``: from its state, else from its disk."""
    if ROUNDS in store:
        for key in ("personal", "personal-prev"):
            if key in store[ROUNDS] and int(store[ROUNDS][key]) < before:
                return store[key]
    where = _snapshots(settings, partition)
    found = sorted((f for f in where[0].glob(f"{where[1]}-round-*.safetensors") if _round_of(f) < before),
                   key=_round_of) if where is not None and where[0].is_dir() else []
    if found:
        return ArrayRecord({k: Array(v) for k, v in load_file(str(found[-1])).items()})
    if before > 1:
        LOG.warning("node of partition %d: no personal part from before round %d (no personal-dir snapshot); it "
                    "starts from its initialisation", partition, before)
    return None


def _round_of(path: Path) -> int:
    return int(path.name.split("-round-")[1].split(".")[0])
