"""Multi-LoRA composition on diffusers pipelines, and the small testbed it is measured on.

``load_loras(pipe, paths)`` checks and loads diffusers LoRA files; ``compose(pipe, names, method)`` composes them per
denoising step, on a UNet or a diffusion transformer, with a registered method (``COMPOSERS``: merge, switch, composite, cmlora, clora, lora_composer,
autolora). Needs the ``diffusion`` extra (diffusers, Pillow).
"""
from __future__ import annotations

from . import autolora, clora, cmlora, composite, lora_composer, merge, switch  # noqa: F401  (registration)
from .compose import COMPOSERS, Composer, Stats, check_layout, check_prompt, compose
from .files import check_lora, load_loras, read_lora, save_lora

__all__ = ["COMPOSERS", "Composer", "Stats", "compose", "check_layout", "check_prompt", "load_loras", "read_lora",
           "check_lora", "save_lora"]
