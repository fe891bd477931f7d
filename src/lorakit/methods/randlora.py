"""RandLoRA: Full-rank parameter-efficient fine-tuning of large models (Albert et al., arXiv:2502.00987).

Update rule (PEFT's shared-A form): ΔW = s · Σ_{i=1..N} B_i diag(λ_i) A diag(γ_i), s = randlora_alpha / r, with
frozen random A [r, d] and B_i [D, r] (d = min(in, out), D = max(in, out), N = ⌈d / r⌉ so N·r ≥ d and ΔW
can be full-rank); only λ [r, N] and γ [N, d] train. λ starts at 0 and γ at 1/D, so ΔW = 0 at first.

The bases are PEFT's: one A [r, 1, d*] and B [D*, N*, r] for the whole model, sized by the largest targeted
shape (``largest_shape``, found by ``apply``) and drawn from ``projection_prng_key`` with PEFT's recipe
(Kaiming-uniform in bf16 divided by the std; ``sparse`` / ``very_sparse`` ternary), bit for bit, then
sliced per layer. The flattening order of the N·r inner index follows PEFT's code exactly, so a PEFT file
gives the same outputs here and back.

Deviations: ``save_projection`` defaults to False (PEFT: True): the bases are regenerated from the seed, so
a file holds only λ and γ. PEFT draws them in fp16 on accelerators without bf16: a file written there
without its bases does not regenerate here; save with ``save_projection=True`` for such exchanges (then
every layer's entry carries the shared bases, as PEFT writes them). The backward pass is plain autograd
(PEFT's ``UniqueBaseGrad`` saves one [r, N, d] intermediate less). ``rank_pattern`` is refused: the shared
bases have one rank. The paper's general form with a distinct A_i per basis is not offered (PEFT's form).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import Adapter
from ..core.capabilities import MERGE_ONLY
from ..core.config import AdapterConfig
from ..core.registry import METHODS
from .lora import Conv1D


@dataclass(frozen=True)
class RandLoRAConfig(AdapterConfig):
    """RandLoRA (PEFT ``RandLoraConfig``): learned diagonal scalings of shared random bases of rank ``r``."""

    peft_type: ClassVar[str] = "RANDLORA"
    method: ClassVar[str] = "randlora"

    r: int = 32
    randlora_alpha: float = 640
    randlora_dropout: float = 0.0
    projection_prng_key: int = 0
    save_projection: bool = False
    sparse: bool = False
    very_sparse: bool = False
    init_weights: bool = True
    largest_shape: Optional[list] = None  # [out, in], the elementwise max over the targeted layers

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank_pattern:
            raise ValueError("RandLoRA shares one set of random bases across layers: rank_pattern is not supported")
        if self.r < 1:
            raise ValueError(f"RandLoRAConfig.r must be >= 1, found {self.r}")

    def for_targets(self, layers: dict) -> "RandLoRAConfig":
        shapes = [_out_in(m) for m in layers.values()]
        largest = [max(s[0] for s in shapes), max(s[1] for s in shapes)]
        if self.largest_shape is not None and list(self.largest_shape) != largest:
            raise ValueError(
                f"this RandLoRA adapter was made for layers up to [out, in] = {list(self.largest_shape)}, but the "
                f"targeted layers give {largest}; it belongs to another base model or other target_modules"
            )
        return replace(self, largest_shape=largest)

    @property
    def scaling(self) -> float:
        return self.randlora_alpha / self.r


def _out_in(layer: nn.Module) -> tuple[int, int]:
    w = layer.weight
    return (w.shape[1], w.shape[0]) if Conv1D is not None and isinstance(layer, Conv1D) else (w.shape[0], w.shape[1])


def shared_bases(config: RandLoRAConfig, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's bases A [r, 1, d*] and B [D*, N*, r] for ``config`` (regenerated from its seed, then cached)."""
    if config.largest_shape is None:
        raise ValueError("RandLoRA's bases are sized from the model: apply the config to a model (lorakit.apply / load_peft)")
    kind = "very_sparse" if config.very_sparse else "sparse" if config.sparse else "dense"
    big, small = max(config.largest_shape), min(config.largest_shape)
    return _bases(config.projection_prng_key, config.r, big, small, kind, torch.device(device), dtype)


