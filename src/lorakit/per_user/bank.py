"""RecLoRA's personalized LoRA: a bank of K meta-LoRAs mixed per user by the CRM's user vector.

Lifelong Personalized Low-Rank Adaptation of Large Language Models for Recommendation (RecLoRA),
arXiv:2408.03533. Each targeted layer holds K LoRA pairs (A_k, B_k) of rank r; user u's update is
ΔW_u = s · Σ_k g_k(u) · B_k A_k with g(u) = softmax(W_g p_u + c) and p_u the CRM's (frozen) user vector. So each
user has an independent LoRA while training only K pairs and a K-way gate, and users the language model never saw
in training still get their own adapter through p_u (Few2Many).

Implementation: the K pairs are one lorakit LoRA of rank K·r (A stacks the A_k by rows, B the B_k by columns,
``lora_alpha`` = K·alpha so the scale s = alpha / r is each pair's); a forward hook on each ``lora_A`` multiplies
its K·r activations by g(u) repeated r times, row by row of the batch. A user's adapter is therefore exactly a
plain LoRA of rank K·r with A's row blocks scaled by g_k(u) (``user_state``): PEFT and the server load it as is.
With K = 1 the gate is 1 and this is one shared LoRA, the baseline.

Decisions: the paper's official code was not available to check; the bank size, the softmax gate on the CRM user
vector and a gate without temperature follow the paper's description; the user vectors are standardised per
dimension before the gate (ours: with the CRM's small raw vectors the gate stayed near uniform in our runs). The CRM here is matrix factorisation
(`crm.py`), not the paper's sequential CRMs (SIM / DIN); see that module.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import torch
from torch import nn

from ..core.apply import adapters, apply
from ..core.config import LoRAConfig
from ..core.state import AdapterState


class PersonalizedLoRA(nn.Module):
    """A model with a K-pair LoRA bank per targeted layer and a gate from user vectors; call with ``users=``."""

    def __init__(self, model: nn.Module, user_vectors: torch.Tensor, experts: int = 4, r: int = 4,
                 lora_alpha: float = 8.0, target_modules=("query", "value"), modules_to_save=None, seed: int = 0):
        super().__init__()
        if experts < 1 or r < 1:
            raise ValueError(f"experts and r must be >= 1, found experts={experts}, r={r}")
        if user_vectors.dim() != 2:
            raise ValueError(f"user_vectors must be (users, dim), found shape {tuple(user_vectors.shape)}")
        self.experts, self.r = experts, r
        config = LoRAConfig(r=experts * r, lora_alpha=experts * lora_alpha, target_modules=list(target_modules),
                            modules_to_save=modules_to_save)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = apply(model, config)
            self.gate = nn.Linear(user_vectors.shape[1], experts)
        # standardised per dimension: the CRM's vectors are small (weight decay), which would leave the gate near
        # uniform at the start and its gradient, which scales with the experts' difference, near zero
        v = user_vectors.detach().float()
        self.register_buffer("user_vectors", (v - v.mean(0)) / v.std(0).clamp_min(1e-6))
        self._rows: torch.Tensor | None = None  # (batch, K·r) gate of the batch being run
        for layer in adapters(self.model).values():
            layer.lora_A.register_forward_hook(self._scale)

    def _scale(self, module, args, output):
        if self._rows is None:
            raise RuntimeError("PersonalizedLoRA: call the model with users= (or inside `with model.users(...)`)")
        shape = (output.shape[0],) + (1,) * (output.dim() - 2) + (output.shape[-1],)
        return output * self._rows.to(output.dtype).view(shape)

    def gates(self, users: torch.Tensor) -> torch.Tensor:
        """g(u) for user rows ``users``: (batch, K), rows summing to 1."""
        return torch.softmax(self.gate(self.user_vectors[users]), dim=-1)

    @contextmanager
    def users(self, users: torch.Tensor):
        """Run the wrapped model with each batch row adapted for its user."""
        self._rows = self.gates(users).repeat_interleave(self.r, dim=-1)
        try:
            yield self.model
        finally:
            self._rows = None

    def forward(self, users: torch.Tensor, **batch):
        with self.users(users) as model:
            return model(**batch)

    @torch.no_grad()
    def user_state(self, user_row: int) -> AdapterState:
        """User ``user_row``'s adapter as a plain LoRA of rank K·r (A's row blocks scaled by its gate)."""
        scale = self.gates(torch.tensor([user_row]))[0].repeat_interleave(self.r).cpu()
        state = AdapterState.from_model(self.model)
        tensors = {path: {**t, "lora_A.weight": t["lora_A.weight"] * scale[:, None]} for path, t in state.tensors.items()}
        return dataclasses.replace(state, tensors=tensors)
