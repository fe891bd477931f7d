"""The built-in aggregation strategies; importing this package registers them in ``STRATEGIES``."""
from . import fedavg_dense, fedit, ffa_lora, flora, lora_fair, zero_pad  # noqa: F401
