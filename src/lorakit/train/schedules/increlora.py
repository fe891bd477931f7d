"""IncreLoRA: Incremental Parameter Allocation Method for PEFT (Zhang et al., arXiv:2308.12043).

Every LoRA module starts at rank r and holds ``add_r`` reserve ranks. Each step the importance of a module is
S = Σ|ΔW ⊙ ∂L/∂ΔW| / sqrt(numel), smoothed as in AdaLoRA (Ī ← β1 Ī + (1-β1) S, Ū ← β2 Ū + (1-β2)|S - Ī|,
score = Ī·Ū). After ``init_warmup`` steps, every ``interval`` steps, the ``top_h`` modules by score turn their
reserves into trained ranks and get new reserves, until the total rank reaches ``budget``; then the last
reserves are removed and the adapter is a LoRA with a per-module ``rank_pattern``, saved as PEFT.

Deviations from the official code (FeiyuZhang98/IncreLoRA ``SVDLinear``/``RankAllocator``), each to stay a plain
PEFT LoRA through training: the factors are LoRA's B·A, not triples b_i·e_i·a_i, so there is no singular-value
vector and no orthogonality regulariser; a reserve rank is a row of A (drawn from N(0, 0.02²)) and a zero column
of B behind a 0 mask on its lora_A output (forward hook), so reserves do not train before they are activated
(the official ``advance_learn=False``); the scale s stays the adapter's initial alpha/r for all ranks (the official
rescales by the current rank, which changes the function at every growth) and is saved exactly through
``alpha_pattern`` = s·r_module. ∂L/∂ΔW is the gradient of the base weight, formed from each adapted layer's input
and output gradient (hooks) while growth is still running.
"""
from __future__ import annotations

import dataclasses
import math
import zlib

import torch
from torch import nn

from ...core.apply import CONFIG_ATTR, config_of
from ...optim.base import lora_pairs
from .base import SCHEDULES, Schedule, swap_parameter


