"""What a multi-job run is made of: `Job`, `JobResult`, the checks that refuse a job before it trains, and the
base model's dropout (which no shared pass can reproduce per job)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

from torch import nn

from ..core.config import LoRAConfig
from .config import TrainConfig, TrainResult


class JobError(ValueError):
    """A job that cannot run: names the job and the field."""


class JobStopped(Exception):
    """One job's failure (non-finite loss, bad data); the other jobs go on."""


@dataclass
class Job:
    """One LoRA job: its adapter config, training data, `TrainConfig` and optional evaluation data."""

    name: str
    adapter: LoRAConfig
    train_data: Sequence
    config: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval_data: Optional[Sequence] = None


@dataclass
class JobResult(TrainResult):
    """`TrainResult` plus the job's name, ``status`` ("done", "failed", "stopped") and the failure, if any."""

    name: str = ""
    status: str = "running"
    error: Optional[str] = None


def check_job(job: Job) -> None:
    """Refuse what multi-job training cannot reproduce exactly, before anything trains."""
    a, c = job.adapter, job.config

    def bad(field: str, message: str):
        raise JobError(f"job '{job.name}': field '{field}': {message}")

    if type(a) is not LoRAConfig:
        bad("method", f"multi-job training runs plain LoRA; found {a.method_name}: train it with `lorakit train`")
    if a.lora_dropout:
        bad("dropout", f"{a.lora_dropout}: dropout draws random masks per job, which one shared pass cannot "
                       "reproduce; use 0")
    if a.init_lora_weights not in (True, "gaussian"):
        bad("init_lora_weights", f"{a.init_lora_weights!r}: initialisers that read or change the base are "
                                 "not supported; use True or 'gaussian'")
    if a.bias != "none" or a.rank_pattern or a.alpha_pattern or a.use_dora:
        bad("bias" if a.bias != "none" else "use_dora" if a.use_dora else "rank_pattern",
            "trained biases, DoRA and per-module ranks are not supported in multi-job training")
    if c.precision != "fp32" or c.gradient_checkpointing:
        bad("precision", "multi-job training runs in fp32 without gradient checkpointing")
    if c.optimizer != "adamw":
        bad("optimizer", f"{c.optimizer!r}: multi-job training uses adamw")
    if (c.save_every or c.resume is True) and not c.output_dir:
        bad("output_dir", "save_every and resume=True need output_dir (where checkpoints live)")
    if len(job.train_data) == 0:
        bad("train_data", "empty training set")


def base_dropout(model: nn.Module, disable: bool = False) -> list[str]:
    """The base's active dropout (nn.Dropout modules and attention-kernel rates); ``disable`` sets them to 0."""
    found = []
    for path, m in model.named_modules():
        names = (["p"] if isinstance(m, nn.Dropout) else []) + ["attention_dropout", "dropout_prob"]
        for attr in names:
            value = m.__dict__.get(attr)
            if isinstance(value, float) and value > 0:
                if disable:
                    setattr(m, attr, 0.0)
                else:
                    found.append(f"{path or type(model).__name__}.{attr}={value}")
    return found
