"""LoRA-FAIR: federated LoRA fine-tuning with aggregation and initialisation refinement (Bian et al.,
arXiv:2411.14961, ICCV 2025).

Rule: the server forms A_bar = sum_k p_k A_k, B_bar = sum_k p_k B_k and the ideal ΔW = sum_k p_k s B_k A_k, then
finds a residual ΔB = argmin S(ΔW, s (B_bar + ΔB) A_bar) + λ ||ΔB||_F with S the cosine distance; clients
continue from (A_bar, B_bar + ΔB), so communication equals FedIT's and no client restarts from zero.
Decisions (the official code is not available to us): S = 1 - cos over the flattened matrices and λ = 0.01, as
the paper describes; the server solves it with ``steps`` Adam steps from ΔB = 0, with a step size relative to
the RMS of B_bar, and keeps the best iterate, so the objective never ends above FedIT's (ΔB = 0).
The correction only reaches the row space of A_bar: ||ΔW - (B_bar + ΔB) A_bar|| >= ||ΔW (I - A_bar^+ A_bar)||.
Secure form: the correction is a function of three weighted sums, A_bar, B_bar and ΔW, so it needs no individual
update: each client contributes A_k, B_k and its dense s B_k A_k (out * in more numbers per module).
"""
from __future__ import annotations

import torch

from ...core.state import AdapterState
from ..aggregation import exact_update, factors, secure_form, strategy, update_of, weighted_sum, with_factors
from .fedit import same_config


def fair_objective(target: torch.Tensor, b: torch.Tensor, a: torch.Tensor, s: float, lam: float, db: torch.Tensor):
    """S(ΔW, s (B + ΔB) A) + λ ||ΔB||_F with S the cosine distance."""
    approx = s * (b + db) @ a
    cos = torch.nn.functional.cosine_similarity(approx.flatten(), target.flatten(), dim=0, eps=1e-30)
    # sqrt(x + tiny) keeps the norm's gradient finite at ΔB = 0, where the search starts
    return 1 - cos + lam * torch.sqrt(db.pow(2).sum() + 1e-30)


def residual(target, b, a, s: float, lam: float = 0.01, steps: int = 200, lr: float = 0.05) -> torch.Tensor:
    """ΔB minimising ``fair_objective`` (the best Adam iterate, starting from zero)."""
    step = lr * float(b.pow(2).mean().sqrt()) or lr * float(target.abs().max()) or lr
    db = torch.zeros_like(b, requires_grad=True)
    opt = torch.optim.Adam([db], lr=step)
    best, best_loss = torch.zeros_like(b), float("inf")
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = fair_objective(target, b, a, s, lam, db)
            if loss.item() < best_loss:  # the objective at the current iterate, before it moves
                best, best_loss = db.detach().clone(), loss.item()
            if best_loss < 1e-12:  # B_bar A_bar already points along ΔW
                break
            loss.backward()
            opt.step()
    return best


def corrected(averaged: AdapterState, targets: dict, lam: float, steps: int, lr: float) -> AdapterState:
    """The averaged adapter with each module's B corrected towards ``targets[path]`` (the ideal ΔW)."""
    tensors = {}
    for path in averaged.tensors:
        a, b, s = factors(averaged, path)
        db = residual(targets[path], b, a, s, lam, steps, lr)
        tensors[path] = with_factors(averaged.tensors[path], a, b + db)
    return AdapterState(averaged.config, tensors)


@strategy("lora_fair")
def lora_fair(states: list[AdapterState], weights: list[float], lam: float = 0.01, steps: int = 200,
              lr: float = 0.05) -> AdapterState:
    """FedIT's averages, with B corrected on the server towards the ideal update (cosine objective)."""
    same_config(states, "lora_fair")
    averaged = AdapterState(states[0].config, weighted_sum([s.tensors for s in states], weights))
    return corrected(averaged, {p: exact_update(states, weights, p) for p in averaged.tensors}, lam, steps, lr)


def encode(state: AdapterState, config) -> AdapterState:
    """The client's adapter tensors plus its dense update s B_k A_k per module (``delta``, float64)."""
    tensors = {path: {**t, "delta": update_of(state, path)} for path, t in state.tensors.items()}
    return AdapterState(state.config, tensors, state.modules_to_save, state.base_tensors)


def decode(mean: AdapterState, reference: AdapterState, ranks=()) -> AdapterState:
    """A_bar, B_bar and ΔW from the weighted mean, then the server's correction."""
    tensors = {p: {k: v for k, v in t.items() if k != "delta"} for p, t in mean.tensors.items()}
    out = corrected(AdapterState(reference.config, tensors), {p: t["delta"].double() for p, t in mean.tensors.items()},
                    0.01, 200, 0.05)
    return AdapterState(out.config, out.tensors, mean.modules_to_save, mean.base_tensors)


secure_form("lora_fair", encode, decode)
