"""The prunable structure of a transformer: attention head groups and FFN channels per block, and slicing them.

A block's attention (Llama/Gemma style: ``q_proj k_proj v_proj o_proj`` with ``head_dim``) is pruned in groups of
one key/value head with the query heads that share it, so grouped-query attention keeps its ratio; the FFN
(``gate_proj``/``up_proj``/``down_proj``, or BERT's ``intermediate.dense``/``output.dense``) in channels. The
producers (q, k, v, gate, up) lose output rows, the consumers (o, down) the matching input columns. BERT-style
attention derives its head size from ``hidden_size / num_attention_heads``, so a plain ``BertConfig`` cannot
describe fewer heads: there only FFN channels are pruned.

A ``Plan`` keeps, per block, the sorted indices of the kept groups and channels. Every block keeps the same
number of each, because a Hugging Face config holds one ``intermediate_size`` and one head count for all layers:
that is what lets ``transformers`` load the pruned model without lorakit.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..core.adapter import Adapter

Plan = dict[str, dict[str, list[int]]]  # block path -> {"groups": kept kv groups, "channels": kept FFN channels}


@dataclass
class Block:
    """Paths of one transformer block's prunable layers, and the sizes of its groups."""

    path: str
    q: Optional[str] = None
    k: Optional[str] = None
    v: Optional[str] = None
    o: Optional[str] = None
    ups: tuple = ()  # producers of FFN channels (gate, up)
    down: Optional[str] = None
    head_dim: int = 0
    groups: int = 0  # key/value heads
    rep: int = 1  # query heads per key/value head
    channels: int = 0

    @property
    def producers(self) -> dict[str, str]:
        """Path -> "attn_q" / "attn_kv" / "ffn" for the layers that lose output rows."""
        out = {p: "ffn" for p in self.ups}
        if self.groups > 1:
            out.update({self.q: "attn_q", self.k: "attn_kv", self.v: "attn_kv"})
        return out

    @property
    def consumers(self) -> dict[str, str]:
        """Path -> "attn" / "ffn" for the layers that lose input columns."""
        return {self.down: "ffn", **({self.o: "attn"} if self.groups > 1 else {})}


def linear(module: nn.Module) -> nn.Module:
    """The plain layer under an adapter wrapper (or the module itself)."""
    return module.base_layer if isinstance(module, Adapter) else module


def out_features(module: nn.Module) -> int:
    m = linear(module)
    return m.out_features if hasattr(m, "out_features") else m.weight.shape[0]


def blocks(model: nn.Module) -> list[Block]:
    """The prunable blocks of ``model`` in order; a clear error for a model with none."""
    found = []
    for path, m in model.named_modules():
        if all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj")):  # Llama/Gemma MLP
            block = Block(path.rsplit(".", 1)[0], ups=(f"{path}.gate_proj", f"{path}.up_proj"), down=f"{path}.down_proj",
                          channels=out_features(m.up_proj))
        elif hasattr(m, "intermediate") and hasattr(m, "output") and hasattr(getattr(m, "intermediate"), "dense"):
            block = Block(path, ups=(f"{path}.intermediate.dense",), down=f"{path}.output.dense",
                          channels=out_features(m.intermediate.dense))
        else:
            continue
        attn = next((a for n, a in model.get_submodule(block.path).named_children() if hasattr(a, "q_proj")), None)
        if attn is not None and hasattr(attn, "head_dim"):
            name = next(n for n, a in model.get_submodule(block.path).named_children() if a is attn)
            base = f"{block.path}.{name}"
            block.q, block.k, block.v, block.o = (f"{base}.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
            block.head_dim = attn.head_dim
            block.groups = out_features(attn.k_proj) // attn.head_dim
            block.rep = out_features(attn.q_proj) // (attn.head_dim * block.groups)
        found.append(block)
    if not found:
        raise ValueError(
            f"{type(model).__name__}: no prunable transformer block found (expected Llama/Gemma-style "
            "mlp.gate_proj/up_proj/down_proj or BERT-style intermediate.dense/output.dense)"
        )
    return found


def rows_of(kind: str, kept: list[int], block: Block) -> torch.Tensor:
    """Output rows a producer keeps, from the kept groups or channels."""
    if kind == "ffn":
        return torch.tensor(kept, dtype=torch.long)
    per = block.head_dim * (block.rep if kind in ("attn_q", "attn") else 1)
    return torch.cat([torch.arange(g * per, (g + 1) * per) for g in kept]) if kept else torch.zeros(0, dtype=torch.long)


def kept_rows(plan: Plan, blocks_: list[Block]) -> dict[str, tuple[str, torch.Tensor]]:
    """Module path -> ("rows" or "cols", kept indices) for every layer the plan slices."""
    out = {}
    for block in blocks_:
        entry = plan.get(block.path, {})
        for path, kind in block.producers.items():
            kept = entry.get("channels" if kind == "ffn" else "groups")
            if kept is not None:
                out[path] = ("rows", rows_of(kind, kept, block))
        for path, kind in block.consumers.items():
            kept = entry.get("channels" if kind == "ffn" else "groups")
            if kept is not None:
                out[path] = ("cols", rows_of(kind, kept, block))
    return out


def sliced(layer: nn.Linear, axis: str, index: torch.Tensor) -> nn.Linear:
    """A new ``nn.Linear`` with only the kept output rows (``axis="rows"``) or input columns."""
    w = layer.weight.detach()
    w = w[index] if axis == "rows" else w[:, index]
    bias = layer.bias.detach() if layer.bias is not None else None
    if bias is not None and axis == "rows":
        bias = bias[index]
    out = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if bias is not None:
            out.bias.copy_(bias)
    out.weight.requires_grad_(layer.weight.requires_grad)
    return out


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Slice the plain linear layers of ``model`` in place as ``plan`` says and update its config to match."""
    found = blocks(model)
    counts = {(k, len(v)) for entry in plan.values() for k, v in entry.items()}
    if len({k for k, _ in counts}) != len(counts):
        raise ValueError("every block must keep the same number of channels and of head groups (one HF config)")
    for path, (axis, index) in kept_rows(plan, found).items():
        layer = model.get_submodule(path)
        if type(layer) is not nn.Linear:
            raise TypeError(f"module '{path}' is a {type(layer).__name__}; merge or remove adapters before slicing")
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, sliced(layer, axis, index))
    config = getattr(model, "config", None)
    if config is not None:
        for kind, n in counts:
            if kind == "channels":
                config.intermediate_size = n
            else:
                block = found[0]
                config.head_dim = block.head_dim  # explicit, so that fewer heads keep their size
                config.num_key_value_heads = n
                config.num_attention_heads = n * block.rep
    return model


def fingerprint(model: nn.Module) -> str:
    """A short hash of a model's parameter names, shapes and a strided sample of their values."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if ".lora_" in name or not isinstance(t, torch.Tensor):
            continue
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)][:256].float().cpu()
        h.update(f"{name.replace('.base_layer', '')}:{tuple(t.shape)}:".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]
