"""AutoLoRA's gates: one small gate per LoRA-carrying module, their file, and their fit to a network and LoRAs.

The gate's form and the decisions behind it are in ``autolora.py``; ``Gates.check`` refuses another network (a
module without a gate, or other channel counts) and LoRAs whose factors differ from those the gates were trained
for (a fingerprint per LoRA), naming both sides.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

FEATURES = 8  # timestep features: sin and cos of 4 frequencies of t / 1000
FORMAT = "lorakit-autolora-gates"


def time_features(t: torch.Tensor) -> torch.Tensor:
    """(B,) timesteps -> (B, FEATURES) sinusoidal features."""
    angles = t.float()[:, None] / 1000 * math.pi * torch.arange(1, FEATURES // 2 + 1, device=t.device)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class LayerGate(nn.Module):
    """The gate of one LoRA-carrying module: fusion weights (N, B, ..., C) for N LoRA outputs, channels last."""

    def __init__(self, channels: int, n_loras: int):
        super().__init__()
        self.u, self.v, self.b = (nn.Parameter(torch.zeros(channels)) for _ in range(3))
        self.w = nn.Parameter(torch.full((channels,), 2.0))
        self.time = nn.Parameter(torch.zeros(channels, FEATURES))
        self.lora = nn.Parameter(torch.zeros(n_loras))

    def forward(self, base: torch.Tensor, outs: torch.Tensor, index: torch.Tensor, phi: torch.Tensor):
        norm = lambda x: nn.functional.layer_norm(x, x.shape[-1:])  # noqa: E731
        lo = norm(outs)
        per_sample = (phi @ self.time.T).reshape(phi.shape[0], *[1] * (base.dim() - 2), -1)  # (B, 1.., C)
        z = lo * self.u + norm(base) * lo * self.v + self.b + per_sample + self.lora[index].reshape(-1, *[1] * base.dim())
        return self.w * torch.sigmoid(z)


def lora_layers(denoiser, adapters) -> dict[str, nn.Module]:
    """{module path: PEFT LoRA layer} of the modules carrying any of ``adapters``."""
    return {n: m for n, m in denoiser.named_modules() if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)
            and any(a in m.lora_A for a in adapters)}


def channels_of(layer: nn.Module) -> int:
    base = layer.base_layer
    return base.out_features if isinstance(base, nn.Linear) else base.out_channels


def fingerprint(denoiser, adapter: str) -> str:
    """A short hash of the adapter's factors in the denoiser (which LoRA a gate was trained for)."""
    h = hashlib.sha256()
    for name, layer in sorted(lora_layers(denoiser, [adapter]).items()):
        if adapter in layer.lora_A:
            for f in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight):
                h.update(name.encode())
                h.update(f.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class Gates(nn.Module):
    """The AutoLoRA gates of one network and set of LoRAs: a ``LayerGate`` per LoRA-carrying module."""

    def __init__(self, layers: dict[str, int], loras: list[dict]):
        super().__init__()
        self.layers, self.loras, self.source = dict(layers), list(loras), "gates"
        self.gates = nn.ModuleDict({k.replace(".", "/"): LayerGate(c, len(loras)) for k, c in self.layers.items()})

    @classmethod
    def for_denoiser(cls, denoiser, adapters) -> "Gates":
        """Untrained gates (the weighted merge) for ``adapters`` loaded in ``denoiser``."""
        layers = {n: channels_of(m) for n, m in lora_layers(denoiser, adapters).items()}
        return cls(layers, [{"name": a, "fingerprint": fingerprint(denoiser, a)} for a in adapters])

    def gate(self, layer: str) -> LayerGate:
        return self.gates[layer.replace(".", "/")]

    def check(self, denoiser, adapters) -> list[int]:
        """Each adapter's index among the gates' LoRAs; an error names another network or an unknown LoRA."""
        for name, layer in lora_layers(denoiser, adapters).items():
            if name not in self.layers:
                raise ValueError(f"{self.source}: made for another network: it has no gate for module {name!r}")
            if self.layers[name] != channels_of(layer):
                raise ValueError(f"{self.source}: made for another network: module {name!r} has {channels_of(layer)} "
                                 f"output channels, the gate {self.layers[name]}")
        known = {lora["fingerprint"]: i for i, lora in enumerate(self.loras)}
        index = []
        for a in adapters:
            fp = fingerprint(denoiser, a)
            if fp not in known:
                trained = ", ".join(f"{x['name']} ({x['fingerprint']})" for x in self.loras)
                raise ValueError(f"{self.source}: trained for the LoRAs {trained}; LoRA {a!r} ({fp}) is not one of "
                                 f"them; train gates for these LoRAs with `lorakit diffuse-gates`")
            index.append(known[fp])
        return index

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the gates as a safetensors file (atomically)."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "layers": json.dumps(self.layers), "loras": json.dumps(self.loras),
                "features": str(FEATURES)}
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".safetensors", delete=False) as tmp:
            save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, tmp.name, metadata=meta)
        os.replace(tmp.name, path)
        return path


def load_gates(path: str | Path) -> Gates:
    """Gates written by ``Gates.save``; an error names a file of another kind."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no gates file at {path} (train one with `lorakit diffuse-gates`)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error type for a file of another kind
        raise ValueError(f"{path}: not a safetensors file ({e})") from None
    if meta.get("format") != FORMAT or meta.get("features") != str(FEATURES):
        raise ValueError(f"{path}: not an AutoLoRA gates file of this version (format {meta.get('format')!r})")
    gates = Gates(json.loads(meta["layers"]), json.loads(meta["loras"]))
    gates.load_state_dict(load_file(str(path)))
    gates.source = str(path)
    return gates
