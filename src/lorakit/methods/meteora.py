"""MeteoRA: Multiple-tasks Embedded LoRA for Large Language Models (Xu et al., arXiv:2405.13053).

Update rule, per adapted layer and token: logits = G x (G [E, in], no bias); keep the top_k logits, weights
w = softmax(top-k logits / T); h = W x + Σ_{i in top-k} w_i s_i B_i A_i x, over E frozen task LoRAs. The gate is
supervised: loss = task loss + gate_loss_coef · CE(gate logits of every layer, the task id of every token).

Read against the official code (NJUDeepEngine/meteora, ``MoELoRA/layer.py::MoELinear``,
``modeling_llama_meteor.py::lora_gate_loss_func``, ``meteora_train.py``); decisions:
- Gate: the accelerated path (top-k of the logits, softmax over those k with temperature T = 1); the original path
  (softmax over all, top-k, renormalise) gives the same weights. G starts N(0, 1), as ``reset_lora_parameters``.
- Gate loss: the official one concatenates all layers' logits into one cross-entropy against the per-token task
  label, with coefficient ``moe_aux_loss_coef = 50``; ``routing.aux_loss`` averages the per-layer cross-entropies,
  which is the same number when every layer sees the same tokens. Padding tokens are left out (the official code
  counts them) when ``routing.route_context`` is given the attention mask; labels come through it too, per example
  (every token of an example gets its task) or per token.
- Trainable set: the official ``meteora_train.py`` unfreezes the LoRAs as well as the gates, with a gate-only line
  commented out; the paper embeds off-the-shelf LoRAs. ``from_adapters`` (the paper's use: experts loaded from PEFT
  adapter directories) stores the experts as fixed buffers (``train_experts=False``) and trains the gate alone; a
  MeteoRA applied from scratch with ``lorakit.apply`` trains both (experts start as PEFT LoRAs, B = 0), as the
  released script does.
- Experts with different ranks or scalings share one block size (the largest rank); each expert's scaling is
  folded into its B (``experts.py``), which is exact. The official code stacks 28 adapters of rank 8 and keeps a
  per-adapter scaling.
- No Triton/bmm kernels: all blocks are computed and the unselected ones zeroed (``routing.py``).
- Not mergeable: the update changes token by token; ``lorakit.merge`` refuses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

from torch import nn

from ..core.capabilities import NONE
from ..core.registry import METHODS
from .experts import from_adapters as _from_adapters
from .routing import Expert, ExpertsConfig, RoutedLoRA, supervised_loss, top_k_gates


@dataclass(frozen=True)
class MeteoRAConfig(ExpertsConfig):
    """MeteoRA: ``num_experts`` task LoRAs of rank ``r`` per layer behind a supervised token-level top-k gate."""

    peft_type: ClassVar[str] = "LORAKIT_METEORA"
    method: ClassVar[str] = "meteora"

    temperature: float = 1.0
    gate_loss_coef: float = 50.0
    expert_names: Optional[list] = None  # the task of each expert, in order (informational)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.expert_names is not None and len(self.expert_names) != self.num_experts:
            raise ValueError(f"MeteoRAConfig: {len(self.expert_names)} expert_names for {self.num_experts} experts")
        if self.temperature <= 0:
            raise ValueError(f"MeteoRAConfig.temperature must be > 0, found {self.temperature}")


@METHODS.register()
class MeteoRALinear(RoutedLoRA):
    """MeteoRA on ``nn.Linear`` and transformers' ``Conv1D``."""

    name = "meteora"
    capabilities = NONE
    config_class = MeteoRAConfig
    tensor_names = ("lora_A.weight", "lora_B.weight", "moe_gate.weight")
    param_formula = "E·in (gate) + E·r·(in+out) (experts; frozen when loaded from adapters)"

    def __init__(self, base_layer: nn.Module, config: MeteoRAConfig, module_path: str = ""):
        super().__init__(base_layer, config, module_path, experts=config.num_experts, block=config.r)
        self.moe_gate = nn.Linear(self.in_features, config.num_experts, bias=False,
                                  device=self.lora_A.weight.device, dtype=self.lora_A.weight.dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.reset_experts()
        nn.init.normal_(self.moe_gate.weight)

    def route(self, x):
        logits = self.moe_gate(x)
        gates, _ = top_k_gates(logits.float(), self.config.top_k, self.config.temperature)
        loss = supervised_loss(self, logits) if self.training else None
        self.aux_loss = None if loss is None else self.config.gate_loss_coef * loss
        return gates


def from_adapters(model: nn.Module, experts: Sequence[Expert], *, top_k: int = 2, freeze: bool = True, **fields) -> nn.Module:
    """Embed LoRA adapters (directories or AdapterStates) in ``model`` as MeteoRA experts; only the gate trains."""
    return _from_adapters(model, MeteoRAConfig, experts, top_k=min(top_k, len(experts)), freeze=freeze, **fields)