@SCHEDULES.register()
class IncreLoRA(Schedule):
    """Grow LoRA ranks where the importance score is highest, up to a total rank ``budget``."""

    name = "increlora"
    summary = "IncreLoRA: ranks grow from reserves by importance up to a total budget; saves rank_pattern"

    def __init__(self, budget: int | None = None, add_r: int = 1, top_h: int = 2, init_warmup: int = 10,
                 interval: int = 10, beta1: float = 0.85, beta2: float = 0.85, seed: int = 0):
        self.budget, self.add_r, self.top_h = budget, add_r, top_h
        self.init_warmup, self.interval, self.beta1, self.beta2, self.seed = init_warmup, interval, beta1, beta2, seed
        self.ranks: dict[str, int] = {}
        self.ipt: dict[str, float] = {}
        self.unc: dict[str, float] = {}
        self.reserves = True
        self._grads: dict[str, torch.Tensor] = {}
        self._hooks: list = []

    # ---- structure ----
    def prepare(self, model: nn.Module) -> None:
        pairs = lora_pairs(model, plain_linear=True)
        if not pairs:
            raise ValueError("increlora: the model has no trainable LoRA layer; apply LoRAConfig first")
        self.modules = {p.path: p.adapter for p in pairs}
        start = sum(a.r for a in self.modules.values())
        self.budget = self.budget if self.budget is not None else 2 * start
        if self.budget < start:
            raise ValueError(f"increlora: budget {self.budget} (total rank) is below the starting total rank {start} "
                             f"({len(self.modules)} LoRA modules, ranks {sorted({a.r for a in self.modules.values()})}); "
                             "raise the budget or lower r")
        self.ranks = {path: a.r for path, a in self.modules.items()}
        self.ipt = {path: 0.0 for path in self.modules}
        self.unc = dict(self.ipt)
        for path in self.modules:
            self._resize(path, self.ranks[path] + self.add_r, None)
        self._install_hooks()

    def _resize(self, path: str, width: int, optimizer) -> None:
        """Give module ``path`` ``width`` rank rows (active ranks first, then reserves), new rows as reserves."""
        adapter = self.modules[path]
        A, B = adapter.lora_A.weight, adapter.lora_B.weight
        old = A.shape[0]
        g = torch.Generator().manual_seed(self.seed * 7919 + zlib.crc32(path.encode()) + old)
        with torch.no_grad():
            extra = max(width - old, 0)
            new_a = torch.cat([A[:width], (0.02 * torch.randn(extra, A.shape[1], generator=g)).to(A)])
            new_b = torch.cat([B[:, :width], B.new_zeros(B.shape[0], extra)], 1)
        pa, pb = nn.Parameter(new_a), nn.Parameter(new_b)
        if optimizer is not None:
            swap_parameter(optimizer, A, pa, 0)
            swap_parameter(optimizer, B, pb, 1)
        adapter.lora_A.weight, adapter.lora_B.weight = pa, pb
        adapter.lora_A.out_features = adapter.lora_B.in_features = width
        mask = torch.zeros(width, dtype=A.dtype, device=A.device)
        mask[: self.ranks[path]] = 1
        adapter.lora_A._increlora_mask = mask

    def _install_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for path, adapter in self.modules.items():
            self._hooks.append(adapter.lora_A.register_forward_hook(_mask_output))
            if self.reserves:
                self._hooks.append(adapter.register_forward_hook(self._capture(path)))

    def _capture(self, path: str):
        def hook(module, inputs, output):
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            x = inputs[0].detach()

            def on_grad(g):
                full = g.reshape(-1, g.shape[-1]).T.float() @ x.reshape(-1, x.shape[-1]).float()  # ∂L/∂W [out, in]
                self._grads[path] = self._grads.get(path, 0) + full

            output.register_hook(on_grad)

        return hook

    # ---- training hooks ----
    def before_optimizer_step(self, step: int, model: nn.Module, optimizer) -> None:
        if not self.reserves:
            return
        for path, adapter in self.modules.items():
            grad = self._grads.pop(path, None)
            if grad is None:
                continue
            delta = adapter.scaling * adapter.lora_B.weight.detach().float() @ adapter.lora_A.weight.detach().float()
            s = ((delta * grad).abs().sum() / math.sqrt(delta.numel())).item()
            self.ipt[path] = self.beta1 * self.ipt[path] + (1 - self.beta1) * s
            self.unc[path] = self.beta2 * self.unc[path] + (1 - self.beta2) * abs(s - self.ipt[path])

    def step_end(self, step: int, model: nn.Module, optimizer) -> bool:
        done = step + 1
        if not self.reserves or done <= self.init_warmup or (done - self.init_warmup) % self.interval:
            return False
        order = sorted(self.modules, key=lambda p: -self.ipt[p] * self.unc[p])
        for path in order[: self.top_h]:
            room = self.budget - sum(self.ranks.values())
            if room <= 0:
                break
            self.ranks[path] += min(self.add_r, room)
            self._resize(path, self.ranks[path] + self.add_r, optimizer)
        if sum(self.ranks.values()) >= self.budget:
            self._end_growth(optimizer)
        return True

    def _end_growth(self, optimizer) -> None:
        self.reserves = False
        for path in self.modules:
            self._resize(path, self.ranks[path], optimizer)
        self._install_hooks()

    def finish(self, model: nn.Module, optimizer=None) -> None:
        """Drop the reserves and record each module's rank (and alpha, keeping s) in the model's config."""
        if self.reserves:
            self._end_growth(optimizer)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        config = config_of(model)
        scale = {path: a.scaling for path, a in self.modules.items()}
        config = dataclasses.replace(config, rank_pattern=dict(self.ranks),
                                     alpha_pattern={p: scale[p] * r for p, r in self.ranks.items()})
        setattr(model, CONFIG_ATTR, config)
        for path, adapter in self.modules.items():
            adapter.r, adapter.config = self.ranks[path], config.for_module(path)
            del adapter.lora_A._increlora_mask

    # ---- resume ----
    def state_dict(self) -> dict:
        return {"ranks": dict(self.ranks), "ipt": dict(self.ipt), "unc": dict(self.unc), "reserves": self.reserves}

    def load_state_dict(self, state: dict, model: nn.Module, optimizer) -> None:
        self.ranks, self.ipt, self.unc = dict(state["ranks"]), dict(state["ipt"]), dict(state["unc"])
        self.reserves = state["reserves"]
        for path in self.modules:
            self._resize(path, self.ranks[path] + (self.add_r if self.reserves else 0), optimizer)
        self._install_hooks()


def _mask_output(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    """lora_A's output times the rank mask: reserve ranks contribute nothing and get no gradient."""
    mask = getattr(module, "_increlora_mask", None)
    return output if mask is None else output * mask
