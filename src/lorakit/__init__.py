"""lorakit: low-rank adapters for PyTorch and Hugging Face models, in PEFT's format."""
from __future__ import annotations

from . import methods as _methods  # noqa: F401  (registers the built-in methods)
from .core.adapter import Adapter, AdapterShapeError, ModulesToSave
from .core.apply import adapters, apply, config_of, disabled, merge, trainable_parameters, unwrap
from .core.config import AdapterConfig, DoRAConfig, LoRAConfig
from .core.registry import INITIALIZERS, METHODS, Registry
from .core.state import AdapterState
from .formats.peft import AdapterFileError, load_peft, load_state, save_peft, save_state
from .methods.dylora import truncate
from . import init  # noqa: F401  (registers the initialisers)
from . import compress  # noqa: F401  (registers the quantised layer kinds)
from .init import convert_to_plain_lora, initialize
from .optim import OPTIMIZERS
from .generate import GENERATORS

__version__ = "0.1.0"

__all__ = [
    "Adapter", "AdapterConfig", "AdapterFileError", "AdapterShapeError", "AdapterState", "DoRAConfig",
    "GENERATORS", "INITIALIZERS", "LoRAConfig", "METHODS", "OPTIMIZERS", "ModulesToSave", "Registry", "adapters", "apply", "config_of",
    "convert_to_plain_lora", "disabled", "initialize", "load_peft", "load_state", "merge", "save_peft", "save_state",
    "trainable_parameters", "truncate", "unwrap",
]
