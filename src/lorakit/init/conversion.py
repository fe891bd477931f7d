"""Turn an adapter trained on a moved base weight into a plain LoRA relative to the original weight.

Base-mutating initialisers (PiSSA, OLoRA, LoRA-GA) train on W_res = W − s·B0 A0. The trained model computes
W_res + s·B A = W + s·(B A − B0 A0), which is exactly a rank-2r LoRA on the untouched W:
A' = [A; A0], B' = [B, −B0], with r and lora_alpha doubled (alpha × √2 under rsLoRA) so that s is unchanged,
and pattern values doubled. This is PEFT's ``LoraModel.subtract_mutated_init`` and the config change of
``save_pretrained(path_initial_model_for_weight_conversion=...)``; the result loads in PEFT and lorakit.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Union

import torch

from ..core.state import AdapterState

# (first factor, second factor) key pairs: A stacks along rows, B along columns
PAIRS = (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B"))


def convert_to_plain_lora(state: AdapterState, initial_state: Union[AdapterState, str, os.PathLike]) -> AdapterState:
    """``state`` (trained) minus ``initial_state`` (right after initialisation) as a plain LoRA on the original base."""
    if not isinstance(initial_state, AdapterState):
        from ..formats.peft import load_state

        initial_state = load_state(initial_state)
    config = state.config
    if getattr(config, "use_rslora", False) and (config.rank_pattern or getattr(config, "alpha_pattern", None)):
        raise ValueError("cannot convert an rsLoRA adapter with rank_pattern/alpha_pattern: the doubled ranks would "
                         "change its scaling (PEFT refuses this too)")
    if sorted(state.tensors) != sorted(initial_state.tensors):
        raise ValueError(
            "the initial adapter covers other modules than the trained one: "
            f"{sorted(set(state.tensors) ^ set(initial_state.tensors))[:6]}"
        )
    if config.method_name != "lora":
        raise ValueError(
            f"method '{config.method_name}' is not plain LoRA (ΔW = s·B A), so its update cannot be rewritten as a "
            "LoRA relative to the original weight; merge the adapter into the original model instead"
        )
    tensors = {}
    for path, trained in state.tensors.items():
        start = initial_state.tensors[path]
        out = {}
        for a_key, b_key in PAIRS:
            if a_key in trained:
                out[a_key] = torch.cat([trained[a_key], start[a_key].to(trained[a_key])], dim=0)
                out[b_key] = torch.cat([trained[b_key], -start[b_key].to(trained[b_key])], dim=1)
        tensors[path] = out
    alpha = config.lora_alpha * (2 ** 0.5 if config.use_rslora else 2)
    new_config = dataclasses.replace(
        config, init_lora_weights=True, r=config.r * 2, lora_alpha=alpha,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()},
    )
    return AdapterState(new_config, tensors, state.modules_to_save, state.base_tensors)
