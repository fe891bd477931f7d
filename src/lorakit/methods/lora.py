"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., arXiv:2106.09685).

Update rule: h = W x + s · B A x with A [r, in], B [out, r], s = lora_alpha / r (rsLoRA, arXiv:2312.03732:
s = lora_alpha / sqrt(r)). A is Kaiming-uniform and B zero at initialisation, so the adapter starts as the
identity (PEFT's default; ``init_lora_weights="gaussian"`` draws A from N(0, 1/r); ``False`` leaves B random).
Layers: ``nn.Linear``, transformers' ``Conv1D`` (weight stored [in, out], ``fan_in_fan_out``),
``nn.Embedding`` (A [r, vocab], B [dim, r], A zero and B normal, as PEFT), ``nn.Conv2d`` (A a conv with the
base kernel, B a 1x1 conv). Tensor names are PEFT's, so the state dict is the PEFT file minus its prefix.
Other ``init_lora_weights`` values ("pissa", "olora", "lora_ga", "eva") are initialisers in ``lorakit.init``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import Adapter, LowRank, embed_scale, innermost
from ..core.capabilities import LORA_PAIR, MERGE_ONLY
from ..core.config import LoRAConfig
from ..core.registry import INITIALIZERS, METHODS, initializer_for

try:  # GPT-2 style layers; transformers is optional for the core
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment,misc]


def lora_delta(tensors: dict[str, torch.Tensor], config: LoRAConfig, base_weight: Optional[torch.Tensor]) -> torch.Tensor:
    """ΔW of a LoRA-shaped adapter in the base weight's layout (Linear, Conv1D, Embedding or Conv2d)."""
    s = config.scaling
    if "lora_embedding_A" in tensors:
        a, b = tensors["lora_embedding_A"], tensors["lora_embedding_B"]
        return (b @ a).T * s  # [vocab, dim], as nn.Embedding.weight
    a, b = tensors["lora_A.weight"], tensors["lora_B.weight"]
    if a.dim() == 4:  # Conv2d: A [r, in, kh, kw], B [out, r, 1, 1]
        if a.shape[2:] == (1, 1):
            return (b.flatten(1) @ a.flatten(1))[:, :, None, None] * s
        return F.conv2d(a.transpose(0, 1), b).transpose(0, 1) * s
    delta = b @ a * s
    return delta.T if config.fan_in_fan_out else delta


def lora_low_rank(tensors: dict[str, torch.Tensor], config: LoRAConfig) -> Optional[LowRank]:
    """(A, B, scale) for Linear/Conv1D and Embedding layers; None for convolutions with a kernel."""
    if "lora_embedding_A" in tensors:
        return tensors["lora_embedding_A"], tensors["lora_embedding_B"], config.scaling
    a, b = tensors["lora_A.weight"], tensors["lora_B.weight"]
    if a.dim() == 4:
        if a.shape[2:] != (1, 1):
            return None
        a, b = a.flatten(1), b.flatten(1)
    return a, b, config.scaling


