"""lorakit: low-rank adapters for PyTorch and Hugging Face models, in PEFT's format."""
from __future__ import annotations

from . import _quiet  # noqa: F401  (first: quiets optional-kernel notes of the imports below)
from . import methods as _methods  # noqa: F401  (registers the built-in methods)
from .core.adapter import Adapter, AdapterShapeError, ModulesToSave
from .core.apply import adapters, apply, config_of, disabled, merge, trainable_parameters, unwrap
from .core.config import AdapterConfig, DoRAConfig, LoRAConfig
from .core.registry import INITIALIZERS, METHODS, Registry
from .core.mixed import mixed_batch
from .core.multi import add_adapter, delete_adapter, set_adapter
from .core.named import active_adapters, adapter_names
from .core.state import AdapterState
from .formats.peft import AdapterFileError, hotswap_adapter, load_peft, load_state, save_peft, save_state
from .methods.dylora import truncate
from . import init  # noqa: F401  (registers the initialisers)
from . import compress  # noqa: F401  (registers the quantised layer kinds)
from .init import convert_to_plain_lora, initialize
from .optim import OPTIMIZERS
from .generate import GENERATORS

__version__ = "0.1.0"

__all__ = [
    "Adapter", "AdapterConfig", "AdapterFileError", "AdapterShapeError", "AdapterState", "DoRAConfig",
    "GENERATORS", "INITIALIZERS", "LoRAConfig", "METHODS", "ModulesToSave", "OPTIMIZERS", "Registry",
    "active_adapters", "adapter_names", "adapters", "add_adapter", "apply", "config_of", "convert_to_plain_lora",
    "delete_adapter", "disabled", "hotswap_adapter", "initialize", "load_peft", "load_state", "merge",
    "mixed_batch", "save_peft", "save_state", "set_adapter", "trainable_parameters", "truncate", "unwrap",
]
