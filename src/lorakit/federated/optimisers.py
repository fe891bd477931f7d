"""Server optimisers and client drift: FedAdam / FedYogi / FedAdagrad on the server, FedProx on the clients.

Adaptive federated optimisation (Reddi et al., arXiv:2003.00295, Algorithm 2), per tensor of the global adapter:
pseudo-gradient Δ = x_agg - x (the strategy's aggregate minus the previous global),
m = β1 m + (1 - β1) Δ;  v = v + Δ² (adagrad) | v - (1 - β2) Δ² sign(v - Δ²) (yogi) | β2 v + (1 - β2) Δ² (adam);
x' = x + η m / (sqrt(v) + τ), with m = 0 and v = τ² before the first round, and no bias correction (as the paper;
Flower's FedAdam adds one). It composes with the continuing strategies, whose global adapter keeps its shapes
from round to round: FedIT and LoRA-FAIR (A and B moved separately, i.e. on the factor averages, not on B A),
FFA-LoRA (B only: the shared frozen A is copied, never moved) and zero-padding (on the r_max-padded factors).
Restarting strategies (FLoRA, fedavg_dense) are refused: their aggregate is a fresh update of a new rank merged
into the base each round, so there is no persistent tensor for momentum to act on (it would need a dense
[out, in] state per module, which is no longer a low-rank federated adapter).
FedProx (Li et al., arXiv:1812.06127): the client minimises its loss + μ/2 ||w - w_global||² over the adapter
tensors it trains, added here as μ (w - w_global) to each gradient (the term's exact gradient).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..core.state import AdapterState

KINDS = ("adam", "yogi", "adagrad")


def check_options(kind: str, eta: float, beta1: float, beta2: float, tau: float) -> None:
    """Raise a ValueError naming the first invalid server-optimiser option."""
    if kind not in KINDS:
        raise ValueError(f"server-opt {kind!r} is not one of {', '.join(KINDS)} (or '' for none)")
    if not eta > 0:
        raise ValueError(f"server-lr must be > 0, found {eta}")
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise ValueError(f"server-beta1 and server-beta2 must be in [0, 1), found {beta1} and {beta2}")
    if not tau > 0:
        raise ValueError(f"server-tau must be > 0, found {tau}")


class ServerOptimiser:
    """Adaptive server step on the global adapter; ``state`` (m and v per tensor) is what a checkpoint keeps."""

    def __init__(self, kind: str, eta: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                 frozen: tuple[str, ...] = ()):
        check_options(kind, eta, beta1, beta2, tau)
        self.kind, self.eta, self.beta1, self.beta2, self.tau, self.frozen = kind, eta, beta1, beta2, tau, frozen
        self.state: dict[str, torch.Tensor] = {}  # "m/<group>/<path>/<key>" and "v/..." in float64

    def _move(self, name: str, x: torch.Tensor, agg: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            return agg.clone()
        if x.shape != agg.shape:
            raise ValueError(f"server-opt: '{name}' changed shape {tuple(x.shape)} -> {tuple(agg.shape)} between rounds")
        delta = agg.double() - x.double()
        m = self.beta1 * self.state.get("m/" + name, torch.zeros_like(delta)) + (1 - self.beta1) * delta
        v = self.state.get("v/" + name, torch.full_like(delta, self.tau ** 2))
        sq = delta.pow(2)
        if self.kind == "adagrad":
            v = v + sq
        elif self.kind == "yogi":
            v = v - (1 - self.beta2) * sq * torch.sign(v - sq)
        else:
            v = self.beta2 * v + (1 - self.beta2) * sq
        self.state["m/" + name], self.state["v/" + name] = m, v
        return (x.double() + self.eta * m / (v.sqrt() + self.tau)).to(agg.dtype)

    def step(self, current: AdapterState, aggregated: AdapterState) -> AdapterState:
        """The new global adapter: ``current`` moved along the pseudo-gradient ``aggregated - current``."""
        groups = []
        for tag, now, agg in (("t", current.tensors, aggregated.tensors), ("m", current.modules_to_save,
                              aggregated.modules_to_save), ("b", {"": current.base_tensors}, {"": aggregated.base_tensors})):
            out = {}
            for path, tensors in agg.items():
                out[path] = {key: t.clone() if (tag == "t" and key in self.frozen)
                             else self._move(f"{tag}/{path}/{key}", now[path][key], t) for key, t in tensors.items()}
            groups.append(out)
        return AdapterState(aggregated.config, groups[0], groups[1], groups[2].get("", {}))


@contextlib.contextmanager
def proximal(model: nn.Module, mu: float) -> Iterator[None]:
    """While active, every trainable parameter's gradient gains μ (w - w_start): FedProx's proximal term."""
    if mu < 0:
        raise ValueError(f"proximal-mu must be >= 0, found {mu}")
    handles = []
    if mu > 0:
        for p in model.parameters():
            if p.requires_grad:
                start = p.detach().clone()
                handles.append(p.register_hook(lambda g, p=p, start=start: g + mu * (p.detach() - start)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
