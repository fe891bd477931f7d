"""Adapter methods, one module each; importing this package registers them in ``lorakit.METHODS``."""
from . import dora, lora  # noqa: F401  (first: the registry lists methods in the order they register)
from . import block_lora, bone, dylora, ffa_lora, flylora, loldu, lora_sb, lora_xs, nlora, nola, randlora, shira  # noqa: F401,E501
