"""SLoRA / NLoRA / IntTune: NLoRA: Nyström-Initiated Low-Rank Adaptation for Large Language Models
(Guo et al., arXiv:2502.14482).

Update rule: h = W x + s · B N A x with s = lora_alpha / r and an r x r matrix N between A [r, in] and B [out, r].
``mode="slora"``: A and N Kaiming-uniform, B zero (identity at the start), all three trained.
``mode="nlora"``: Nyström initialisation from the first r rows and columns of W: A = W[:r, :], B = W[:, :r],
N = W[:r, :r]; all three trained. ``mode="inttune"``: NLoRA's initialisation, only N trained (r² per module).

[UNVERIFIED] points, decided from the official code (TracyGuo2001/NLoRA, ``LoraLayer.nlora_init``, ``inttune.py``):
- ``nystrom_core="W11"`` (default) copies W11 itself, as the released code does; ``"pinv"`` uses the textbook
  Nyström core pinv(W11), so that B N A = C W11⁺ R reproduces W exactly when rank(W) = r.
- ``residual=False`` (default) does not subtract s · B N A from W, as the released code: the model starts away
  from the pretrained one (``identity_at_init`` is False). ``residual=True`` starts at W exactly: lorakit never
  edits the base weight, so the forward subtracts s · C N₀ R instead, recomputed from the base weight's own
  rows and columns (N₀ is the initial core); ``low_rank`` is then None, as the update needs the base weight.
- Rows and columns are the first r, not sampled. Embedding layers are not supported (Linear and Conv1D only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.capabilities import LOW_RANK, MERGE_ONLY
from ..core.config import LoRAConfig
from ..core.registry import METHODS
from .lora_xs import LoRAXSLinear, oriented

MODES = ("slora", "nlora", "inttune")


@dataclass(frozen=True)
class NLoRAConfig(LoRAConfig):
    """Three-matrix LoRA: SLoRA, NLoRA (Nyström initialisation) or IntTune (only the middle trains)."""

    peft_type: ClassVar[str] = "LORAKIT_NLORA"
    method: ClassVar[str] = "nlora"

    mode: str = "nlora"
    nystrom_core: str = "W11"
    residual: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"NLoRAConfig.mode must be one of {MODES}, found {self.mode!r}")
        if self.nystrom_core not in ("W11", "pinv"):
            raise ValueError(f"NLoRAConfig.nystrom_core must be 'W11' or 'pinv', found {self.nystrom_core!r}")


def nystrom(weight: torch.Tensor, config: NLoRAConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(R = W[:r, :], core, C = W[:, :r]) of an [out, in] weight: C · core · R is the Nyström form."""
    r = config.r
    w11 = weight[:r, :r]
    core = torch.linalg.pinv(w11.float()).to(weight.dtype) if config.nystrom_core == "pinv" else w11
    return weight[:r], core, weight[:, :r]


def _subtracts(config: NLoRAConfig) -> bool:
    return config.residual and config.mode != "slora"


@METHODS.register()
class NLoRALinear(LoRAXSLinear):
    """SLoRA / NLoRA / IntTune on ``nn.Linear`` and ``Conv1D``."""

    name = "nlora"
    capabilities = LOW_RANK
    config_class = NLoRAConfig
    middle: ClassVar[str] = "lora_N"
    tensor_names = ("lora_A.weight", "lora_B.weight", "lora_N.weight")
    param_formula = "r·(in+out) + r² (mode='inttune': r²)"

    def factors_trainable(self) -> bool:
        return self.config.mode != "inttune"

    def initial_factors(self, weight):
        r = self.r
        if self.config.mode == "slora":
            a, n = torch.empty(r, weight.shape[1]), torch.empty(r, r)
            for t in (a, n):
                nn.init.kaiming_uniform_(t, a=math.sqrt(5))
            return a, n, torch.zeros(weight.shape[0], r)
        if r > min(weight.shape):
            raise ValueError(f"module '{self.module_path}': rank r={r} exceeds min(out, in)={min(weight.shape)}")
        return tuple(t.clone() for t in nystrom(weight, self.config))

    @classmethod
    def delta(cls, tensors, config, base_weight):
        delta = super().delta(tensors, config, base_weight)
        if not _subtracts(config):
            return delta
        if base_weight is None:
            raise ValueError("NLoRA with residual=True: the update depends on the base weight; pass base_weight")
        rows, core, cols = nystrom(oriented(base_weight, config).to(delta.dtype), config)
        start = cols @ core @ rows * config.scaling
        return delta - (start.T if config.fan_in_fan_out else start)

    @classmethod
    def low_rank(cls, tensors, config):
        return None if _subtracts(config) else super().low_rank(tensors, config)

    @classmethod
    def capabilities_for(cls, config):
        return MERGE_ONLY if _subtracts(config) else cls.capabilities  # the start C N0 R comes from W

    def update(self, x: torch.Tensor) -> torch.Tensor:
        out = super().update(x)
        if not _subtracts(self.config):
            return out
        # the start C N0 R x, from the base weight's rows and columns (sliced before the cast)
        rows, core, cols = (t.to(x.dtype) for t in nystrom(oriented(self.base_layer.weight, self.config), self.config))
        return out - F.linear(F.linear(F.linear(x, rows), core), cols)
