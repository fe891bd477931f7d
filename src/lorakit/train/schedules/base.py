"""Schedules that change what trains: the protocol `fit` calls, their registry, and the Trainer binding.

A schedule is prepared on the model before the optimiser is built (`prepare`), then called at the start of each
optimiser step, after the backward pass, after the step, and once at the end (`finish`). Its `state_dict` goes
into fit's checkpoints; `load_state_dict` restores it, including any change of shapes, before the trainable
parameters and optimiser state are loaded, so a resumed run continues exactly.
"""
from __future__ import annotations

import torch
from torch import nn

from ...core.registry import Registry

SCHEDULES = Registry("schedule")


class Schedule:
    """Base class: every hook does nothing; subclasses override what they need."""

    name = ""
    summary = ""

    def prepare(self, model: nn.Module) -> None:
        """Check the settings against ``model`` (one clear error before training) and set up what trains."""

    def step_begin(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Before optimiser step ``step`` (0-based) computes its gradients."""

    def before_optimizer_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """After the backward passes of step ``step``, before the optimiser steps."""

    def step_end(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
        """After step ``step``; True when the set of trainable parameters changed."""
        return False

    def finish(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """At the end of training: leave the model in its final, saveable form."""

    def state_dict(self) -> dict:
        """What a checkpoint must hold to resume the schedule."""
        return {}

    def load_state_dict(self, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Restore ``state_dict()``, reshaping the model and re-registering parameters as needed."""


def create(name: str, **options) -> Schedule:
    """The registered schedule ``name`` with ``options`` (its constructor's keywords)."""
    cls = SCHEDULES.get(name)
    try:
        return cls(**options)
    except TypeError as e:
        raise ValueError(f"schedule '{name}': {e}") from None


def held_parameters(optimizer: torch.optim.Optimizer) -> set[int]:
    """ids of the parameters an optimiser holds."""
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def swap_parameter(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, dim: int) -> None:
    """Put ``new`` where ``old`` is in the optimiser; its state tensors of ``old``'s shape are cut or zero-padded
    along ``dim`` to ``new``'s shape (the moments of added rank components start at zero)."""
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state is None:
        return
    grown = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == old.shape:
            fresh, n = value.new_zeros(new.shape), min(old.shape[dim], new.shape[dim])
            fresh.narrow(dim, 0, n).copy_(value.narrow(dim, 0, n))
            value = fresh
        grown[key] = value
    optimizer.state[new] = grown


def drop_parameters(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Remove ``params`` and their state from the optimiser (empty groups stay, so schedulers keep their lrs)."""
    ids = {id(p) for p in params}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    for p in params:
        optimizer.state.pop(p, None)


def trainer_callback(schedule: Schedule):
    """A ``transformers.TrainerCallback`` running ``schedule`` (call ``schedule.prepare(model)`` before building
    the Trainer, so that its optimiser sees what the schedule trains)."""
    from transformers import TrainerCallback

    def _opt(kwargs):
        opt = kwargs["optimizer"]
        return getattr(opt, "optimizer", opt)  # accelerate wraps the optimiser

    class ScheduleCallback(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            schedule.step_begin(state.global_step, kwargs["model"], _opt(kwargs))

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            schedule.before_optimizer_step(state.global_step, kwargs["model"], _opt(kwargs))

        def on_step_end(self, args, state, control, **kwargs):
            schedule.step_end(state.global_step - 1, kwargs["model"], _opt(kwargs))

        def on_train_end(self, args, state, control, **kwargs):
            schedule.finish(kwargs["model"], _opt(kwargs))

    return ScheduleCallback()
