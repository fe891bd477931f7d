"""DiffoRA: Enabling PEFT via Differential Low-Rank Matrix Adaptation (arXiv:2502.08905).

A Differential Adaptation Matrix (DAM) decides which candidate modules keep LoRA: during a search phase every
candidate's LoRA output is multiplied by σ(a_m) for a gate logit a_m, the LoRA weights train on the training
batches and the gates on held-out batches (first-order bilevel: one Adam step on the gates per training step);
then the DAM is discretised to the ``keep`` modules with the largest gates, the others lose their adapter, and
training continues on the chosen ones from the weights learned during the search (weight sharing).

No official code is public; the recipe above is the paper's abstract (continuous relaxation, discretisation,
weight sharing) in its DARTS form. Decisions: one gate per module (global top-``keep``, not per layer); gates
start at 0 (σ = 1/2) and are folded into B at discretisation (B ← σ(a)·B), so the kept modules compute what they
computed during the search; the gates' Adam uses ``gate_lr`` and held-out batches drawn by (seed, step).
The result is a PEFT LoRA whose ``target_modules`` lists the chosen module paths.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ...core.apply import CONFIG_ATTR, _set_module, config_of
from ...optim.base import lora_pairs
from .base import SCHEDULES, Schedule, drop_parameters


@SCHEDULES.register()
class DiffoRA(Schedule):
    """Search gates over the LoRA modules on held-out data, then keep the ``keep`` best modules."""

    name = "diffora"
    summary = "DiffoRA: gates over candidate modules trained on held-out data, then top-k modules keep LoRA"

    def __init__(self, keep: int | None = None, search_steps: int = 20, search_data=None, collate=None,
                 gate_lr: float = 5e-2, batch_size: int = 8, seed: int = 0):
        self.keep, self.search_steps, self.search_data, self.collate = keep, search_steps, search_data, collate
        self.gate_lr, self.batch_size, self.seed = gate_lr, batch_size, seed
        self.chosen: list[str] | None = None
        self._hooks: list = []

    def prepare(self, model: nn.Module) -> None:
        pairs = lora_pairs(model, plain_linear=True)
        if not pairs:
            raise ValueError("diffora: the model has no trainable LoRA layer; apply LoRAConfig to the candidates first")
        self.modules = {p.path: p.adapter for p in pairs}
        self.keep = self.keep if self.keep is not None else max(1, len(self.modules) // 2)
        if not 1 <= self.keep <= len(self.modules):
            raise ValueError(f"diffora: keep={self.keep} modules, but there are {len(self.modules)} candidates")
        if self.search_data is None or len(self.search_data) == 0:
            raise ValueError("diffora: search_data (held-out examples for the gates) is required")
        device = next(iter(self.modules.values())).lora_A.weight.device
        self.gates = nn.Parameter(torch.zeros(len(self.modules), device=device))
        self.gate_opt = torch.optim.Adam([self.gates], lr=self.gate_lr)
        for i, adapter in enumerate(self.modules.values()):
            self._hooks.append(adapter.lora_B.register_forward_hook(self._gate(i)))

    def _gate(self, i: int):
        def hook(module, inputs, output):
            return output * torch.sigmoid(self.gates[i]).to(output.dtype)

        return hook

    def _held_out_batch(self, step: int, device) -> dict:
        from ..evaluate import collate_for, to_device

        g = torch.Generator().manual_seed(self.seed * 65_537 + step)
        idx = torch.randperm(len(self.search_data), generator=g)[: self.batch_size].tolist()
        collate = collate_for(self.search_data, self.collate)
        return to_device(collate([self.search_data[j] for j in idx]), device)

    def step_end(self, step: int, model: nn.Module, optimizer) -> bool:
        if self.chosen is not None:
            return False
        if step + 1 >= self.search_steps:
            self._discretise(model, optimizer)
            return True
        # first-order bilevel step: the gates' gradient on a held-out batch, the LoRA weights untouched
        self.gate_opt.zero_grad(set_to_none=True)
        loss = model(**self._held_out_batch(step, self.gates.device)).loss
        (gate_grad,) = torch.autograd.grad(loss, [self.gates])
        self.gates.grad = gate_grad
        self.gate_opt.step()
        return False

    def scores(self) -> dict[str, float]:
        """σ(a) per candidate module (the relaxed DAM)."""
        return dict(zip(self.modules, torch.sigmoid(self.gates.detach()).tolist()))

    def _discretise(self, model: nn.Module, optimizer) -> None:
        scores = self.scores()
        self.chosen = sorted(sorted(scores, key=lambda p: -scores[p])[: self.keep])
        self._apply_choice(model, optimizer, fold=True)

    def _apply_choice(self, model: nn.Module, optimizer, fold: bool) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for i, (path, adapter) in enumerate(self.modules.items()):
            if path in self.chosen:
                if fold:
                    with torch.no_grad():
                        adapter.lora_B.weight.mul_(torch.sigmoid(self.gates[i]).to(adapter.lora_B.weight.dtype))
                continue
            if optimizer is not None:
                drop_parameters(optimizer, list(adapter.parameters()))
            _set_module(model, path, adapter.base_layer)
        config = config_of(model)
        setattr(model, CONFIG_ATTR, dataclasses.replace(config, target_modules=list(self.chosen)))
        self.modules = {p: a for p, a in self.modules.items() if p in self.chosen}

    def finish(self, model: nn.Module, optimizer=None) -> None:
        if self.chosen is None:
            self._discretise(model, optimizer)

    def state_dict(self) -> dict:
        return {"gates": self.gates.detach().cpu().clone(), "gate_opt": self.gate_opt.state_dict(), "chosen": self.chosen}

    def load_state_dict(self, state: dict, model: nn.Module, optimizer) -> None:
        with torch.no_grad():
            self.gates.copy_(state["gates"])
        self.gate_opt.load_state_dict(state["gate_opt"])
        if state["chosen"] is not None:
            self.chosen = list(state["chosen"])
            self._apply_choice(model, optimizer, fold=False)  # B was saved after folding
