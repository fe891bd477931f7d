"""Gradient checkpointing for `fit` and `lorakit train`: ``full`` or ``selective`` (Hugging Face models).

* ``full`` (``True``): every block's activations are dropped in the forward and the block is run again in the
  backward (transformers' per-block checkpointing, reentrant). The embedding output is made to require grad
  (``enable_input_require_grads``) as PEFT's ``prepare_model_for_kbit_training`` does, so checkpointed blocks
  whose own weights are all frozen still pass gradients to the adapters inside.
* ``selective``: inside every block, only the attention core and the FFN's widening half are recomputed;
  the down-projection, the output projection's residual and norm, and dropout keep their activations. The units
  are found by structure: a block's submodule that holds a linear layer but no norm over the model width and no
  down-projection (a linear layer from at least twice the model width down to it) is checkpointed whole
  (non-reentrant, its dropout replayed); a submodule holding either is searched further. On BERT-style blocks
  that is ``attention.self`` and ``intermediate``; on Llama- and Gemma-style blocks, whose FFN is one module with
  its down-projection, the attention (``self_attn``) alone, which saves less. Why: with a frozen base the backward costs about one forward, so recomputing whole
  blocks adds ~50% to a step; the down-projection does a third of a block's product work, and the tensors a
  norm or dropout saves would be saved again by the recompute, so recomputing them frees nothing. Measured
  against the alternatives (per-op selective policies, leaving blocks out) in docs/benchmarks/gradient-checkpointing.md.

Both give the same gradients as no checkpointing.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

MODES = ("full", "selective")


def checkpoint_mode(value: bool | str | None) -> str | None:
    """``None`` (off), "full" or "selective" from fit's ``gradient_checkpointing`` (True means "full")."""
    if value is None or value is False:
        return None
    if value is True:
        return "full"
    if value not in MODES:
        raise ValueError(f"gradient_checkpointing must be one of {MODES} (or True/False), not {value!r}")
    return value


def _is_width_norm(module: nn.Module, width: int) -> bool:
    """A norm over the model width (a residual-stream norm; not a per-head q/k norm)."""
    if not (isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))):
        return False
    weight = getattr(module, "weight", None)
    size = weight.shape[-1] if weight is not None else getattr(module, "normalized_shape", (width,))[-1]
    return size == width


def _is_down_projection(module: nn.Module, width: int) -> bool:
    return isinstance(module, nn.Linear) and module.out_features == width and module.in_features >= 2 * width


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or isinstance(getattr(module, "base_layer", None), nn.Linear)


def selective_units(block: nn.Module, width: int) -> list[str]:
    """The submodules of ``block`` (paths) that ``selective`` checkpoints, for a model of hidden size ``width``."""
    units = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            inside = list(child.modules())
            if _is_linear(child) or not any(_is_linear(m) for m in inside):
                continue  # a lone linear layer or one without any: recomputing it frees nothing
            if any(_is_width_norm(m, width) or _is_down_projection(m, width) for m in inside):
                visit(child, path + ".")
            else:
                units.append(path)

    visit(block, "")
    return units


def _checkpointed(module: nn.Module) -> None:
    forward = module.forward

    def run(*args, **kwargs):
        if not (torch.is_grad_enabled() and module.training):
            return forward(*args, **kwargs)
        # a key/value cache would be appended to twice (forward and recompute); training needs none
        kwargs = {k: (None if k.startswith("past_key_value") else v) for k, v in kwargs.items()}
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    module.forward = run


def _enable_selective(model: nn.Module) -> None:
    from transformers.modeling_layers import GradientCheckpointingLayer

    width = getattr(getattr(model, "config", None), "hidden_size", None)
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not blocks or not width:
        raise ValueError(f"selective gradient checkpointing needs a transformers model with blocks and a hidden_size; "
                         f"{type(model).__name__} has none; use gradient_checkpointing='full'")
    for block in blocks:
        units = selective_units(block, width)
        if not units:
            raise ValueError(f"selective gradient checkpointing found nothing to recompute in {type(block).__name__}; "
                             "use gradient_checkpointing='full'")
        for path in units:
            _checkpointed(block.get_submodule(path))


def enable_gradient_checkpointing(model: torch.nn.Module, mode: bool | str = "full") -> None:
    """Checkpoint every block of a Hugging Face ``model`` in ``mode`` ("full" or "selective")."""
    mode = checkpoint_mode(mode) or "full"
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5 name
    if enable is None and not hasattr(model, "gradient_checkpointing_enable"):
        raise ValueError(
            f"gradient checkpointing needs a transformers model (gradient_checkpointing_enable); "
            f"{type(model).__name__} has none"
        )
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing in transformers")
    if mode == "selective":
        return _enable_selective(model)
    kwargs = {"use_reentrant": True}
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()

