"""LoRA files as diffusers users have them: ``pytorch_lora_weights.safetensors`` with diffusers' key names.

This is the only module that knows diffusers' LoRA key strings (``unet.<module path>.lora_A.weight``). Reading goes
through the pipeline's own ``lora_state_dict``, so the community formats diffusers converts are read as diffusers
reads them: kohya-style ``lora_unet_<module_path>.lora_down/lora_up/alpha`` files for Stable Diffusion 1.x/2.x and
SDXL pipelines (``StableDiffusionLoraLoaderMixin``/``StableDiffusionXLLoraLoaderMixin``: diffusers' module names
with underscores, and SDXL's sgm ``input_blocks`` names), and Flux's kohya, XLabs and BFL layouts (its
``lora_state_dict``); SD3 and PixArt get no converter in diffusers, and a kohya-style file left unconverted is refused
by name. Pipelines without a LoRA loader (PixArt-alpha/sigma) load through the denoiser's own ``load_lora_adapter``.
A file is checked against the network before loading, and a LoRA made for another network is refused with the shapes
that differ. After loading, every module the file adapts must carry the adapter: diffusers skips, with only a warning,
the attention modules of a file whose keys mix PEFT's ``lora_A`` and the older ``lora.down`` (what
``convert_state_dict_to_diffusers`` makes of a UNet adapted in convolutions and attention); such a file is refused.
Files are written with PEFT's keys (``unet.<module>.lora_A.weight``), which diffusers loads whole, or, for UNets,
kohya-style (``kohya=True``): diffusers' ``convert_state_dict_to_kohya`` names the keys and each module's ``alpha`` is
set to its LoRA's scaling x rank (the converter writes the rank, which would change the scale); the file is read
back through the pipeline's converter before it is kept, and refused if a module does not come back as itself.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .adapters import delete_adapter, load_adapter

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


def save_lora(pipe, adapter_name: str, directory: str | Path, overwrite: bool = False, kohya: bool = False) -> Path:
    """Write the denoiser's adapter ``adapter_name`` as DIRECTORY/pytorch_lora_weights.safetensors (atomically)."""
    from diffusers.loaders.lora_base import LoraBaseMixin
    from peft.utils import get_peft_model_state_dict

    denoiser, component = denoiser_of(pipe)
    if kohya and (component != "unet" or not hasattr(type(pipe), "lora_state_dict")):
        raise ValueError(f"kohya-style files are written for UNet pipelines with diffusers' LoRA loader (Stable "
                         f"Diffusion, SDXL); {type(pipe).__name__}'s {component} has no kohya layout diffusers reads "
                         f"back as written")
    if adapter_name not in (getattr(denoiser, "peft_config", None) or {}):
        raise KeyError(f"no LoRA {adapter_name!r} in the pipeline's {component}")
    target = Path(directory) / WEIGHT_NAME
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    state = get_peft_model_state_dict(denoiser, adapter_name=adapter_name)
    metadata = denoiser.peft_config[adapter_name].to_dict()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        if kohya:
            _save_kohya(pipe, adapter_name, {f"{component}.{k}": v for k, v in state.items()}, Path(tmp))
        elif hasattr(type(pipe), "save_lora_weights"):
            type(pipe).save_lora_weights(tmp, **{f"{component}_lora_layers": state,
                                                 f"{component}_lora_adapter_metadata": metadata})
        else:  # no saver on this pipeline (PixArt): the writer every pipeline's save_lora_weights calls
            LoraBaseMixin._save_lora_weights(tmp, {component: state}, {component: metadata}, weight_name=WEIGHT_NAME)
        os.replace(Path(tmp) / WEIGHT_NAME, target)
    return target


