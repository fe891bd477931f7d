"""LISA: Layerwise Importance Sampling for Memory-Efficient LLM Fine-Tuning (Pan et al., arXiv:2403.17919).

Full-weight training in which everything outside the stack of blocks (embeddings, final norm, head) always
trains, and of the N blocks only ``gamma`` chosen uniformly without replacement train, redrawn every
``interval`` steps (at steps 0, K, 2K, ...). Defaults follow LMFlow's ``DynamicLayerActivationCallback``:
gamma = 2, K = 20.

Decisions: the blocks are the model's longest ``nn.ModuleList`` unless ``layers_attribute`` names them (LMFlow's
``lisa_layers_attribute``, e.g. ``model.layers``). At each switch the AdamW state of blocks that stop training
is dropped, so the optimiser state scales with gamma, not N (the paper's memory claim; LMFlow only toggles
``requires_grad`` and keeps the state). The draw of period p is a function of (seed, p) alone, so a resumed run
draws the same blocks without saving any state. Works on a model without adapters: ``prepare`` unfreezes it.

Memory: the always-trained part dominates on small models. On all-MiniLM-L6-v2 the word embeddings are 11.7M of
22.7M parameters; their gradient, two AdamW moments and the optimiser's temporary of the largest tensor come to
about 180 MiB, more than LoRA's whole activation memory at a batch of 32 x 32 tokens. That is the paper's rule, so
it is the default; ``embeddings=False`` (a deviation, off by default) freezes the input embeddings for the run.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import SCHEDULES, Schedule


def find_layers(model: nn.Module, attribute: str | None = None) -> tuple[str, nn.ModuleList]:
    """(path, blocks): the ModuleList at ``attribute``, else the longest ModuleList in ``model``."""
    if attribute:
        try:
            layers = model.get_submodule(attribute)
        except AttributeError:
            raise ValueError(f"lisa: the model has no module '{attribute}' (layers_attribute)") from None
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"lisa: '{attribute}' is a {type(layers).__name__}, expected the ModuleList of blocks")
        return attribute, layers
    found = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    if not found:
        raise ValueError("lisa: the model has no ModuleList of blocks; pass layers_attribute='path.to.layers'")
    return max(found, key=lambda pm: len(pm[1]))


@SCHEDULES.register()
class LISA(Schedule):
    """Train the non-block parameters always and ``gamma`` random blocks, redrawn every ``interval`` steps."""

    name = "lisa"
    summary = "LISA: full training of embeddings/head + gamma random blocks, redrawn every K steps"

    def __init__(self, gamma: int = 2, interval: int = 20, seed: int = 0, layers_attribute: str | None = None,
                 embeddings: bool = True):
        if gamma < 1 or interval < 1:
            raise ValueError(f"lisa: gamma and interval must be >= 1, got gamma={gamma}, interval={interval}")
        self.gamma, self.interval, self.seed, self.layers_attribute = gamma, interval, seed, layers_attribute
        self.embeddings = embeddings
        self.active: list[int] = []

    def prepare(self, model: nn.Module) -> None:
        """Unfreeze the whole model (full-weight training); the blocks are frozen from the first step on, after the
        optimiser has been built over every parameter."""
        path, layers = find_layers(model, self.layers_attribute)
        if self.gamma > len(layers):
            raise ValueError(f"lisa: gamma={self.gamma} sampled layers, but '{path}' has only {len(layers)} blocks")
        self.layers = layers
        for p in model.parameters():
            p.requires_grad_(True)
        if not self.embeddings:
            self._freeze_embeddings(model)
        self.active = []

    @staticmethod
    def _freeze_embeddings(model: nn.Module) -> None:
        emb, out = model.get_input_embeddings(), getattr(model, "get_output_embeddings", lambda: None)()
        if out is not None and out.weight is emb.weight:
            raise ValueError("lisa: embeddings=False would freeze the output head too (it shares the input "
                             "embedding matrix); keep embeddings=True for this model")
        for p in emb.parameters():
            p.requires_grad_(False)

    def draw(self, period: int) -> list[int]:
        """The blocks that train in sampling period ``period``."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + period)
        return sorted(torch.randperm(len(self.layers), generator=g)[: self.gamma].tolist())

    def _activate(self, chosen: list[int], optimizer: torch.optim.Optimizer | None = None) -> None:
        for i, block in enumerate(self.layers):
            on = i in chosen
            for p in block.parameters():
                p.requires_grad_(on)
                if not on and optimizer is not None:
                    optimizer.state.pop(p, None)  # the AdamW state of a block that stops training is dropped
        self.active = chosen

    def step_begin(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if step % self.interval == 0 or not self.active:
            self._activate(self.draw(step // self.interval), optimizer)

    def finish(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        for p in model.parameters():
            p.requires_grad_(True)
