"""The serving runner's hold on the base model's layers: the LoRA term inside the layer call, and a weight layout
for small batches; ``close`` gives every layer back as it was.

- LoRA in the layer call: a plain ``nn.Linear`` gets an instance ``forward`` that computes ``x W^T + b`` and adds
  the step's batched LoRA term in the same call (``del module.forward`` restores the class's own); any other
  adapted layer (GPT-2's Conv1D, quantised linears, a subclass with its own forward) keeps a forward hook that adds
  the same term to its output. The term is one function either way, so the two routes give the same numbers.
- Weight layout: on the CPU in float32, MKL's GEMM is 1.2-2x faster at the batch sizes of decode steps (8-64 rows)
  when ``W^T`` is the contiguous operand, so every ``nn.Linear`` weight (each distinct parameter once; a tied LM
  head and embedding share one) is stored transposed while serving: the same values and the same ``Parameter``,
  its ``data`` the transpose of an ``[in, out]`` contiguous tensor. Its values do not change, only the order of
  the GEMM's sums, so logits may move in the last bits, as they do between batch sizes. ``close`` makes each
  weight contiguous again. Other devices and dtypes keep their layout (not measured there).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

AddTerm = Callable[[nn.Module, tuple, torch.Tensor], None]  # (module, (x,), output): adds the LoRA term in place


def transposes(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether weights are stored transposed while serving (where it was measured to pay: float32 on the CPU)."""
    return device.type == "cpu" and dtype == torch.float32


class ServingLayers:
    """Installs the LoRA term into adapted layers on demand and the serving weight layout; ``close`` undoes both."""

    def __init__(self, model: nn.Module, transpose: bool):
        self.modules = dict(model.named_modules())
        self.installed: dict[str, object] = {}  # path -> "forward" (instance forward) or a hook handle
        self.transposed: list[nn.Parameter] = []
        if transpose:
            seen: set[int] = set()
            for m in self.modules.values():
                w = getattr(m, "weight", None)
                if type(m) is nn.Linear and w is not None and id(w) not in seen and type(w.data) is torch.Tensor \
                        and w.dtype == torch.float32 and w.dim() == 2 and w.is_contiguous():  # not quantised tensors
                    seen.add(id(w))
                    with torch.no_grad():
                        w.data = w.data.t().contiguous().t()
                    self.transposed.append(w)

    def install(self, path: str, add: AddTerm) -> None:
        """Make the layer at ``path`` add ``add``'s term to its output (once)."""
        if path in self.installed:
            return
        module = self.modules[path]
        if type(module) is nn.Linear and "forward" not in module.__dict__:
            def forward(x: torch.Tensor, _m: nn.Linear = module) -> torch.Tensor:
                y = F.linear(x, _m.weight, _m.bias)
                add(_m, (x,), y)
                return y

            module.forward = forward
            self.installed[path] = "forward"
        else:
            self.installed[path] = module.register_forward_hook(add)

    def close(self) -> None:
        """Every layer as it was: class forwards, no hooks, contiguous weights."""
        for path, how in self.installed.items():
            if how == "forward":
                del self.modules[path].forward
            else:
                how.remove()
        self.installed.clear()
        for w in self.transposed:
            with torch.no_grad():
                w.data = w.data.contiguous()
        self.transposed.clear()
