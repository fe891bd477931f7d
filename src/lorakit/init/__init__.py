"""Data-driven and weight-driven initialisers: calibration hooks and the factor maths they feed.

Two ways in. ``init_lora_weights`` (PEFT's names) on LoRA/DoRA: weight-only ``"pissa"``/``"pissa_niter_<k>"``,
``"olora"`` (both move part of the base weight into the adapter) and ``"orthogonal"`` run inside ``lorakit.apply``;
data-driven ``"lora_ga"`` and ``"eva"`` run in ``initialize(model, batches)`` after ``apply``. Adapters trained on
a moved base weight are saved relative to the original weight with ``convert_to_plain_lora(state, initial_state)``.
Methods whose adapters need data themselves (LoRA-SB) declare it and are built with ``calibrate(model, config,
batches)``; SHiRA's gradient supports live in ``shira_masks``.
"""
from __future__ import annotations

from . import eva, lora_ga, olora, orthogonal, pissa  # noqa: F401  (registers the initialisers)
from .calibrate import calibrate, weight_gradients
from .calibration import Calibration, accumulate_gradients, layer_inputs
from .conversion import convert_to_plain_lora
from .eva import EvaConfig
from .initializer import Initializer, initialize
from .lora_ga import LoraGAConfig

__all__ = ["Calibration", "EvaConfig", "Initializer", "LoraGAConfig", "accumulate_gradients", "calibrate",
           "convert_to_plain_lora", "initialize", "layer_inputs", "weight_gradients"]
