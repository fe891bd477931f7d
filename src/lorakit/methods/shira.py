"""SHiRA: Sparse High Rank Adapters (Bhardwaj et al., arXiv:2406.13175; PEFT integration arXiv:2407.16712).

Update rule: W' = W + S, where S is zero outside a fixed support of nnz = r·(in+out) entries (LoRA's
parameter count at rank r) and only the nnz values train. Stored as PEFT does: ``shira_weight`` [nnz] and
``shira_indices`` [2, nnz] int32 (row = output unit, column = input unit, row-major order). Because only
nnz entries change, ``switch_in`` / ``switch_out`` fuse an adapter into plain weights in place by touching
those entries alone (``index_add_``, then ``index_copy_`` of the saved originals: bit-exact restore).

Support (``mask_type``): ``random`` is PEFT's ``random_mask`` exactly (randperm from ``random_seed``);
``weight_magnitude`` is the paper's SHiRA-WM (top-nnz |W|); ``gradient`` (SHiRA-Grad, top-nnz |Σ dL/dW|) and
``snip`` (top-nnz |W ⊙ Σ dL/dW|) need calibration batches: ``lorakit.init.shira_masks.calibrate``.

Deviations: the forward pass adds ``sparse(S) @ x`` in activation space, where PEFT and the paper build the
dense W + S on every forward (project rule: no dense ΔW while training); the outputs agree to rounding.
PEFT's inference-time ``scaling`` is not a config field: ``switch_in`` takes a ``scale``. SHiRA-Struct is not
implemented (its exact recipe is not given in the paper's text we could check). A data-driven support built
by ``apply`` alone is a random placeholder; training with it raises an error that names ``calibrate``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch
from torch import nn

from ..core.adapter import Adapter
from ..core.capabilities import MERGE_ONLY
from ..core.config import AdapterConfig
from ..core.registry import METHODS
from ..core.state import AdapterState
from .lora import Conv1D

MASK_TYPES = ("random", "weight_magnitude", "gradient", "snip")


@dataclass(frozen=True)
class SHiRAConfig(AdapterConfig):
    """SHiRA (PEFT ``ShiraConfig``): r·(in+out) trainable weight entries on a support chosen by ``mask_type``."""

    peft_type: ClassVar[str] = "SHIRA"
    method: ClassVar[str] = "shira"

    r: int = 32
    mask_type: str = "random"
    random_seed: Optional[int] = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mask_type not in MASK_TYPES:
            raise ValueError(f"SHiRAConfig.mask_type must be one of {', '.join(MASK_TYPES)}; found {self.mask_type!r}")


def random_support(out_f: int, in_f: int, nnz: int, seed: Optional[int]) -> torch.Tensor:
    """PEFT's ``random_mask`` as sorted flat indices into an [out, in] weight."""
    g = torch.Generator()
    if seed is not None:
        g.manual_seed(seed)
    return torch.randperm(out_f * in_f, generator=g)[:nnz].sort().values


def top_support(scores: torch.Tensor, nnz: int) -> torch.Tensor:
    """Sorted flat indices of the ``nnz`` largest entries of ``scores`` [out, in]."""
    return scores.float().flatten().topk(nnz).indices.sort().values


