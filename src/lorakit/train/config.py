"""`TrainConfig` (what `fit` does) and `TrainResult` (what it returns)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .checkpointing import checkpoint_mode

SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one `fit` run; `batch_size` is per process and per micro-batch."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 8
    epochs: int = 1
    max_steps: int | None = None  # optimiser steps; overrides epochs when set
    warmup_ratio: float = 0.05
    warmup_steps: int | None = None  # overrides warmup_ratio when set
    schedule: str = "cosine"
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0
    eval_every: int | None = None  # steps; the end of training is always evaluated when eval data is given
    eval_batch_size: int | None = None  # defaults to batch_size
    save_every: int | None = None  # steps; needs output_dir; the last step is saved too
    output_dir: str | None = None
    seed: int = 0
    log_every: int = 10
    resume: bool | str = False  # True: latest checkpoint in output_dir (start fresh if none); str: that file
    progress: bool = True
    optimizer: str = "adamw"  # a name in lorakit.OPTIMIZERS
    optimizer_options: dict = field(default_factory=dict)  # e.g. {"lr_ratio": 16} for lora_plus
    precision: str = "fp32"  # "bf16" (autocast, CPU or CUDA) or "fp16" (CUDA, with loss scaling)
    gradient_checkpointing: bool | str = False  # Hugging Face models: True / "full" or "selective" (checkpointing.py)

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, not {self.schedule!r}")
        for name in ("batch_size", "epochs", "grad_accum_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every", "save_every", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be None or >= 1, got {value}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, not {self.precision!r}")
        checkpoint_mode(self.gradient_checkpointing)  # an unknown mode is refused here, before any training
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")

    @classmethod
    def field_names(cls) -> list[str]:
        """Names accepted as `fit(**overrides)`."""
        return [f.name for f in fields(cls)]


@dataclass
class TrainResult:
    """History of logged / evaluated steps, final eval metrics, this call's wall time and what was trained."""

    history: list[dict] = field(default_factory=list)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    wall_time: float = 0.0
    trainable_params: int = 0
    steps: int = 0
    output_dir: str | None = None
