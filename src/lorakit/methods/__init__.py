"""Adapter methods, one module each; importing this package registers them in ``lorakit.METHODS``."""
from . import block_lora, dora, flylora, lora, nola, randlora, shira  # noqa: F401
