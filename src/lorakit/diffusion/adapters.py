"""Adding, loading and switching LoRAs on a denoiser, whether or not diffusers gives it LoRA support.

diffusers gives ``add_adapter``/``load_lora_adapter``/``set_adapters`` to the denoisers that mix in its
``PeftAdapterMixin`` (UNet2DConditionModel, SD3, Flux, Sana, ...). Some diffusion transformers lack it
(``PixArtTransformer2DModel``, ``Transformer2DModel``, ``DiTTransformer2DModel`` in diffusers 0.42). On those the
same steps are taken with the functions that mixin itself calls: PEFT's ``inject_adapter_in_model`` and
``set_peft_model_state_dict`` to add and load, diffusers' ``set_adapter_layers`` and
``set_weights_and_activate_adapters`` to switch. The LoRA config then comes from the file's metadata (what
diffusers' writers store); a file without it is refused, since rank and alpha cannot be recovered exactly.
"""
from __future__ import annotations

import json

METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


def has_mixin(denoiser) -> bool:
    """Whether diffusers gives this denoiser its own LoRA methods."""
    return hasattr(denoiser, "set_adapters") and hasattr(denoiser, "load_lora_adapter")


def activate(denoiser, names, weights=None) -> None:
    """Exactly ``names`` active at ``weights`` (none: every LoRA off)."""
    if has_mixin(denoiser):
        if not names:
            denoiser.disable_adapters()
            return
        denoiser.enable_adapters()
        denoiser.set_adapters(list(names), None if weights is None else list(weights))
        return
    from diffusers.utils.peft_utils import set_adapter_layers, set_weights_and_activate_adapters

    set_adapter_layers(denoiser, enabled=bool(names))
    if names:
        set_weights_and_activate_adapters(denoiser, list(names), [1.0] * len(names) if weights is None else
                                          list(weights))


def add_adapter(denoiser, config, name: str) -> None:
    """Add a new LoRA ``name`` with PEFT ``config`` to the denoiser."""
    if has_mixin(denoiser):
        denoiser.add_adapter(config, adapter_name=name)
        return
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, denoiser, adapter_name=name)
    activate(denoiser, [name])


def load_adapter(denoiser, path, component: str, name: str) -> None:
    """Load the LoRA file ``path`` (keys ``<component>.<module>.lora_A.weight``) into the denoiser as ``name``."""
    if has_mixin(denoiser):
        denoiser.load_lora_adapter(str(path.parent), weight_name=path.name, prefix=component, adapter_name=name)
        return
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        metadata = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
    prefix = component + "."
    config = {k[len(prefix):]: v for k, v in metadata.items() if k.startswith(prefix)}
    if not config:
        raise ValueError(f"{path}: no LoRA config ({METADATA_KEY}) in the file; {type(denoiser).__name__} has no "
                         f"diffusers LoRA loader to infer it, and rank/alpha cannot be recovered exactly; write the "
                         f"file with lorakit or diffusers' save_lora_weights")
    state = {k[len(prefix):]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    add_adapter(denoiser, LoraConfig(**config), name)
    result = set_peft_model_state_dict(denoiser, state, adapter_name=name)
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    if missing:
        raise ValueError(f"{path}: {len(missing)} tensors matched no LoRA layer of {type(denoiser).__name__} "
                         f"(e.g. {missing[0]!r})")


def delete_adapter(denoiser, name: str) -> None:
    """Remove LoRA ``name`` from the denoiser."""
    if has_mixin(denoiser):
        denoiser.delete_adapters(name)
        return
    from diffusers.utils.peft_utils import delete_adapter_layers

    delete_adapter_layers(denoiser, name)
    getattr(denoiser, "peft_config", {}).pop(name, None)
