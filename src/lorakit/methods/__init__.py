"""Adapter methods, one module each; importing this package registers them in ``lorakit.METHODS``."""
from . import dora, lora  # noqa: F401
from . import lora_mixer, meteora, smora  # noqa: F401  (routed LoRA experts)
