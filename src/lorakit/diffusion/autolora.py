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
The gates and their file: ``gates.py``; training (the official objective and where we depart from it):
``autolora_train.py``.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .compose import COMPOSERS, Composer, timesteps
from .gates import Gates, LayerGate, load_gates, lora_layers, time_features

__all__ = ["AutoLoRA", "Gates", "gated", "load_gates"]


def _fused_forward(layer, gate: LayerGate, pairs, timestep):
    """A forward for PEFT LoRA ``layer``: base output plus its LoRAs' outputs, each weighted by the gate."""
    conv = not isinstance(layer.base_layer, nn.Linear)

    def forward(x, *args, **kwargs):
        base = layer.base_layer(x, *args, **kwargs)
        present = [(a, i) for a, i in pairs if a in layer.lora_A and a in layer.active_adapters]
        if not present or layer.disable_adapters:
            return base
        outs = torch.stack([layer.lora_B[a](layer.lora_A[a](layer.lora_dropout[a](x))) * layer.scaling[a]
                            for a, _ in present])
        t = timestep().to(base.device).flatten().expand(base.shape[0]) if timestep().numel() == 1 else timestep()
        index = torch.tensor([i for _, i in present], device=base.device)
        if conv:  # channels last for the gate: (B, C, H, W) -> (B, H, W, C)
            base, outs = base.movedim(1, -1), outs.movedim(2, -1)
        weights = gate(base, outs, index, time_features(t)).to(outs.dtype)  # the gate computes in float32
        y = base + (weights * outs).sum(0)
        return y.movedim(-1, 1) if conv else y

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

    def bind(self, pipe, denoiser):
        if self._gates is None and not self.gates:
            raise ValueError("autolora needs trained gates: pass gates=FILE (lorakit diffuse --gates FILE); "
                             "train them with `lorakit diffuse-gates`")
        gates = self._gates if self._gates is not None else load_gates(self.gates)
        self._open = gated(denoiser, gates, self.adapters, lambda: timesteps(self.timestep))
        try:
            self._open.__enter__()
        except BaseException:
            self.unbind()
            raise

    def unbind(self):
        if self._open is not None:
            self._open.__exit__(None, None, None)
            self._open = None

    def predict(self, step, run):
        return run(self.adapters, self.weights)
