"""Which base model an adapter was made for: architecture, parameter shapes and a sample of the weights.

``record(model)`` describes a base model (a plain one, or one with adapters: wrapped layers count by their
``base_layer``, adapter tensors are left out) as a JSON-ready dict: the model class, every base parameter's name
and shape, four values of each of up to ``SAMPLED`` parameters (evenly spaced positions) and ``fingerprint``, a
short SHA-256 digest of all of it. ``mismatch(a, b)`` says how two records differ (architecture, shapes,
weights) or returns None. Weights compare with a tolerance (bf16 rounding) so that the same model in float32
and bfloat16 matches. Values that an adapter changed in the model it was recorded from (base weights of a
base-mutating initialiser such as PiSSA, trained base biases) and values the adapter replaces (the base of a
``modules_to_save`` module, e.g. a randomly initialised classification head) are ``null`` and not compared.
"""
from __future__ import annotations

import hashlib
import json
from typing import Optional

import torch
from torch import nn

from .apply import wrapped_modules
from .named import adapter_configs
from .adapter import Adapter
from .registry import initializer_for

SAMPLED = 128  # parameters whose values are sampled
PER_PARAMETER = 4  # values sampled from each
RTOL, ATOL = 1e-2, 1e-6  # bf16 keeps 8 significant bits: 2**-8 relative error
ATTR = "lorakit_base_record"  # set on a model by `remember`


def base_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters under their names without adapters (no adapter tensors, no trainable copies)."""
    wrapped = set(wrapped_modules(model))
    out = {}
    for name, p in model.named_parameters():
        parts, kept = name.split("."), []
        for i, part in enumerate(parts):
            if i and ".".join(parts[:i]) in wrapped:
                if part != "base_layer":
                    break  # an adapter tensor, or a trainable copy
                continue  # under an adapter (or nested adapters) the base keeps its own name
            kept.append(part)
        else:
            out[".".join(kept)] = p
    return dict(sorted(out.items()))


def _changed_by_adapter(model: nn.Module) -> set[str]:
    """Base parameters whose values the adapter changed: mutated base weights, trained base biases."""
    wrapped = wrapped_modules(model)
    if not wrapped:
        return set()
    changed = set()
    inits = [initializer_for(c.init_lora_weights) for c in adapter_configs(model).values()]
    if any(init is not None and init.mutates_base for init in inits):
        changed |= {f"{path}.{k}" for path, m in wrapped.items() if isinstance(m, Adapter)
                    for k, _ in m.base_layer.named_parameters()}
    return changed | {n for n, p in base_parameters(model).items() if p.requires_grad and n.endswith("bias")}


def _replaced_by_adapter(model: nn.Module) -> set[str]:
    """Base parameters of ``modules_to_save``: the adapter brings its own, so their values do not matter."""
    return {f"{path}.{k}" for path, m in wrapped_modules(model).items() if not isinstance(m, Adapter)
            for k, _ in m.base_layer.named_parameters()}


def _sample(p: torch.Tensor) -> list[float]:
    p = p.detach()
    if type(p) is not torch.Tensor and not isinstance(p, nn.Parameter) and hasattr(p, "dequantize"):
        p = p.dequantize()  # tensor subclasses of quantised weights (torchao) sample their values
    flat = p.reshape(-1)
    idx = torch.linspace(0, flat.numel() - 1, min(PER_PARAMETER, flat.numel())).round().long()
    idx.clamp_(max=flat.numel() - 1)  # float32 rounds numel - 1 up to numel above 2**24 elements
    return flat[idx.to(flat.device)].float().cpu().tolist()


def _digest(architecture: str, shapes: dict, values: dict) -> str:
    def bf16(v):  # rounded so that a bf16 copy of a float32 model has the same digest
        return None if v is None else torch.tensor(v).to(torch.bfloat16).float().tolist()

    body = [architecture, [[n, s, bf16(values.get(n))] for n, s in shapes.items()]]
    return hashlib.sha256(json.dumps(body).encode()).hexdigest()[:16]


def record(model: nn.Module, skip_values: frozenset = frozenset()) -> dict:
    """The JSON-ready description of ``model``'s base (as `remember` saw it, if it was called)."""
    skip = set(skip_values) | _replaced_by_adapter(model)
    rec = getattr(model, ATTR, None)
    if rec is None:
        params = base_parameters(model)
        names = list(params)
        skip |= _changed_by_adapter(model)
        rec = {"architecture": type(model).__name__, "shapes": {n: list(p.shape) for n, p in params.items()},
               "values": {n: _sample(params[n]) for n in names[:: max(1, -(-len(names) // SAMPLED))]}}
    values = {n: (None if n in skip else v) for n, v in rec["values"].items()}
    return {"fingerprint": _digest(rec["architecture"], rec["shapes"], values), "architecture": rec["architecture"],
            "shapes": rec["shapes"], "values": values}


def remember(model: nn.Module) -> nn.Module:
    """Record ``model``'s base now (before an initialiser changes it), for `record` and ``save_peft`` later."""
    setattr(model, ATTR, None)
    setattr(model, ATTR, record(model))
    return model


def matching(model: nn.Module, recorded: dict) -> dict:
    """``model``'s record, leaving out the values ``recorded`` left out, so equal models give equal digests."""
    return record(model, skip_values=frozenset(n for n, v in recorded.get("values", {}).items() if v is None))


def without(rec: dict, names: set) -> dict:
    """``rec`` with the parameters ``names`` left out (those an adapter file brings in full, e.g. resized embeddings)."""
    shapes = {n: s for n, s in rec["shapes"].items() if n not in names}
    values = {n: v for n, v in rec["values"].items() if n not in names}
    return {**rec, "fingerprint": _digest(rec["architecture"], shapes, values), "shapes": shapes, "values": values}


def compare(a: dict, b: dict) -> Optional[tuple[str, str]]:
    """(what differs: "architecture", "shapes" or "weights"; how) for two base records, or None when they agree."""
    if a.get("fingerprint") == b.get("fingerprint"):
        return None
    if a["architecture"] != b["architecture"]:
        return "architecture", f"architecture {a['architecture']} vs {b['architecture']}"
    sa, sb = a["shapes"], b["shapes"]
    only_a, only_b = sorted(set(sa) - set(sb)), sorted(set(sb) - set(sa))
    if only_a or only_b:
        return "shapes", (f"parameters differ: {len(only_a)} only in the first (e.g. {only_a[:1]}), {len(only_b)} "
                          f"only in the second (e.g. {only_b[:1]})")
    shape = next((n for n in sa if sa[n] != sb[n]), None)
    if shape is not None:
        return "shapes", f"shape of '{shape}': {tuple(sa[shape])} vs {tuple(sb[shape])}"
    for name, va in a["values"].items():
        vb = b["values"].get(name)
        if va is not None and vb is not None and not torch.allclose(torch.tensor(va), torch.tensor(vb), RTOL, ATOL):
            return "weights", f"same architecture and shapes, different weights (first in '{name}')"
    return None


def mismatch(a: dict, b: dict) -> Optional[str]:
    """How two base records differ (architecture, parameter shapes, weights), or None when they agree."""
    found = compare(a, b)
    return None if found is None else found[1]