def _as_pairs(flat: torch.Tensor, in_f: int) -> torch.Tensor:
    return torch.stack([flat // in_f, flat % in_f]).to(torch.int32)


@METHODS.register()
class SHiRALinear(Adapter):
    """SHiRA on ``nn.Linear`` and transformers' ``Conv1D``."""

    name = "shira"
    capabilities = MERGE_ONLY
    config_class = SHiRAConfig
    layer_types = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())
    tensor_names = ("shira_weight", "shira_indices")
    param_formula = "r·(in+out) (+ their int32 indices)"

    def __init__(self, base_layer: nn.Module, config: SHiRAConfig, module_path: str = ""):
        super().__init__(base_layer, config, module_path)
        w = base_layer.weight
        self.out_features, self.in_features = self.features()
        self.nnz = config.r * (self.in_features + self.out_features)
        if not 0 < self.nnz <= w.numel():
            raise ValueError(
                f"module '{module_path}': SHiRA r={config.r} asks for {self.nnz} trainable entries, but the weight "
                f"{tuple(w.shape)} has {w.numel()}; use r <= {w.numel() // (self.in_features + self.out_features)}"
            )
        self.shira_weight = nn.Parameter(torch.zeros(self.nnz, device=w.device, dtype=self.adapter_dtype()))
        self.register_buffer("shira_indices", torch.zeros(2, self.nnz, dtype=torch.int32, device=w.device))
        self.reset_parameters()

    def oriented_weight(self) -> torch.Tensor:
        """The base weight as [out, in]."""
        w = self.base_layer.weight
        return w.T if self.config.fan_in_fan_out else w

    def reset_parameters(self) -> None:
        cfg = self.config
        if cfg.mask_type == "weight_magnitude":
            flat = top_support(self.oriented_weight().detach().abs(), self.nnz)
        else:
            flat = random_support(self.out_features, self.in_features, self.nnz, cfg.random_seed)
        self.placeholder = cfg.mask_type in ("gradient", "snip")
        self.set_support(flat)
        if not cfg.init_weights:  # PEFT's testing option: random values
            with torch.no_grad():
                self.shira_weight.normal_()

    @torch.no_grad()
    def set_support(self, flat: torch.Tensor) -> None:
        """Use the sorted flat [out, in] indices ``flat`` as the support; the values restart at zero."""
        self.shira_indices.copy_(_as_pairs(flat.to(self.shira_indices.device), self.in_features))
        self.shira_weight.zero_()

    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_adapter_tensors(tensors)
        self.placeholder = False

    @classmethod
    def delta(cls, tensors, config, base_weight):
        if base_weight is None:
            raise ValueError("SHiRA's ΔW takes its shape from the base weight: pass base_weight")
        shape = base_weight.T.shape if config.fan_in_fan_out else base_weight.shape
        rows, cols = tensors["shira_indices"].long()
        values = tensors["shira_weight"]
        dense = torch.zeros(shape, dtype=values.dtype, device=values.device).index_put_((rows, cols), values)
        return dense.T if config.fan_in_fan_out else dense

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        if self.training and self.placeholder:
            raise RuntimeError(
                f"module '{self.module_path}': mask_type={self.config.mask_type!r} needs calibration data before "
                "training; build the model with lorakit.init.shira_masks.calibrate(model, config, batches, loss_fn)"
            )
        v = self.shira_weight
        s = torch.sparse_coo_tensor(self.shira_indices.long(), v, (self.out_features, self.in_features), check_invariants=False)
        h = x.to(v.dtype).reshape(-1, self.in_features)
        update = torch.sparse.mm(s, h.T).T.reshape(*x.shape[:-1], self.out_features)
        return result + update.to(result.dtype)


# -- fused switching ------------------------------------------------------------------------------
Switched = dict[str, tuple[torch.Tensor, torch.Tensor]]  # path -> (flat indices, original values)


def _layers(target: nn.Module, state: Union[AdapterState, dict]) -> list[tuple[str, nn.Module, dict]]:
    if isinstance(state, AdapterState):
        return [(p, target.get_submodule(p), t) for p, t in state.tensors.items()]
    return [("", target, state)]  # one layer and its two tensors


def _flat_index(layer: nn.Module, indices: torch.Tensor) -> torch.Tensor:
    rows, cols = indices.long().to(layer.weight.device)
    if Conv1D is not None and isinstance(layer, Conv1D):  # weight stored [in, out]
        return cols * layer.weight.shape[1] + rows
    return rows * layer.weight.shape[1] + cols


@torch.no_grad()
def switch_in(target: nn.Module, state: Union[AdapterState, dict], scale: float = 1.0) -> Switched:
    """Add a SHiRA adapter into the plain weights of ``target`` in place; returns what ``switch_out`` needs.

    ``state`` is an AdapterState whose paths are relative to ``target``, or one layer's tensors
    (``{"shira_weight", "shira_indices"}``) when ``target`` is that layer. Switch out in reverse order.
    """
    saved: Switched = {}
    for path, layer, tensors in _layers(target, state):
        if isinstance(layer, Adapter):
            raise TypeError(f"module '{path}' carries a lorakit adapter; switch into plain layers (lorakit.unwrap first)")
        flat_w = layer.weight.view(-1)
        flat = _flat_index(layer, tensors["shira_indices"])
        saved[path] = (flat, flat_w[flat].clone())
        flat_w.index_add_(0, flat, (tensors["shira_weight"] * scale).to(flat_w))
    return saved


@torch.no_grad()
def switch_out(target: nn.Module, switched: Switched) -> None:
    """Undo ``switch_in``: write the saved original entries back (the base weights return bit for bit)."""
    for path, (flat, original) in switched.items():
        layer = target.get_submodule(path) if path else target
        layer.weight.view(-1).index_copy_(0, flat, original)
