"""Server-side checks on a client's update before it is aggregated.

``problems(update, reference, mixed_ranks)`` lists what is wrong with an update compared with the global
adapter: modules or tensors outside the agreed targets, missing ones, wrong shapes (the rank may differ only
where the strategy allows mixed ranks) or dtypes, and non-finite values. ``identity_problems`` compares what the
client declares it trained (adapter method, base-model fingerprint) with the server's. An empty list means the
update is accepted.
"""
from __future__ import annotations

import math

import torch

from ..core.state import AdapterState, Tensors
from .aggregation import A_KEYS, B_KEYS


def _rank_dim(key: str) -> int | None:
    return 0 if key in A_KEYS else 1 if key in B_KEYS else None


def _group_problems(what: str, got: Tensors, want: Tensors, mixed_ranks: bool) -> list[str]:
    out = []
    extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
    if extra:
        out.append(f"{what} outside the agreed targets: {', '.join(extra[:5])}")
    if missing:
        out.append(f"{what} missing: {', '.join(missing[:5])}")
    for path in sorted(set(got) & set(want)):
        keys, ref_keys = set(got[path]), set(want[path])
        if keys != ref_keys:
            out.append(f"'{path}': tensors {sorted(keys)}, expected {sorted(ref_keys)}")
            continue
        ranks = set()
        for key in sorted(keys):
            t, ref = got[path][key], want[path][key]
            dim = _rank_dim(key) if mixed_ranks else None
            shape, expected = list(t.shape), list(ref.shape)
            if dim is not None and len(shape) == len(expected) and shape[dim] >= 1:
                ranks.add(shape[dim])
                shape[dim] = expected[dim] = -1  # any rank, checked for agreement between A and B below
            if shape != expected:
                out.append(f"'{path}.{key}': shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
            elif t.dtype != ref.dtype:
                out.append(f"'{path}.{key}': dtype {t.dtype}, expected {ref.dtype}")
            elif t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                out.append(f"'{path}.{key}': {bad} NaN/inf value(s)")
        if len(ranks) > 1:
            out.append(f"'{path}': A and B disagree on the rank ({sorted(ranks)})")
    return out


def problems(update: AdapterState, reference: AdapterState, mixed_ranks: bool = False,
             num_examples: float | None = None) -> list[str]:
    """What makes ``update`` unfit to aggregate against ``reference`` (empty when it is fine)."""
    out = _group_problems("modules", update.tensors, reference.tensors, mixed_ranks)
    out += _group_problems("modules_to_save", update.modules_to_save, reference.modules_to_save, False)
    out += _group_problems("base tensors", {"": update.base_tensors}, {"": reference.base_tensors}, False)
    if num_examples is not None and (not math.isfinite(num_examples) or num_examples < 0):
        out.append(f"num-examples is {num_examples}; expected a finite count >= 0")
    return out


def identity_problems(declared: dict, reference_config, base_id: str) -> list[str]:
    """What the reply's declared method (``adapter-config``) and base (``base-id``) get wrong, if anything."""
    out = []
    want = reference_config.to_dict()
    got = declared.get("config")
    if got is None:
        out.append("the reply declares no adapter config")
    else:
        for key in ("peft_type", "lorakit_method", "use_dora"):
            if got.get(key, want.get(key)) != want.get(key):
                out.append(f"method: {key}={got.get(key)!r}, expected {want.get(key)!r}")
    if declared.get("base-id") != base_id:
        out.append(f"base model: fingerprint {declared.get('base-id')!r}, expected {base_id!r} (another base model)")
    return out
