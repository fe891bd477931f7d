"""Data-driven and weight-driven initialisers: calibration hooks and the factor maths they feed.

Chosen with ``init_lora_weights`` (PEFT's names) on any LoRA-shaped method. Weight-only: ``"pissa"``/
``"pissa_niter_<k>"``, ``"olora"`` (run inside ``lorakit.apply``; they move part of the base weight into the
adapter). Data-driven: ``"lora_ga"``, ``"eva"`` (``apply`` leaves the default initialisation;
``initialize(model, batches)`` runs them). Adapters trained on a moved base weight are saved relative to the
original weight with ``convert_to_plain_lora(state, initial_state)``. SHiRA's gradient supports live in
``shira_masks``.
"""
from __future__ import annotations

from . import eva, lora_ga, olora, pissa  # noqa: F401  (registers the initialisers)
from .calibration import Calibration, accumulate_gradients, layer_inputs, weight_gradients
from .conversion import convert_to_plain_lora
from .eva import EvaConfig
from .initializer import Initializer, initialize
from .lora_ga import LoraGAConfig

__all__ = ["Calibration", "EvaConfig", "Initializer", "LoraGAConfig", "accumulate_gradients", "convert_to_plain_lora",
           "initialize", "layer_inputs", "weight_gradients"]
