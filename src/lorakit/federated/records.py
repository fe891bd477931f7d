"""Adapters on the wire: ``AdapterState`` <-> Flower records, and the bytes they take.

An ``ArrayRecord`` holds an adapter's tensors under ``t/<module path>/<tensor>`` (adapter tensors),
``m/<module path>/<tensor>`` (``modules_to_save``) and ``b//<parameter>`` (trained base biases); module paths
never contain ``/``, so a key splits back unambiguously. The adapter config travels as JSON in a
``ConfigRecord``. Nothing else of a model is ever put in a record.
"""
from __future__ import annotations

import json
from typing import Iterable

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from ..core.config import AdapterConfig
from ..core.state import AdapterState
from ..formats.peft import config_class_for

GROUPS = {"t": "tensors", "m": "modules_to_save", "b": "base_tensors"}


def to_arrays(state: AdapterState, skip: Iterable[str] = ()) -> ArrayRecord:
    """The state's tensors as an ArrayRecord, leaving out adapter tensors named in ``skip``."""
    skip = set(skip)
    record = ArrayRecord()
    for tag, group in (("t", state.tensors), ("m", state.modules_to_save)):
        for path, tensors in group.items():
            for key, t in tensors.items():
                if tag == "t" and key in skip:
                    continue
                record[f"{tag}/{path}/{key}"] = Array(t.detach().cpu().contiguous().numpy())
    for name, t in state.base_tensors.items():
        record[f"b//{name}"] = Array(t.detach().cpu().contiguous().numpy())
    return record


def from_arrays(record: ArrayRecord, config: AdapterConfig) -> AdapterState:
    """An AdapterState from ``to_arrays`` output; a ValueError names any key that is not of that form."""
    groups: dict[str, dict] = {"t": {}, "m": {}, "b": {}}
    for full_key, array in record.items():
        tag, _, rest = full_key.partition("/")
        path, _, key = rest.partition("/")
        if tag not in GROUPS or not key or (tag != "b" and not path):
            raise ValueError(f"record key {full_key!r} is not '<t|m|b>/<module path>/<tensor>'")
        tensor = torch.from_numpy(array.numpy().copy())
        if tag == "b":
            groups["b"][key] = tensor
        else:
            groups[tag].setdefault(path, {})[key] = tensor
    return AdapterState(config, groups["t"], groups["m"], groups["b"])


def config_record(config: AdapterConfig, **extra) -> ConfigRecord:
    """A ConfigRecord carrying ``config`` as JSON (key ``adapter-config``) plus ``extra`` scalars."""
    return ConfigRecord({"adapter-config": json.dumps(config.to_dict()), **extra})


def config_from_record(record: ConfigRecord) -> AdapterConfig:
    """The adapter config a ``config_record`` carries."""
    if "adapter-config" not in record:
        raise ValueError(f"the reply carries no 'adapter-config' (keys: {sorted(record)})")
    data = json.loads(str(record["adapter-config"]))
    return config_class_for(data, "adapter-config").from_dict(data, source="adapter-config")


def payload(record: ArrayRecord) -> dict[str, int]:
    """Bytes of a record: ``wire`` as Flower counts them, ``tensors`` of raw numbers, ``params`` scalars."""
    tensors = params = 0
    for array in record.values():
        a = array.numpy()
        tensors += a.nbytes
        params += a.size
    return {"wire": record.count_bytes(), "tensors": tensors, "params": params}
