"""Bone: Block Affine Transformation as Parameter Efficient Fine-tuning Methods for Large Language Models
(Kang, arXiv:2409.15371; later versions "DiSHA"), in PEFT's current form MiSS (``peft.MissConfig``), which
replaced PEFT's Bone tuner. Files are PEFT MiSS files (``peft_type: "MISS"``, ``miss_block``) both ways.

Update rules, with r the block size and W [out, in] seen in r-wide shards:
- ``init_weights=True`` (default, MiSS): a block M [r, out], zero at the start; every r-column shard of W gets
  M^T, i.e. h = W x + M^T (Σ_j x_j) over the r-sized chunks x_j of the input (zero-padded when in % r ≠ 0; the
  remainder shard gets the first columns of M^T). r · out parameters; rank(ΔW) <= r.
- ``init_weights="bat"`` (Bone's "weight guide"): T [out/r, r, r], zero at the start; each r x r block W_ij
  becomes W_ij (I + T_i) + T_i, so ΔW_ij = W_ij T_i + T_i depends on W. Needs in % r == 0 and out % r == 0.
- ``init_weights="mini"``: M [r, mini_r] repeated out/mini_r times along the outputs (r · mini_r parameters).
- ``init_weights=False``: MiSS with M Kaiming-uniform (not the identity at the start), as PEFT.

Deviations: in "bat" mode PEFT runs F.linear with the materialised W + ΔW; we add F.linear(x, ΔW) to the base
layer's own output (the same function; ΔW must still be built each forward, since it depends on W). The PEFT
fields lorakit adds (``rank_pattern``, ``fan_in_fan_out``, ``init_lora_weights``) are left out of the file when
unused, so PEFT reads it without warnings. ``nn.Linear`` only, as PEFT's MiSS.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import Adapter
from ..core.capabilities import MERGE_ONLY
from ..core.config import AdapterConfig
from ..core.registry import METHODS


@dataclass(frozen=True)
class BoneConfig(AdapterConfig):
    """Bone / MiSS: a shared r-wide block added to every shard of the weight (PEFT's ``MissConfig`` fields)."""

    peft_type: ClassVar[str] = "MISS"
    method: ClassVar[str] = "bone"

    r: int = 64
    miss_dropout: float = 0.0
    mini_r: int = 1
    init_weights: Union[bool, str] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (True, False, "bat", "mini"):
            raise ValueError(f"BoneConfig.init_weights must be True, False, 'bat' or 'mini', found {self.init_weights!r}")

    def to_dict(self) -> dict:
        out = super().to_dict()
        for name, unused in (("rank_pattern", {}), ("fan_in_fan_out", False), ("init_lora_weights", True)):
            if out.get(name) == unused:
                out.pop(name)
        return out


def _check(config: BoneConfig, out_f: int, in_f: int, path: str) -> None:
    r, mode = config.r, config.init_weights
    problem = (f"r={r} exceeds in_features={in_f}" if r > in_f
               else f"'bat' needs in ({in_f}) and out ({out_f}) divisible by r={r}" if mode == "bat" and (in_f % r or out_f % r)
               else f"'mini' needs out ({out_f}) divisible by mini_r={config.mini_r}" if mode == "mini" and out_f % config.mini_r
               else "")
    if problem:
        raise ValueError(f"module '{path}': {problem}; choose another r or exclude the module")


def _block(block: torch.Tensor, config: BoneConfig, out_f: int) -> torch.Tensor:
    """The [r, out] block of MiSS ("mini" repeats its [r, mini_r] block along the outputs)."""
    return block.repeat(1, out_f // config.mini_r) if config.init_weights == "mini" else block


@METHODS.register()
class BoneLinear(Adapter):
    """Bone / MiSS on ``nn.Linear``."""

    name = "bone"
    capabilities = MERGE_ONLY
    config_class = BoneConfig
    layer_types = (nn.Linear,)
    tensor_names = ("miss_block",)
    param_formula = "r·out (init_weights='mini': r·mini_r)"

    def __init__(self, base_layer: nn.Linear, config: BoneConfig, module_path: str = ""):
        super().__init__(base_layer, config, module_path)
        out_f, in_f = base_layer.weight.shape
        _check(config, out_f, in_f, module_path)
        r = config.r
        shape = (out_f // r, r, r) if config.init_weights == "bat" else (r, config.mini_r) if config.init_weights == "mini" else (r, out_f)
        self.miss_block = nn.Parameter(torch.zeros(shape, device=base_layer.weight.device, dtype=self.adapter_dtype()))
        self.miss_dropout = nn.Dropout(config.miss_dropout) if config.miss_dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.config.init_weights is False:
            nn.init.kaiming_uniform_(self.miss_block, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.miss_block)

    @classmethod
    def delta(cls, tensors, config, base_weight):
        if base_weight is None:
            raise ValueError("Bone's update takes its shape (and, for 'bat', its values) from the base weight; pass base_weight")
        block, r = tensors["miss_block"], config.r
        out_f, in_f = base_weight.shape
        if config.init_weights == "bat":
            # [in/r, out/r, r, r] blocks W_ij; T_i broadcasts over the input blocks j
            w = base_weight.to(block.dtype).reshape(out_f // r, r, in_f // r, r).permute(2, 0, 1, 3)
            return (w @ block + block).permute(1, 2, 0, 3).reshape(out_f, in_f)
        shard = _block(block, config, out_f).T  # [out, r], repeated over the input shards
        return shard.repeat(1, -(-in_f // r))[:, :in_f]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        block = self.miss_block
        if self.config.init_weights == "bat":
            delta = type(self).delta({"miss_block": block}, self.config, self.base_layer.weight)
            return result + F.linear(x.to(block.dtype), delta).to(result.dtype)
        r = self.config.r
        x = self.miss_dropout(x.to(block.dtype))
        x = F.pad(x, (0, -x.shape[-1] % r))  # chunks of r; the last one zero-padded
        summed = x.reshape(*x.shape[:-1], x.shape[-1] // r, r).sum(-2)
        return result + (summed @ _block(block, self.config, result.shape[-1])).to(result.dtype)
