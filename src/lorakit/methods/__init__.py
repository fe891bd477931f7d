"""Adapter methods, one module each; importing this package registers them in ``lorakit.METHODS``."""
from . import dora, lora  # noqa: F401  (first: the registry lists methods in the order they register)
from . import lora_params  # noqa: F401  (LoRA on parameters: target_parameters)
from . import block_lora, bone, dylora, ffa_lora, flylora, loldu, lora_sb, lora_xs, nlora, nola, randlora, shira  # noqa: F401,E501
from . import lora_mixer, meteora, smora  # noqa: F401  (routed LoRA experts)
