"""Adapter methods, one module each; importing this package registers them in ``lorakit.METHODS``."""
from . import dora, lora, randlora, shira  # noqa: F401
