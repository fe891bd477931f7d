"""Adapter methods, one module each; importing this package registers them in ``lorakit.METHODS``."""
from . import bone, dora, dylora, ffa_lora, loldu, lora, lora_sb, lora_xs, nlora  # noqa: F401
