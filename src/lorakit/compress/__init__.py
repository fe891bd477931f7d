"""Smaller bases: quantised linear layers (QLoRA), LoRA-guided structured pruning (LoRAPrune), LoRAM."""
from __future__ import annotations

from .quantize import KINDS, QuantizationUnavailable, QuantizeConfig, available, dequantize_, quantize_

__all__ = ["KINDS", "QuantizationUnavailable", "QuantizeConfig", "available", "dequantize_", "quantize_"]
