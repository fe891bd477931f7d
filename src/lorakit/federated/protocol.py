"""What the ServerApp and the ClientApp exchange, and how a client takes in what it receives.

Server -> client (``RecordDict``): ``global`` (ArrayRecord: the global adapter, without the tensors every party
already holds; for restarting strategies only ``modules_to_save``), ``config`` (server round, the global's
adapter config) and, for restarting strategies, ``updates`` / ``update-configs``: every merged round update the
node has not folded into its base weights yet (so a node that missed rounds catches up exactly).
Client -> server: ``arrays`` (its adapter), ``metrics`` (``num-examples``, ``train-loss``) and ``adapter``
(its adapter config, the last round folded into its base, its partition id).
"""
from __future__ import annotations

import json

import torch
from flwr.app import ArrayRecord, ConfigRecord
from torch import nn

from ..core.state import AdapterState
from .aggregation import A_KEYS, B_KEYS
from .records import from_arrays, to_arrays

SEP = "|"  # "<round>|<record key>" in the updates record


def pack_updates(history: dict[int, AdapterState], since: int) -> tuple[ArrayRecord, ConfigRecord]:
    """The round updates after round ``since``, as one ArrayRecord plus their configs."""
    arrays, configs = ArrayRecord(), ConfigRecord()
    for rnd in sorted(r for r in history if r > since):
        for key, value in to_arrays(history[rnd]).items():
            arrays[f"{rnd}{SEP}{key}"] = value
        configs[str(rnd)] = json.dumps(history[rnd].config.to_dict())
    return arrays, configs


def unpack_updates(arrays: ArrayRecord, configs: ConfigRecord, config_class) -> dict[int, AdapterState]:
    """Inverse of ``pack_updates``."""
    out = {}
    for rnd_key, raw in configs.items():
        prefix = f"{rnd_key}{SEP}"
        part = ArrayRecord({k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})
        out[int(rnd_key)] = from_arrays(part, config_class.from_dict(json.loads(str(raw)), source=f"update {rnd_key}"))
    return dict(sorted(out.items()))


def fold_deltas(deltas: dict[str, torch.Tensor], model: nn.Module, update: AdapterState) -> None:
    """Add ``update``'s ΔW (in each base weight's layout) to the running sums ``deltas``, in place."""
    for path in update.tensors:
        weight = model.get_submodule(path).weight
        delta = update.delta(path, weight.detach()).to(torch.float32)
        deltas[path] = deltas[path] + delta if path in deltas else delta


@torch.no_grad()
def add_to_base(model: nn.Module, deltas: dict[str, torch.Tensor]) -> nn.Module:
    """Merge summed updates into the base weights of a model that has no adapter yet."""
    for path, delta in deltas.items():
        weight = model.get_submodule(path).weight
        weight.add_(delta.to(weight.dtype))
    return model


def receive(own: AdapterState, incoming: AdapterState) -> AdapterState:
    """``own`` (the client's fresh adapter) with the server's tensors in place, at the client's ranks.

    A and B keep their leading ``min(r_client, r_global)`` components (the rest stay the client's own init) and
    B is rescaled by s_global / s_client, so s_client B_k A_k = s_global B[:, :r] A[:r]. Tensors the server did
    not send (FFA-LoRA's shared A) stay as they are.
    """
    tensors = {}
    for path, mine in own.tensors.items():
        theirs = incoming.tensors.get(path, {})
        ratio = incoming.module_config(path).scaling / own.module_config(path).scaling if theirs else 1.0
        out = dict(mine)
        for key, t in theirs.items():
            if key not in A_KEYS + B_KEYS:
                out[key] = t.to(mine[key].dtype)
                continue
            new = mine[key].detach().clone()
            if key in A_KEYS:
                r = min(t.shape[0], new.shape[0])
                new[:r] = t[:r].to(new.dtype)
            else:
                r = min(t.shape[1], new.shape[1])
                new[:, :r] = (t[:, :r] * ratio).to(new.dtype)
            out[key] = new
        tensors[path] = out
    saved = {**own.modules_to_save, **incoming.modules_to_save}
    return AdapterState(own.config, tensors, saved, {**own.base_tensors, **incoming.base_tensors})
