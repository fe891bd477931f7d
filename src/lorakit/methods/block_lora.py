"""Block-LoRA: "One Head Eight Arms: Block Matrix based Low Rank Adaptation for CLIP-based Few-Shot
Learning" (Zhou et al., arXiv:2501.16720).

Update rule: split the input into k chunks x = [x_1; ...; x_k] and LoRA's A into k column blocks that are
all one shared head A_s [r, in/k]; B [out, r] keeps one row block ("arm") per output chunk. Then
ΔW = s · B [A_s, ..., A_s] and ΔW x = s · B A_s (x_1 + ... + x_k): k−1 additions replace most of A's
multiplications, and A has in/k columns instead of in. s = lora_alpha / r; A_s Kaiming-uniform, B zero.

Decisions: the abstract says LoRA's matrices are partitioned into sub-matrices and "all down-projection
sub-matrices" are shared, turning matrix multiplication into addition; we could not read the paper's
equations, and found no official code, so this follows the method card's reading ([UNVERIFIED] there):
the down-projection is shared across input chunks, B stays whole (its row blocks are the arms).
``block_num`` (k) defaults to 8, the "eight arms" of the title; in_features must divide by it.
With block_num = 1 the method is plain LoRA. The tiled A makes ``low_rank`` exact, so a Block-LoRA
adapter can be served or merged as a LoRA of rank r.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.adapter import Adapter
from ..core.capabilities import LOW_RANK
from ..core.config import AdapterConfig
from ..core.registry import METHODS
from .lora import Conv1D


@dataclass(frozen=True)
class BlockLoRAConfig(AdapterConfig):
    """Block-LoRA: LoRA whose down-projection is one head shared by ``block_num`` input chunks."""

    peft_type: ClassVar[str] = "LORAKIT_BLOCK_LORA"
    method: ClassVar[str] = "block_lora"

    lora_alpha: float = 8
    lora_dropout: float = 0.0
    block_num: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_num < 1:
            raise ValueError(f"BlockLoRAConfig.block_num must be >= 1, found {self.block_num}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r


def tiled_a(tensors: dict, config: BlockLoRAConfig) -> torch.Tensor:
    """A = [A_s, ..., A_s] [r, in]."""
    return tensors["lora_A.weight"].repeat(1, config.block_num)


@METHODS.register()
class BlockLoRALinear(Adapter):
    """Block-LoRA on ``nn.Linear`` and transformers' ``Conv1D``."""

    name = "block_lora"
    capabilities = LOW_RANK
    config_class = BlockLoRAConfig
    layer_types = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())
    tensor_names = ("lora_A.weight", "lora_B.weight")
    param_formula = "r·out + r·in/block_num"

    def __init__(self, base_layer: nn.Module, config: BlockLoRAConfig, module_path: str = ""):
        super().__init__(base_layer, config, module_path)
        w = base_layer.weight
        out_f, in_f = self.features()
        if in_f % config.block_num:
            raise ValueError(
                f"module '{module_path}': in_features={in_f} does not split into block_num={config.block_num} "
                "equal chunks; choose a block_num that divides it or leave this module out of target_modules"
            )
        self.chunk = in_f // config.block_num
        kw = dict(device=w.device, dtype=self.adapter_dtype())
        self.lora_A = nn.Linear(self.chunk, config.r, bias=False, **kw)
        self.lora_B = nn.Linear(config.r, out_f, bias=False, **kw)
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @classmethod
    def low_rank(cls, tensors, config):
        return tiled_a(tensors, config), tensors["lora_B.weight"], config.scaling

    @classmethod
    def delta(cls, tensors, config, base_weight):
        delta = tensors["lora_B.weight"] @ tiled_a(tensors, config) * config.scaling
        return delta.T if config.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        h = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        summed = h.unflatten(-1, (self.config.block_num, self.chunk)).sum(-2)  # [..., in/k]: the additions
        return result + (self.lora_B(self.lora_A(summed)) * self.config.scaling).to(result.dtype)
