"""Optimisers for adapters, registered in ``OPTIMIZERS``: ``create(name, model, lr)`` builds one.

``adamw`` (default), ``lora_plus``, ``lora_fa``, ``allora``, ``lora_pro``; each works in ``lorakit.train.fit``
(``optimizer=NAME``) and as ``transformers.Trainer(..., optimizers=(create(NAME, model, lr), None))``.
"""
from .base import OPTIMIZERS, AdamW, LoRAPair, create, lora_pairs
from .lora_plus import LoRAPlus
from .lora_fa import LoRAFA
from .allora import ALLoRA
from .lora_pro import LoRAPro

__all__ = ["ALLoRA", "AdamW", "LoRAFA", "LoRAPair", "LoRAPlus", "LoRAPro", "OPTIMIZERS", "create", "lora_pairs"]
