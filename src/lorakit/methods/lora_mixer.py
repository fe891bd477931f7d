"""LoRA-Mixer: Coordinate Modular LoRA Experts Through Serial Attention Routing (Li et al., arXiv:2507.00029).

Update rule, per adapted projection and token: p = softmax(W_r x) over E LoRA experts; the top_k experts are kept
with weights p renormalised over them (hard selection, soft weights); h = W x + Σ_{e in top-k} ĝ_e s B_e A_e x.
Router loss (the paper's Specialization Balance / Routing Specialization Loss), per layer over real tokens:
    balance_coef · E · Σ_e f_e P_e + specialization_coef · mean_t H(p_t) − reuse_coef · H(mean_t p_t),
f_e the fraction of routing slots given to e, P_e its mean probability, H the entropy.
Two regimes: (i) experts and router trained jointly (``lorakit.apply`` with this config; target the attention
projections, e.g. q/k/v/o); (ii) frozen LoRAs loaded from adapter directories, only the router trained
(``from_adapters``, experts stored as fixed buffers; ``freeze=False`` starts trainable experts from them).

No code is public (the authors' repository holds a README only) and the method section was not readable here;
the form above is reconstructed from the abstract and reviews. Decisions, each [UNVERIFIED]:
- "Differentiable hard-soft top-k": the forward pass uses the hard top-k with renormalised weights; with
  ``straight_through`` (default) the unselected experts also get a gradient, that of their dense softmax
  probability (ĝ + (p − sg(p)) on the unselected entries), so the router can learn to pick an expert it has not
  picked yet. The selected entries keep the exact gradient of the renormalised weights.
- The loss is the Switch-style balance term plus entropy shaping with fixed coefficients (the paper's adaptive
  weighting is unknown). A reviewer notes that the published RSL sign would maximise per-token entropy; we take the
  stated intent: low per-token entropy (specialisation), high marginal entropy (reuse).
- Router W_r starts as ``nn.Linear``'s default (small, near-uniform p).
- Not mergeable: the experts change token by token; ``lorakit.merge`` refuses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
from torch import nn

from ..core.capabilities import NONE
from ..core.registry import METHODS
from .experts import from_adapters as _from_adapters
from .routing import Expert, ExpertsConfig, RoutedLoRA


@dataclass(frozen=True)
class LoRAMixerConfig(ExpertsConfig):
    """LoRA-Mixer: ``num_experts`` LoRAs of rank ``r`` per projection, hard-soft top-k routing and the SBL loss."""

    peft_type: ClassVar[str] = "LORAKIT_LORA_MIXER"
    method: ClassVar[str] = "lora_mixer"

    num_experts: int = 4
    straight_through: bool = True
    balance_coef: float = 0.01
    specialization_coef: float = 0.01
    reuse_coef: float = 0.01


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy along the last dimension (nats)."""
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


@METHODS.register()
class LoRAMixerLinear(RoutedLoRA):
    """LoRA-Mixer on ``nn.Linear`` and transformers' ``Conv1D``."""

    name = "lora_mixer"
    capabilities = NONE
    config_class = LoRAMixerConfig
    tensor_names = ("lora_A.weight", "lora_B.weight", "lora_router.weight")
    param_formula = "E·r·(in+out) + E·in (router); regime (ii) trains E·in"

    def __init__(self, base_layer: nn.Module, config: LoRAMixerConfig, module_path: str = ""):
        super().__init__(base_layer, config, module_path, experts=config.num_experts, block=config.r)
        self.lora_router = nn.Linear(self.in_features, config.num_experts, bias=False,
                                     device=self.lora_A.weight.device, dtype=self.lora_A.weight.dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.reset_experts()
        self.lora_router.reset_parameters()

    def route(self, x):
        cfg = self.config
        p = torch.softmax(self.lora_router(x).float(), dim=-1)
        top, idx = p.topk(cfg.top_k, dim=-1)
        chosen = torch.zeros_like(p).scatter(-1, idx, 1.0)
        gates = chosen * p / top.sum(-1, keepdim=True)
        if cfg.straight_through:
            gates = gates + (1 - chosen) * (p - p.detach())
        self.aux_loss = self.router_loss(p, chosen) if self.training else None
        return gates

    def router_loss(self, p: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """The weighted balance + specialisation - reuse loss over the real tokens of this pass."""
        cfg = self.config
        p, chosen = self.tokens(p), self.tokens(chosen)
        mean_p = p.mean(0)
        balance = self.num_experts * (chosen.mean(0) / cfg.top_k * mean_p).sum()
        return cfg.balance_coef * balance + cfg.specialization_coef * entropy(p).mean() - cfg.reuse_coef * entropy(mean_p)


def from_adapters(model: nn.Module, experts: Sequence[Expert], *, top_k: int = 2, freeze: bool = True, **fields) -> nn.Module:
    """Regime (ii): route over LoRA adapters (directories or AdapterStates) as frozen experts; the router trains."""
    return _from_adapters(model, LoRAMixerConfig, experts, top_k=min(top_k, len(experts)), freeze=freeze, **fields)
