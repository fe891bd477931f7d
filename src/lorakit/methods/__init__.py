"""Adapter methods, one module each; importing this package registers them in ``lorakit.METHODS``."""
from . import dora, ffa_lora, lora  # noqa: F401
