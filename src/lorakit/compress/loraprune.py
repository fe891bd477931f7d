"""LoRAPrune: structured pruning guided by the LoRA weights and gradients, on an iterative schedule while training.

LoRAPrune: Structured Pruning Meets Low-Rank Parameter-Efficient Fine-Tuning (Zhang et al., arXiv:2305.18403;
official code aim-uofa/LoRAPrune, ``loraprune/utils.py``). Update rule, per adapted producer layer:
    G_hat = g_B A + B g_A - g_B g_A   (from the LoRA gradients only; no gradient of W0 is ever formed)
    I = |G_hat ⊙ (W0 + s B A)|,  row sums give a score per output unit,
a group's score (one key/value head with its query heads; one FFN channel) is the sum over the layers that share
it (q+k+v; gate+up) of each layer's L2-normalised row scores, smoothed by S <- 0.9 S + 0.1 S_new after every
optimiser step. The target sparsity rises on a cubic ramp from ``init_ratio`` to ``ratio`` between 10% warm-up
and 10% cool-down; every ``prune_freq`` steps each block masks its lowest-scoring groups (the mask multiplies
the producer outputs, so o_proj/down_proj see zeros), and LoRA keeps training to recover. ``finalize`` merges
the adapter and slices the pruned rows and columns out: a plain Hugging Face model, smaller on disk and faster.

Scores are computed in blocks of ``CHUNK`` output rows (the same numbers; the transients are a block, never a
whole weight), so the LoRA metric's memory is the factor gradients it keeps.
``metric="grad"`` scores with the true weight gradient (|G ⊙ W|, hooks accumulate G = Σ dY^T X: the memory the
paper avoids) and ``metric="magnitude"`` with |W|; both are the paper's baselines and use the same schedule.

Deviations, and why:
- Every block prunes the same number of groups (the official code's local pruning, but with no skipped layers:
  it leaves the first 10% and the last layer whole). One Hugging Face config holds one ``intermediate_size`` and
  one head count for all layers, and the pruned model must load in ``transformers`` without lorakit.
- Attention is pruned in key/value groups (GQA-aware); a block with one key/value head (Gemma 3 270M) or BERT-style
  attention (head size derived from the head count) keeps its heads and prunes FFN channels only.
- Scores are computed after the optimiser step (``fit`` calls callbacks there), from the gradients captured during
  backward and the updated factors; the official code scores before the step. The EMA makes the difference small.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import nn

from ..core.adapter import Adapter, dense_weight
from ..core.apply import merge
from .structure import Block, Plan, apply_plan, blocks, rows_of

METRICS = ("lora", "grad", "magnitude")
CHUNK = 256  # output rows scored at once


def check_ratio(ratio: float, name: str = "sparsity") -> float:
    """``ratio`` if it lies in (0, 1); a ValueError that says so otherwise."""
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio < 1:
        raise ValueError(f"{name} must lie in (0, 1) (the fraction of groups removed), found {ratio!r}")
    return float(ratio)


@dataclasses.dataclass(frozen=True)
class LoRAPruneConfig:
    """The official defaults (``script/prune.sh``): ratio 0.5, cubic ramp, prune every 10 steps, EMA 0.9."""

    ratio: float = 0.5
    init_ratio: float = 0.0
    warmup: float = 0.1
    cooldown: float = 0.1
    prune_freq: int = 10
    metric: str = "lora"
    ema: float = 0.9
    heads: bool = True  # also prune attention head groups where a block has more than one

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        if not 0 <= self.init_ratio <= self.ratio:
            raise ValueError(f"init_ratio must lie in [0, ratio={self.ratio}], found {self.init_ratio}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, found {self.metric!r}")
        if self.prune_freq < 1 or not 0 <= self.warmup + self.cooldown < 1:
            raise ValueError("prune_freq must be >= 1 and warmup + cooldown < 1")


def sparsity_at(step: int, total: int, config: LoRAPruneConfig) -> float:
    """The cubic schedule: init_ratio until warm-up ends, ratio from the start of cool-down."""
    start, end = config.warmup * total, (1 - config.cooldown) * total
    if step <= start:
        return config.init_ratio
    if step >= end:
        return config.ratio
    left = 1 - (step - start) / (end - start)
    return config.ratio + (config.init_ratio - config.ratio) * left ** 3


class LoRAPrune:
    """The pruning schedule as a ``fit`` callback: ``fit(model, ..., callbacks=[pruner])``, then ``finalize()``."""

    def __init__(self, model: nn.Module, config: LoRAPruneConfig, total_steps: int):
        self.model, self.config, self.total = model, config, total_steps
        self.blocks = blocks(model)
        if not config.heads:
            for b in self.blocks:
                b.groups = 1  # one group: nothing to prune in attention
        self.producers = {p: (b, kind) for b in self.blocks for p, kind in b.producers.items()}
        missing = [p for p in self.producers if config.metric == "lora" and not _is_lora(model.get_submodule(p))]
        if missing:
            raise ValueError(
                f"LoRAPrune's 'lora' metric needs a LoRA adapter on every pruned layer; these have none: "
                f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}. Add them to target_modules "
                "(e.g. 'all-linear'), or use metric='magnitude'"
            )
        self.scores: dict[str, dict[str, torch.Tensor]] = {}
        self.pruned = {b.path: {"groups": torch.zeros(b.groups, dtype=torch.bool),
                                "channels": torch.zeros(b.channels, dtype=torch.bool)} for b in self.blocks}
        self.grads: dict[str, dict[str, torch.Tensor]] = {}
        self.hooks = [model.get_submodule(p).register_forward_hook(self._mask_hook(p)) for p in self.producers]
        if config.metric == "lora":
            for path in self.producers:
                layer = self.model.get_submodule(path)
                for name in ("lora_A", "lora_B"):
                    weight = getattr(layer, name).weight
                    self.hooks.append(weight.register_post_accumulate_grad_hook(self._keep_grad(path, name)))
        elif config.metric == "grad":
            self.hooks += [model.get_submodule(p).register_forward_hook(self._weight_grad_hook(p)) for p in self.producers]
        self.step = 0

    # -- hooks ---------------------------------------------------------------------------------------------
    def _mask_hook(self, path: str):
        block, kind = self.producers[path]

        def hook(module, args, output):
            pruned = self.pruned[block.path]["channels" if kind == "ffn" else "groups"]
            if not pruned.any():
                return output
            keep = torch.ones(output.shape[-1], dtype=output.dtype, device=output.device)
            keep[rows_of(kind, pruned.nonzero().flatten().tolist(), block).to(output.device)] = 0
            return output * keep

        return hook

    def _keep_grad(self, path: str, name: str):
        def hook(param):
            self.grads.setdefault(path, {})[name] = param.grad.detach().clone()  # summed over micro-batches

        return hook

    def _weight_grad_hook(self, path: str):
        def hook(module, args, output):
            if not output.requires_grad:
                return
            x = args[0].detach()

            def accumulate(grad_out):
                g = grad_out.reshape(-1, grad_out.shape[-1]).T.float() @ x.reshape(-1, x.shape[-1]).float()
                store = self.grads.setdefault(path, {})
                store["W"] = store["W"] + g if "W" in store else g

            output.register_hook(accumulate)

        return hook

    # -- scores ------------------------------------------------------------------------------------------
    def row_scores(self, path: str) -> Optional[torch.Tensor]:
        """Σ_in I for each output row of the producer at ``path`` under the configured metric (None: no gradient yet)."""
        layer = self.model.get_submodule(path)
        grads = self.grads.get(path)
        if self.config.metric != "magnitude" and not grads:
            return None
        with torch.no_grad():
            base = dense_weight(layer.base_layer if isinstance(layer, Adapter) else layer)
            factors = _factors(layer, base.shape)
            delta = layer.delta_weight() if isinstance(layer, Adapter) and factors is None else None
            if self.config.metric == "lora":
                a, b = layer.lora_A.weight.float(), layer.lora_B.weight.float()
                ga, gb = grads["lora_A"].float(), grads["lora_B"].float()
            out = torch.empty(base.shape[0], dtype=torch.float32, device=base.device)
            # Row chunks: the transients (W0 + s B A, G_hat, their product) are CHUNK x in, never a whole weight.
            for lo in range(0, base.shape[0], CHUNK):
                rows = slice(lo, lo + CHUNK)
                weight = base[rows].float()
                if factors is not None:
                    fa, fb, scale = factors
                    weight = weight + scale * (fb[rows].float() @ fa.float())
                elif delta is not None:
                    weight = weight + delta[rows].float()
                if self.config.metric == "magnitude":
                    out[rows] = weight.abs().sum(1)
                    continue
                if self.config.metric == "grad":
                    g_hat = grads["W"][rows]
                else:  # G_hat = g_B A + B g_A - g_B g_A, restricted to these rows
                    g_hat = gb[rows] @ a + b[rows] @ ga - gb[rows] @ ga
                out[rows] = (g_hat * weight).abs().sum(1)
            return out

    def update_scores(self) -> None:
        """Fold the scores of the last step into the moving average, and forget the captured gradients."""
        for block in self.blocks:
            fresh: dict[str, torch.Tensor] = {}
            for path, kind in block.producers.items():
                rows = self.row_scores(path)
                if rows is None:
                    continue
                key = "channels" if kind == "ffn" else "groups"
                per = rows.reshape(block.groups, -1).sum(1) if key == "groups" else rows
                per = per / per.norm().clamp_min(1e-12)
                fresh[key] = fresh[key] + per if key in fresh else per
            old = self.scores.setdefault(block.path, {})
            for key, value in fresh.items():
                old[key] = self.config.ema * old[key] + (1 - self.config.ema) * value if key in old else value
        self.grads.clear()

    def prune_to(self, ratio: float) -> None:
        """Mask, in every block, its lowest-scoring groups until ``floor(ratio · n)`` are masked (never unmasks)."""
        for block in self.blocks:
            for key, n in (("groups", block.groups), ("channels", block.channels)):
                pruned, score = self.pruned[block.path][key], self.scores.get(block.path, {}).get(key)
                want = math.floor(ratio * n) if n > 1 else 0
                if score is None or want <= int(pruned.sum()):
                    continue
                order = score.masked_fill(pruned, float("inf")).argsort()
                pruned[order[: want - int(pruned.sum())]] = True

    def __call__(self, step: int, record: Optional[dict] = None) -> None:
        self.step = step
        self.update_scores()
        if step % self.config.prune_freq == 0 or step >= self.total:
            self.prune_to(sparsity_at(step, self.total, self.config))

    # -- the result --------------------------------------------------------------------------------------
    def plan(self) -> Plan:
        """Kept group and channel indices per block."""
        return {b.path: {k: (~m).nonzero().flatten().tolist() for k, m in self.pruned[b.path].items()
                         if (k == "channels" or b.groups > 1)} for b in self.blocks}

    def sparsity(self) -> dict[str, float]:
        """The fraction of head groups and of FFN channels masked so far."""
        out = {}
        for key in ("groups", "channels"):
            masks = [self.pruned[b.path][key] for b in self.blocks if (key == "channels" or b.groups > 1)]
            out[key] = float(sum(int(m.sum()) for m in masks) / max(1, sum(m.numel() for m in masks)))
        return out

    def close(self) -> None:
        """Remove the hooks (the masks stop applying)."""
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def finalize(self) -> nn.Module:
        """Merge the adapter, slice out the masked rows and columns, and return the plain smaller model."""
        if self.step < self.total:
            self.prune_to(self.config.ratio)  # an early stop still delivers the target sparsity
        self.close()
        model = merge(self.model) if any(isinstance(m, Adapter) for m in self.model.modules()) else self.model
        return apply_plan(model, self.plan())


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation of two score vectors (no ties expected)."""
    rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])


def _factors(layer: nn.Module, shape: torch.Size):
    """(A, B, scale) of an adapter whose ΔW = scale · B A is laid out like the base weight, else None."""
    if not isinstance(layer, Adapter):
        return None
    factors = type(layer).low_rank({k: v.detach() for k, v in layer.adapter_tensors().items()}, layer.config)
    if factors is None or (factors[1].shape[0], factors[0].shape[1]) != tuple(shape):
        return None
    return factors


def _is_lora(module: nn.Module) -> bool:
    return isinstance(module, Adapter) and hasattr(module, "lora_A") and hasattr(module, "lora_B")


def magnitude_prune(model: nn.Module, ratio: float, heads: bool = True) -> nn.Module:
    """One-shot magnitude pruning (|W| row scores) to ``ratio`` of a model without adapters: the baseline."""
    pruner = LoRAPrune(model, LoRAPruneConfig(ratio=check_ratio(ratio), metric="magnitude", heads=heads), total_steps=1)
    pruner.update_scores()
    pruner.prune_to(ratio)
    pruner.close()
    return apply_plan(model, pruner.plan())


__all__ = ["Block", "LoRAPrune", "LoRAPruneConfig", "check_ratio", "magnitude_prune", "sparsity_at", "spearman"]
