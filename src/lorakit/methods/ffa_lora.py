"""FFA-LoRA: Improving LoRA in Privacy-preserving Federated Learning (Sun et al., arXiv:2403.12313).

Update rule: h = W x + s · B A x with s = lora_alpha / r, A [r, in] frozen at a seeded random initialisation
and B [out, r] (zero at the start) the only trained tensor. Every client that builds the adapter from the same
config regenerates the same A, so averaging B across clients is exact: mean_k(B_k) A = mean_k(B_k A).

Files: PEFT LoRA files (``peft_type: "LORA"``, ``lora_A.weight`` and ``lora_B.weight``) plus the marker
``lorakit_method: "ffa_lora"`` and ``ffa_seed``. PEFT and vLLM load them as plain LoRA (they ignore the two
extra keys), with identical outputs; lorakit loads them back as FFA-LoRA with A frozen. A PEFT file without
the marker loads as plain LoRA. A is stored in the file as well, so a file never depends on the seed to load.

Decisions and deviations:
- A is drawn like PEFT's default (Kaiming-uniform, a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))), or N(0, 1/r) with
  ``init_lora_weights="gaussian"``; the paper only requires a shared non-zero random A, and its code uses
  PEFT's default initialisation with ``lora_A`` frozen.
- A comes from a generator seeded by crc32(``ffa_seed`` / module path), not from torch's global RNG,
  so it does not depend on the order modules are built in or on other code drawing random numbers.
- A is a buffer, not a parameter with ``requires_grad=False``: no optimiser, weight decay or
  ``load_peft(..., is_trainable=True)`` can move it.
- Linear and Conv1D layers only (embedding LoRA initialises A to zero, which FFA cannot freeze usefully).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.adapter import FrozenLinear
from ..core.capabilities import LORA_PAIR
from ..core.config import LoRAConfig
from ..core.registry import METHODS
from .lora import LoRALinear


@dataclass(frozen=True)
class FFALoRAConfig(LoRAConfig):
    """FFA-LoRA: LoRA with A frozen at a random matrix regenerated from ``ffa_seed``; only B trains."""

    peft_type: ClassVar[str] = "LORA"
    method: ClassVar[str] = "ffa_lora"

    ffa_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.ffa_seed < 2**31:
            raise ValueError(f"FFALoRAConfig.ffa_seed must be in [0, 2**31), found {self.ffa_seed}")

    @classmethod
    def claims(cls, data: dict) -> bool:
        return data.get("lorakit_method") == cls.method

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["lorakit_method"] = self.method  # peft_type stays LORA, so PEFT loads the file as plain LoRA
        return out


def frozen_a(config: FFALoRAConfig, module_path: str, in_features: int) -> torch.Tensor:
    """The A [r, in] (fp32, CPU) every client regenerates for ``module_path`` from ``config.ffa_seed``."""
    # torch's CPU generator keeps only 32 bits of its seed: hash seed and path together into them
    g = torch.Generator().manual_seed(zlib.crc32(f"{config.ffa_seed}/{module_path}".encode()))
    init = config.init_lora_weights
    if isinstance(init, str) and init.lower() == "gaussian":
        return torch.randn(config.r, in_features, generator=g) / config.r
    bound = 1 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on a [r, in] weight
    return torch.rand(config.r, in_features, generator=g) * (2 * bound) - bound


@METHODS.register()
class FFALoRALinear(LoRALinear):
    """FFA-LoRA on ``nn.Linear`` and ``Conv1D``: ``lora_A`` is a frozen buffer, ``lora_B`` trains."""

    name = "ffa_lora"
    capabilities = LORA_PAIR
    config_class = FFALoRAConfig
    tensor_names = ("lora_A.weight", "lora_B.weight")
    param_formula = "r·out"

    def reset_parameters(self) -> None:
        init = self.config.init_lora_weights
        if not (init in (True, False) or (isinstance(init, str) and init.lower() == "gaussian")):
            raise ValueError(f"module '{self.module_path}': FFA-LoRA supports init_lora_weights True, False or "
                             f"'gaussian', found {init!r}")
        w = self.lora_A.weight
        a = frozen_a(self.config, self.module_path, self.in_features).to(device=w.device, dtype=w.dtype)
        if isinstance(self.lora_A, FrozenLinear):
            self.lora_A.weight.copy_(a)
        else:
            self.lora_A = FrozenLinear(a)
        if init is not False:
            nn.init.zeros_(self.lora_B.weight)
