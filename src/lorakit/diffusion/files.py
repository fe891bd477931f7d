"""LoRA files as diffusers users have them: ``pytorch_lora_weights.safetensors`` with diffusers' key names.

This is the only module that knows diffusers' LoRA key strings (``unet.<module path>.lora_A.weight``). Reading goes
through the pipeline's own ``lora_state_dict``, so the community formats diffusers converts (kohya-style
``lora_unet_...`` files for Stable Diffusion and SDXL, among others) are read as diffusers reads them; a file is
checked against the network before loading, and a LoRA made for another network is refused with the shapes that
differ. After loading, every module the file adapts must carry the adapter: diffusers skips, with only a warning,
the attention modules of a file whose keys mix PEFT's ``lora_A`` and the older ``lora.down`` (what
``convert_state_dict_to_diffusers`` makes of a UNet adapted in convolutions and attention); such a file is refused.
Files are written with PEFT's keys (``unet.<module>.lora_A.weight``), which diffusers loads whole.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DENOISERS = ("unet", "transformer")
# diffusers writes attention factors as lora.down / lora.up and others as PEFT's lora_A / lora_B
_FACTORS = {".lora_A.weight": "input", ".lora.down.weight": "input", ".lora_B.weight": "output",
            ".lora.up.weight": "output"}


def denoiser_of(pipe):
    """The pipeline's denoising network (``unet`` or ``transformer``) and its component name."""
    for name in DENOISERS:
        if getattr(pipe, name, None) is not None:
            return getattr(pipe, name), name
    raise TypeError(f"{type(pipe).__name__} has neither a unet nor a transformer to put LoRAs on")


def save_lora(pipe, adapter_name: str, directory: str | Path, overwrite: bool = False) -> Path:
    """Write the denoiser's adapter ``adapter_name`` as DIRECTORY/pytorch_lora_weights.safetensors (atomically)."""
    from peft.utils import get_peft_model_state_dict

    denoiser, component = denoiser_of(pipe)
    target = Path(directory) / WEIGHT_NAME
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    state = get_peft_model_state_dict(denoiser, adapter_name=adapter_name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        kwargs = {f"{component}_lora_layers": state,
                  f"{component}_lora_adapter_metadata": denoiser.peft_config[adapter_name].to_dict()}
        type(pipe).save_lora_weights(tmp, **kwargs)
        os.replace(Path(tmp) / WEIGHT_NAME, target)
    return target


def lora_file(path: str | Path) -> Path:
    """The LoRA file at ``path``: the file itself, or DIRECTORY/pytorch_lora_weights.safetensors."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA file at {path} (expected a .safetensors file or a directory with {WEIGHT_NAME})")
    return path


def read_lora(pipe, path: str | Path) -> dict[str, torch.Tensor]:
    """The LoRA at ``path`` (a file, or a directory holding pytorch_lora_weights.safetensors), in diffusers' keys."""
    path = lora_file(path)
    state, _alphas = type(pipe).lora_state_dict(str(path.parent), weight_name=path.name)
    if not state:
        raise ValueError(f"{path}: no LoRA tensors found")
    return state


def check_lora(pipe, state: dict[str, torch.Tensor], path: str | Path = "LoRA") -> None:
    """Refuse a LoRA whose modules or shapes do not match the pipeline's denoiser, naming the first difference."""
    denoiser, component = denoiser_of(pipe)
    modules = dict(denoiser.named_modules())
    prefix = component + "."
    for key, tensor in state.items():
        side = next((sd for suffix, sd in _FACTORS.items() if key.endswith(suffix)), None)
        if not key.startswith(prefix) or side is None:
            continue  # text-encoder LoRAs and alphas are left to diffusers' loader
        module_path = key[len(prefix):key.rindex(".lora")]
        module = modules.get(module_path)
        if module is None:
            raise ValueError(f"{path}: LoRA made for another network: {component} has no module {module_path!r}")
        weight = getattr(module, "base_layer", module).weight
        # the down factor (r, in[, kh, kw]) reads the layer's input; the up factor (out, r[, 1, 1]) writes its output
        dim = 1 if side == "input" else 0
        if tensor.dim() != weight.dim() or tensor.shape[dim] != weight.shape[dim]:
            raise ValueError(f"{path}: LoRA made for another network: {key[len(prefix):]} has shape "
                             f"{tuple(tensor.shape)} ({side} {tensor.shape[dim]}), the network's {module_path} has "
                             f"weight {tuple(weight.shape)} ({side} {weight.shape[dim]})")


def load_loras(pipe, paths: list[str | Path], names: list[str] | None = None) -> list[str]:
    """Check and load LoRA files into ``pipe`` with ``load_lora_weights``; returns the adapter names."""
    names = list(names) if names else [adapter_name(p) for p in paths]
    if len(set(names)) != len(names):
        raise ValueError(f"two LoRAs would get the same adapter name: {names}; rename a file or pass names")
    for path, name in zip(paths, names):
        state = read_lora(pipe, path)
        check_lora(pipe, state, path)
        file = lora_file(path)  # loaded from the file, not the dict: its metadata holds lora_alpha
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
        _check_loaded(pipe, state, name, path)
    return names


def _check_loaded(pipe, state: dict, name: str, path) -> None:
    """Refuse a file part of which diffusers skipped (it warns and goes on, e.g. for mixed key styles)."""
    denoiser, component = denoiser_of(pipe)
    modules = dict(denoiser.named_modules())
    wanted = {k[len(component) + 1:k.rindex(".lora")] for k in state
              if k.startswith(component + ".") and any(k.endswith(s) for s in _FACTORS)}
    skipped = sorted(m for m in wanted if name not in getattr(modules.get(m), "lora_A", {}))
    if skipped:
        pipe.delete_adapters(name)
        raise ValueError(f"{path}: diffusers loaded {len(wanted) - len(skipped)} of the {len(wanted)} modules this "
                         f"file adapts and skipped {skipped[0]!r} and {len(skipped) - 1} more (files mixing "
                         f"lora_A/lora_B and lora.down/lora.up keys are read this way); write it again with PEFT keys")


def adapter_name(path: str | Path) -> str:
    """The adapter name a LoRA gets by default: its directory's name, or its file's stem."""
    path = Path(path)
    return path.parent.name if path.name == WEIGHT_NAME else path.name if path.is_dir() else path.stem
