"""SMoRA: Each Rank Could be an Expert: Single-Ranked Mixture of Experts LoRA for Multi-task Learning
(Zhao et al., arXiv:2501.15103).

Update rule: z = W_g x (one score per rank); the k ranks with the largest z + b are active, with gates
g = k · softmax(z over the active ranks) (zero elsewhere); h = W x + (lora_alpha / r) · B diag(g) A x. The bias b
is not trained: after each training forward pass, b_i += bias_u · sign(mean load − load_i), load_i = tokens that
chose rank i (auxiliary-loss-free load balancing).

No official code was found; the paper's abstract fixes the rank-as-expert idea and dynamic top-k rank activation,
secondary summaries the learnable projection and the bias used only for selection. Decisions, each [UNVERIFIED]:
- The bias is added to the logits z, not to softmax probabilities: probabilities of the ranks a skewed router
  neglects are all near 0, so a bias on them decides the choice alone, the same rank for every token, and the load
  swings from rank to rank instead of balancing. Gate values never include b.
- The kept scores are renormalised to mean 1 over the k active ranks (not to sum 1), so that uniform routing equals
  a rank-k LoRA with the usual scaling; the gradient reaches W_g through them.
- Default k = r / 8 (the card's r = 64, k = 8). The load counts real tokens when ``routing.route_context`` has the
  attention mask, else every position. The bias moves in training mode only; under data parallelism each process
  moves its own copy from its own tokens (not synchronised).
- Not mergeable: with k < r the active ranks change per token; ``lorakit.merge`` refuses rather than fold an
  all-ranks approximation that the forward pass never computes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from ..core.capabilities import NONE
from ..core.registry import METHODS
from .routing import RoutedLoRA, RoutedLoRAConfig


@dataclass(frozen=True)
class SMoRAConfig(RoutedLoRAConfig):
    """SMoRA: one LoRA of rank ``r`` whose ranks are experts; ``top_k`` of them are active per token."""

    peft_type: ClassVar[str] = "LORAKIT_SMORA"
    method: ClassVar[str] = "smora"

    r: int = 64
    lora_alpha: float = 128
    top_k: Optional[int] = None  # None: max(1, r // 8)
    bias_u: float = 1e-3

    @property
    def k(self) -> int:
        """Active ranks per token for this (per-module) rank."""
        k = self.top_k if self.top_k is not None else max(1, self.r // 8)
        if not 1 <= k <= self.r:
            raise ValueError(f"SMoRAConfig.top_k must be between 1 and r={self.r}, found {k}")
        return k


@METHODS.register()
class SMoRALinear(RoutedLoRA):
    """SMoRA on ``nn.Linear`` and transformers' ``Conv1D``."""

    name = "smora"
    capabilities = NONE
    config_class = SMoRAConfig
    tensor_names = ("lora_A.weight", "lora_B.weight", "lora_router.weight", "lora_router_bias")
    param_formula = "r·(in+out) + r·in (router)"

    def __init__(self, base_layer: nn.Module, config: SMoRAConfig, module_path: str = ""):
        super().__init__(base_layer, config, module_path, experts=config.r, block=1)
        self.k = config.k
        kw = dict(device=self.lora_A.weight.device, dtype=self.lora_A.weight.dtype)
        self.lora_router = nn.Linear(self.in_features, config.r, bias=False, **kw)
        self.register_buffer("lora_router_bias", torch.zeros(config.r, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.reset_experts()
        self.lora_router.reset_parameters()
        self.lora_router_bias.zero_()

    def route(self, x):
        z = self.lora_router(x).float()
        idx = (z + self.lora_router_bias.float()).topk(self.k, dim=-1).indices
        kept = torch.softmax(z.gather(-1, idx), dim=-1)
        gates = torch.zeros_like(z).scatter(-1, idx, self.k * kept)
        if self.training and self.config.bias_u:
            self._balance(idx)
        self.aux_loss = None
        return gates

    @torch.no_grad()
    def _balance(self, idx: torch.Tensor) -> None:
        chosen = self.tokens(idx).reshape(-1)
        load = torch.bincount(chosen, minlength=self.num_experts).float()
        step = self.config.bias_u * torch.sign(load.mean() - load)
        self.lora_router_bias.add_(step.to(self.lora_router_bias.dtype))

    def rank_load(self) -> torch.Tensor:
        """Fraction of the last forward pass's tokens that activated each rank (sums to k)."""
        if self.last_gates is None:
            raise ValueError(f"module '{self.module_path}': no forward pass yet")
        return (self.tokens(self.last_gates) > 0).float().mean(0)
