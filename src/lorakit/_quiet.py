"""Silence third-party import-time notes about optional kernels that cannot load on this machine.

Importing transformers (or diffusers) imports torchao and bitsandbytes when they are installed; on a CPU machine they log, on
every import, that CUDA extensions or a kernels-community download failed, and torch logs a deprecation about
torchao's pytree registrations. None of it concerns the user of lorakit. Only loggers whose level nobody set are
raised to ERROR, so a user who configured them keeps what they chose.
"""
from __future__ import annotations

import logging

NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops",
                 "diffusers.quantizers.torchao.torchao_quantizer")


def quiet_optional_kernels() -> None:
    """Raise each logger in NOISY_LOGGERS to ERROR unless its level was set already."""
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.ERROR)


quiet_optional_kernels()
