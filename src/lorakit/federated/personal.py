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

Deviations from FedPer: the personal layers are adapters on frozen base layers (or copies of saved modules),
not whole layers; restarting strategies (FLoRA, fedavg_dense) are refused, since they fold the global update
into each client's base weights and no single adapter on the original base would then hold a client's model.
Per-client evaluation: the bundled tasks have no per-client test split, so a client's score is the mean over
categories of the held-out score on that category, weighted by the category's share of the client's shard.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..core.state import AdapterState

MESSAGE = "query.personalise"


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
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({f"client-{k}": f"client-{k}" for k in sorted(clients)}, indent=1))
    os.replace(tmp, path)
    return path
