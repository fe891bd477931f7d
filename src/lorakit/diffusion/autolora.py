"""AutoLoRA: gated fusion of several LoRAs with weights per LoRA, per layer, per timestep (and per token, channel).

Paper: "AutoLoRA: Automatic LoRA Retrieval and Fine-Grained Gated Fusion for Text-to-Image Generation" (Li et al.,
arXiv 2508.02107); official code lzws/AutoLoRA (``train_merger.py``: ``LoraMergerNobase``, ``LoraPatcher``;
``diffsynth/vram_management/layers.py``: ``AutoLoRALinear``). Its retriever is ``lorakit.library`` (weights.py).
Update rule at every LoRA-carrying module l of the denoiser, with o the base layer's output and o_i = s_i B_i A_i x
LoRA i's output at its weight s_i (elementwise over tokens or pixels and channels):
    y = o + sum_i w_l * sigmoid(z_li) * o_i,
    z_li = LN(o_i) * u_l + LN(o) * LN(o_i) * v_l + b_l + P_l phi(t) + c_li
LN normalises over channels (no affine); u, v, b, w are per-channel vectors of module l, phi(t) sinusoidal features
of the timestep, P_l a (channels x features) matrix, c_li one number per LoRA and module.
Decisions, against the official gate (the ``no_base`` merger its test script loads):
- inputs: as official, each LoRA's output and its product with the base output, layer-normalised; the timestep and
  the text reach them through the activations. Added: P_l phi(t), an explicit timestep input (the official layer
  hands t to the patcher, whose merger ignores it), and c_li, a per-LoRA term (the official gate is shared by all
  LoRAs, trained on random pairs from a large pool; with a handful of LoRAs a per-LoRA term lets the gate learn
  which LoRA acts where and when). So a gate file is tied to its LoRAs and network; others are refused.
- initialisation: u, v, b, P, c zero and w = 2, so an untrained gate is the weighted merge (2 sigmoid(0) = 1); the
  official draws u, v, b at random with w = 0.512, tuned for FLUX.
- no Global-LoRA (the official fuses, besides the LoRAs, a rank-r decomposition of their sum).
- exact on PEFT's LoRA layers (Linear and Conv); a layer variant (DoRA) or merged weights are refused.
Training (the official objective and where we depart from it): ``autolora_train.py``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .compose import COMPOSERS, Composer

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


def _fused_forward(layer, gate: LayerGate, pairs, timestep):
    """A forward for PEFT LoRA ``layer``: base output plus its LoRAs' outputs, each weighted by the gate."""
    conv = not isinstance(layer.base_layer, nn.Linear)

    def forward(x, *args, **kwargs):
        base = layer.base_layer(x, *args, **kwargs)
        present = [(a, i) for a, i in pairs if a in layer.lora_A and a in layer.active_adapters]
        if not present:
            return base
        outs = torch.stack([layer.lora_B[a](layer.lora_A[a](layer.lora_dropout[a](x))) * layer.scaling[a]
                            for a, _ in present])
        t = timestep().to(base.device).flatten().expand(base.shape[0]) if timestep().numel() == 1 else timestep()
        index = torch.tensor([i for _, i in present], device=base.device)
        if conv:  # channels last for the gate: (B, C, H, W) -> (B, H, W, C)
            base_c, outs_c = base.movedim(1, -1), outs.movedim(2, -1)
            return base + (gate(base_c, outs_c, index, time_features(t)) * outs_c).sum(0).movedim(-1, 1)
        return base + (gate(base, outs, index, time_features(t)) * outs).sum(0)

    return forward


@contextmanager
def gated(denoiser, gates: Gates, adapters, timestep):
    """Within the block the LoRA layers fuse ``adapters`` through ``gates``; ``timestep()`` gives the current t."""
    index = gates.check(denoiser, adapters)
    layers = lora_layers(denoiser, adapters)
    for name, layer in layers.items():
        for a in adapters:
            if a in layer.lora_A and (a in getattr(layer, "lora_variant", {}) or layer.merged):
                raise ValueError(f"autolora: module {name!r} holds LoRA {a!r} as a variant (e.g. DoRA) or merged "
                                 f"into the weights; gated fusion needs plain unmerged LoRA layers")
    try:
        for name, layer in layers.items():
            layer.forward = _fused_forward(layer, gates.gate(name), list(zip(adapters, index)), timestep)
        yield gates
    finally:
        for layer in layers.values():
            layer.__dict__.pop("forward", None)


@COMPOSERS.register()
class AutoLoRA(Composer):
    """All LoRAs at every step, fused per module by trained gates (option ``gates``: a file or a ``Gates``)."""

    name = "autolora"
    gates: str = ""

    def __init__(self, adapters, weights=None, layout=None, gates=None, **options):
        self._gates = gates if isinstance(gates, Gates) else None
        given = {} if gates is None or self._gates is not None else {"gates": str(gates)}
        super().__init__(adapters, weights, layout=layout, **given, **options)
        self._open = None

    def open(self, denoiser):
        if self._gates is None and not self.gates:
            raise ValueError("autolora needs trained gates: pass gates=FILE (lorakit diffuse --gates FILE); "
                             "train them with `lorakit diffuse-gates`")
        gates = self._gates or load_gates(self.gates)
        self._open = gated(denoiser, gates, self.adapters, lambda: torch.as_tensor(self.timestep).flatten())
        self._open.__enter__()

    def close(self):
        if self._open is not None:
            self._open.__exit__(None, None, None)
            self._open = None

    def predict(self, step, run):
        return run(self.adapters, self.weights)