@functools.lru_cache(maxsize=8)
def _bases(seed: int, r: int, big: int, small: int, kind: str, device: torch.device, dtype: torch.dtype):
    n = math.ceil(small / r)
    g = torch.Generator().manual_seed(seed)
    if kind != "dense":  # ternary values, P(±1) = 1/(2·sparsity) each
        p = 1 / (2 * (math.sqrt(small) if kind == "very_sparse" else 3))
        u_a, u_b = torch.rand((r, 1, small), generator=g), torch.rand((big, n, r), generator=g)
        a, b = ((u > 1 - p).float() - (u < p).float() for u in (u_a, u_b))
    else:
        def kaiming(shape):  # drawn in bf16, as PEFT does wherever bf16 is available
            return nn.init.kaiming_uniform_(torch.empty(shape, dtype=torch.bfloat16), a=math.sqrt(5), generator=g)

        a = kaiming((r, 1, small))
        b = torch.cat([kaiming((big, 1, r)) for _ in range(n)], dim=1)
    return (a / a.std()).to(device, dtype), (b / b.std()).to(device, dtype)


def randlora_factors(tensors: dict, config: RandLoRAConfig, out_f: int, in_f: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(down [N·r, in], up [out, N·r]) with ΔW = scaling · up @ down, in PEFT's index order."""
    lam, gam = tensors["randlora_lambda"], tensors["randlora_gamma"]
    if "randlora_A" in tensors:
        a, b = tensors["randlora_A"].to(lam.dtype), tensors["randlora_B"].to(lam.dtype)
    else:
        a, b = shared_bases(config, lam.device, lam.dtype)
    small, big, n = min(out_f, in_f), max(out_f, in_f), lam.shape[1]
    scaled = (lam[:, :, None] * a[:, :n, :small] * gam[None]).flatten(0, 1)  # [r·N, d], row (rank, basis)
    wide = b[:big, :n, :].flatten(1)  # [D, N·r], column (basis, rank)
    return (scaled, wide) if small == in_f else (wide.T, scaled.T)


@METHODS.register()
class RandLoRALinear(Adapter):
    """RandLoRA on ``nn.Linear`` and transformers' ``Conv1D``."""

    name = "randlora"
    capabilities = MERGE_ONLY
    config_class = RandLoRAConfig
    layer_types = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())
    tensor_names = ("randlora_lambda", "randlora_gamma", "randlora_A", "randlora_B")
    shared_tensor_names = ("randlora_A", "randlora_B")  # the same bases in every layer (save_projection=True)
    param_formula = "N·(r + min(in,out)), N = ⌈min(in,out)/r⌉"

    def __init__(self, base_layer: nn.Module, config: RandLoRAConfig, module_path: str = ""):
        super().__init__(base_layer, config, module_path)
        if config.largest_shape is None:
            config = config.for_targets({module_path: base_layer})
            self.config = config
        self.out_features, self.in_features = self.features()
        small = min(self.out_features, self.in_features)
        kw = dict(device=base_layer.weight.device, dtype=self.adapter_dtype())
        self.randlora_lambda = nn.Parameter(torch.zeros(config.r, math.ceil(small / config.r), **kw))
        self.randlora_gamma = nn.Parameter(torch.zeros(math.ceil(small / config.r), small, **kw))
        if config.save_projection:  # the bases travel with the adapter (PEFT's default)
            a, b = shared_bases(config, kw["device"], kw["dtype"])
            self.register_buffer("randlora_A", a.clone())
            self.register_buffer("randlora_B", b.clone())
        self.randlora_dropout = nn.Dropout(config.randlora_dropout) if config.randlora_dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.config.init_weights:
                self.randlora_lambda.zero_()
            else:  # PEFT's testing option
                self.randlora_lambda.normal_()
            self.randlora_gamma.fill_(1 / max(self.out_features, self.in_features))

    @classmethod
    def delta(cls, tensors, config, base_weight):
        if base_weight is None:
            raise ValueError("RandLoRA slices its shared bases by the layer's shape: pass base_weight")
        out_f, in_f = base_weight.T.shape if config.fan_in_fan_out else base_weight.shape
        down, up = randlora_factors(tensors, config, out_f, in_f)
        delta = up @ down * config.scaling
        return delta.T if config.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        down, up = randlora_factors(self.adapter_tensors(), self.config, self.out_features, self.in_features)
        h = self.randlora_dropout(x.to(down.dtype))
        return result + (F.linear(F.linear(h, down), up) * self.config.scaling).to(result.dtype)