class LoRALayer(Adapter):
    """Shared pieces of the LoRA layer kinds."""

    name = "lora"
    capabilities = LORA_PAIR
    config_class = LoRAConfig
    tensor_names = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")
    param_formula = "r·(in+out)"

    @classmethod
    def capabilities_for(cls, config):
        # an update to a stack of experts is one low-rank pair per expert, not one s·B·A: merge only
        return MERGE_ONLY if getattr(config, "target_parameters", None) else cls.capabilities

    @classmethod
    def delta(cls, tensors, config, base_weight):
        return lora_delta(tensors, config, base_weight)

    @classmethod
    def low_rank(cls, tensors, config):
        return lora_low_rank(tensors, config)

    def __init__(self, base_layer: nn.Module, config: LoRAConfig, module_path: str = ""):
        super().__init__(base_layer, config, module_path)
        self.r = config.r
        self.scaling = config.scaling
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()

    def _init_pair(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """PEFT's initialisation for a (down, up) pair of weights."""
        init = self.config.init_lora_weights
        if init is False:
            return
        if isinstance(init, str) and init.lower() == "gaussian":
            nn.init.normal_(a, std=1 / self.r)
        elif init is True or initializer_for(init) is not None:
            # a registered initialiser (lorakit.init) overwrites A and B after apply; start as the identity
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        else:
            raise ValueError(
                f"module '{self.module_path}': init_lora_weights={init!r} is not an initialisation lorakit knows; "
                f"use True, False, 'gaussian' or a registered initialiser ({', '.join(INITIALIZERS.names())})"
            )
        nn.init.zeros_(b)


@METHODS.register()
class LoRALinear(LoRALayer):
    """LoRA on ``nn.Linear`` and transformers' ``Conv1D``."""

    layer_types = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())
    quantized_base = True  # the forward reads W0 only through base_layer(x)

    def __init__(self, base_layer: nn.Module, config: LoRAConfig, module_path: str = ""):
        super().__init__(base_layer, config, module_path)
        out_f, in_f = self.features()
        self.in_features, self.out_features = in_f, out_f
        kw = dict(device=base_layer.weight.device, dtype=self.adapter_dtype())
        self.lora_A = nn.Linear(in_f, config.r, bias=False, **kw)
        self.lora_B = nn.Linear(config.r, out_f, bias=False, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._init_pair(self.lora_A.weight, self.lora_B.weight)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.r == 0:
            return result
        x = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        # the scale multiplies the r-wide activations, not the out-wide update (r << out: less work both ways)
        return result + self.lora_B(self.lora_A(x) * self.scaling).to(result.dtype)


@METHODS.register()
class LoRAEmbedding(LoRALayer):
    """LoRA on ``nn.Embedding``: A is looked up like an embedding table, then projected by B."""

    layer_types = (nn.Embedding,)

    def __init__(self, base_layer: nn.Embedding, config: LoRAConfig, module_path: str = ""):
        super().__init__(base_layer, config, module_path)
        w = base_layer.weight
        kw = dict(device=w.device, dtype=self.adapter_dtype())
        self.lora_embedding_A = nn.Parameter(torch.randn(config.r, base_layer.num_embeddings, **kw))
        self.lora_embedding_B = nn.Parameter(torch.randn(base_layer.embedding_dim, config.r, **kw))
        embed_scale(base_layer)  # refuse a non-scalar scale now, not at the first forward
        self.reset_parameters()

    @property
    def embed_scale(self) -> Optional[torch.Tensor]:
        """The base layer's output scale, read at each forward (it follows the base's device and dtype)."""
        return embed_scale(innermost(self.base_layer))

    def reset_parameters(self) -> None:
        init = self.config.init_lora_weights
        if init is False:
            return
        nn.init.zeros_(self.lora_embedding_A)
        nn.init.normal_(self.lora_embedding_B)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.r == 0:
            return result
        e = innermost(self.base_layer)  # another adapter's layer when the model carries several
        # a dense lookup even over a sparse=True base: A's transpose cannot take a sparse gradient (PEFT fails there)
        after_a = F.embedding(x, self.lora_embedding_A.T, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq)
        update = after_a @ self.lora_embedding_B.T * self.scaling
        if self.embed_scale is not None:  # the base scales its lookup (Gemma 3, BART): ΔW merged into W is scaled too
            update = update * self.embed_scale.to(update.dtype)
        return result + update.to(result.dtype)


@METHODS.register()
class LoRAConv2d(LoRALayer):
    """LoRA on ``nn.Conv2d``: A has the base kernel, stride and padding; B is a 1x1 convolution."""

    layer_types = (nn.Conv2d,)

    def __init__(self, base_layer: nn.Conv2d, config: LoRAConfig, module_path: str = ""):
        super().__init__(base_layer, config, module_path)
        if base_layer.groups != 1:
            raise ValueError(f"module '{module_path}': LoRA on grouped convolutions (groups={base_layer.groups}) is not supported")
        b = base_layer
        kw = dict(device=b.weight.device, dtype=self.adapter_dtype())
        self.lora_A = nn.Conv2d(b.in_channels, config.r, b.kernel_size, b.stride, b.padding, b.dilation, bias=False, **kw)
        self.lora_B = nn.Conv2d(config.r, b.out_channels, (1, 1), (1, 1), bias=False, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._init_pair(self.lora_A.weight, self.lora_B.weight)

    forward = LoRALinear.forward