def _save_kohya(pipe, adapter: str, state: dict, directory: Path) -> None:
    """The adapter as a kohya-style file in ``directory``, kept only if diffusers reads every module back as itself."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    denoiser, component = denoiser_of(pipe)
    modules = dict(denoiser.named_modules())
    for key in state:
        if key.endswith(".lora_magnitude_vector") or ".lora_embedding" in key:
            raise ValueError(f"{key}: a LoRA variant (DoRA) or embedding LoRA; the kohya layout holds plain LoRAs")
    out = convert_state_dict_to_kohya(state)
    for key in list(out):
        if key.endswith(".alpha"):
            down = next(k for k in state if k.endswith(".lora_A.weight") and
                        "lora_" + k.removesuffix(".lora_A.weight").replace(".", "_") == key.removesuffix(".alpha"))
            layer = modules[down[len(component) + 1:].removesuffix(".lora_A.weight")]
            out[key] = torch.tensor(float(layer.scaling[adapter] * layer.r[adapter]))
    save_file({k: v.detach().contiguous() for k, v in out.items()}, str(directory / WEIGHT_NAME))
    back = _peft_modules(type(pipe).lora_state_dict(str(directory), weight_name=WEIGHT_NAME)[0], component)
    written = _peft_modules(state, component)
    if back != written:
        lost = sorted(written - back) or sorted(back - written)
        raise ValueError(f"diffusers reads this adapter's kohya-style file back with other module names (e.g. "
                         f"{lost[0]!r}); write it in diffusers' layout instead (kohya=False)")


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
    from safetensors.torch import load_file

    path = lora_file(path)
    if hasattr(type(pipe), "lora_state_dict"):
        state = type(pipe).lora_state_dict(str(path.parent), weight_name=path.name)
        state = state[0] if isinstance(state, tuple) else state  # some loaders also give the network alphas
    else:  # no loader on this pipeline: the file as the denoiser's load_lora_adapter reads it
        state = load_file(str(path))
    if not state:
        raise ValueError(f"{path}: no LoRA tensors found")
    kohya = [k for k in state if k.startswith(("lora_unet_", "lora_te")) or k.endswith(".lora_down.weight")]
    if kohya:
        raise ValueError(f"{path}: kohya-style keys (e.g. {kohya[0]!r}) that diffusers' {type(pipe).__name__} does "
                         f"not convert; diffusers converts them for Stable Diffusion/SDXL UNets and Flux")
    return state


def _peft_modules(state: dict, component: str) -> set[str]:
    """The module paths of ``component`` a state dict in any of diffusers' LoRA key styles adapts."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    prefix = component + "."
    keys = convert_unet_state_dict_to_peft({k: None for k in state if k.startswith(prefix)})
    return {k[len(prefix):k.rindex(".lora_")] for k in keys if k.endswith((".lora_A.weight", ".lora_B.weight"))}


def check_lora(pipe, state: dict[str, torch.Tensor], path: str | Path = "LoRA") -> None:
    """Refuse a LoRA whose modules or shapes do not match the pipeline's denoiser, naming the first difference."""
    denoiser, component = denoiser_of(pipe)
    modules = dict(denoiser.named_modules())
    from diffusers.utils import convert_unet_state_dict_to_peft

    prefix = component + "."
    peft = convert_unet_state_dict_to_peft({k: v for k, v in state.items() if k.startswith(prefix)})
    if not peft:
        found = sorted({k.split(".", 1)[0] for k in state})
        raise ValueError(f"{path}: LoRA made for another network: no tensors for a {component} (this pipeline's "
                         f"denoiser); the file adapts {', '.join(found)}")
    for key, tensor in peft.items():
        side = next((sd for suffix, sd in _FACTORS.items() if key.endswith(suffix)), None)
        if side is None:
            continue  # alphas are left to diffusers' loader
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
        if hasattr(pipe, "load_lora_weights"):
            pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
        else:
            denoiser, component = denoiser_of(pipe)
            load_adapter(denoiser, file, component, name)
        _check_loaded(pipe, state, name, path)
    return names


def _check_loaded(pipe, state: dict, name: str, path) -> None:
    """Refuse a file part of which diffusers skipped (it warns and goes on, e.g. for mixed key styles)."""
    denoiser, component = denoiser_of(pipe)
    modules = dict(denoiser.named_modules())
    wanted = _peft_modules(state, component)
    skipped = sorted(m for m in wanted if name not in getattr(modules.get(m), "lora_A", {}))
    if skipped:
        if hasattr(pipe, "delete_adapters"):
            pipe.delete_adapters(name)
        else:
            delete_adapter(denoiser, name)
        raise ValueError(f"{path}: diffusers loaded {len(wanted) - len(skipped)} of the {len(wanted)} modules this "
                         f"file adapts and skipped {skipped[0]!r} and {len(skipped) - 1} more (files mixing "
                         f"lora_A/lora_B and lora.down/lora.up keys are read this way); write it again with PEFT keys")


def adapter_name(path: str | Path) -> str:
    """The adapter name a LoRA gets by default: its directory's name, or its file's stem."""
    path = Path(path)
    return path.parent.name if path.name == WEIGHT_NAME else path.name if path.is_dir() else path.stem
