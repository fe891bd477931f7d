"""`fit`: a registered optimiser (AdamW by default) on the parameters that require grad, with warm-up + schedule, accumulation, clipping,
periodic evaluation, JSON-lines metrics, atomic checkpoints with exact resume, and torchrun data parallelism.

Data order: each epoch is a permutation drawn from (seed, epoch) by `DistributedSampler`, which also shards it
over processes (process r takes every world_size-th index from r). With world_size processes and batch_size b
per process, an optimiser step sees the same examples as one process with batch size world_size * b.
Every process evaluates the whole eval set (no communication; all return the same metrics); rank 0 alone writes
files and draws the progress bar.

The loss of a micro-batch is the model's own mean. Accumulation and data parallelism average micro-batches with
equal weight, which equals the big-batch mean for classification; for causal LM with uneven completion lengths
it weights micro-batches, not tokens.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data.distributed import DistributedSampler

from .. import optim
from . import checkpoint, distributed, precision
from .config import TrainConfig, TrainResult
from .evaluate import MetricFn, collate_for, evaluate, to_device
from .metrics_log import MetricsLog
from .schedule import lr_multiplier, warmup_count

Callback = Callable[[int, dict], None]
LossFn = Callable[[torch.nn.Module, dict], torch.Tensor]


def model_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The default training loss: the model's own ``.loss`` on the batch."""
    return model(**batch).loss


def epoch_groups(sampler: DistributedSampler, epoch: int, cfg: TrainConfig) -> list[list[list[int]]]:
    """This process's indices for ``epoch``: optimiser steps of micro-batches of indices."""
    sampler.set_epoch(epoch)
    indices, b, k = list(sampler), cfg.batch_size, cfg.grad_accum_steps
    micro = [indices[i : i + b] for i in range(0, len(indices), b)]
    return [micro[i : i + k] for i in range(0, len(micro), k)]


class _Run:
    """The state of one `fit` call."""

    def __init__(self, model, train_data, eval_data, cfg: TrainConfig, procs, metric_fn, collate_fn, callbacks, loss_fn,
                 schedule=None):
        if (cfg.save_every or cfg.resume is True) and not cfg.output_dir:
            raise ValueError("save_every and resume=True need output_dir (where checkpoints live)")
        if len(train_data) == 0:
            raise ValueError("fit got an empty training set")
        self.model, self.train_data, self.eval_data, self.cfg, self.procs = model, train_data, eval_data, cfg, procs
        self.metric_fn, self.callbacks, self.loss_fn = metric_fn, callbacks, loss_fn or model_loss
        self.collate, self.eval_collate = collate_for(train_data, collate_fn), collate_fn
        checkpoint.seed_everything(cfg.seed + procs.rank)
        self.schedule = schedule
        if schedule is not None and procs.world_size > 1:
            raise ValueError("schedules (lisa, increlora, diffora) change what trains and run in one process only; "
                             "launch without torchrun")
        if schedule is not None:
            schedule.prepare(model)  # before the optimiser, which holds what the schedule may train
        # the optimiser decides what trains: some freeze parameters they do not step (lora_fa freezes A)
        self.optimizer = optim.create(cfg.optimizer, model, cfg.lr, cfg.weight_decay, **cfg.optimizer_options)
        self._refresh_named()
        self.device = next(iter(self.named.values())).device
        precision.check_precision(cfg.precision, self.device)
        self.scaler = precision.grad_scaler(cfg.precision, self.device)
        if cfg.gradient_checkpointing:
            precision.enable_gradient_checkpointing(model, cfg.gradient_checkpointing)
        self.sampler = DistributedSampler(
            train_data, num_replicas=procs.world_size, rank=procs.rank, shuffle=True, seed=cfg.seed
        )
        micro_batches = math.ceil(len(self.sampler) / cfg.batch_size)
        self.steps_per_epoch = math.ceil(micro_batches / cfg.grad_accum_steps)
        self.total = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        warmup = warmup_count(self.total, cfg.warmup_ratio, cfg.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_multiplier(cfg.schedule, warmup, self.total))
        self.step = self.epoch = self.step_in_epoch = 0
        self.history, self.window, self.elapsed_before, self.rng = [], [], 0.0, None
        path = checkpoint.resolve(cfg.resume, cfg.output_dir)
        if path is not None:
            self._restore(path)
        self.ddp = distributed.wrap(model, procs)

    def _refresh_named(self) -> None:
        """The parameters the optimiser holds, by name (what checkpoints save and clipping sees)."""
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        self.named = {n: p for n, p in self.model.named_parameters() if id(p) in held}

    def _restore(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state["world_size"] != self.procs.world_size:
            raise ValueError(
                f"{path} was written by {state['world_size']} processes, this run has {self.procs.world_size}; "
                "resume with the same number of processes"
            )
        if self.schedule is not None:  # may reshape the model (IncreLoRA) before its tensors are loaded
            self.schedule.load_state_dict(state["schedule"], self.model, self.optimizer)
            self._refresh_named()
        checkpoint.load_trainable(self.named, state["trainable"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self.history, self.window, self.elapsed_before = state["history"], state["window"], state["elapsed"]
        self.rng = state["rng"][self.procs.rank]

    def _save(self, history: list[dict], elapsed: float) -> None:
        rngs = distributed.gather(checkpoint.rng_state(), self.procs)  # collective: every process calls it
        if not self.procs.is_main:
            return
        state = {
            "step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "trainable": {n: p.detach().cpu().clone() for n, p in self.named.items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": rngs, "world_size": self.procs.world_size, "history": history, "window": self.window,
            "elapsed": elapsed, "config": dataclasses.asdict(self.cfg),
            "schedule": self.schedule.state_dict() if self.schedule is not None else None,
        }
        checkpoint.atomic_save(state, checkpoint.checkpoint_path(self.cfg.output_dir, self.step))

    def _epoch_groups(self) -> list[list[list[int]]]:
        return epoch_groups(self.sampler, self.epoch, self.cfg)

    def _train_step(self, group: list[list[int]]) -> tuple[float, float]:
        losses = []
        if self.schedule is not None:
            self.schedule.step_begin(self.step, self.model, self.optimizer)
        for i, indices in enumerate(group):
            batch = to_device(self.collate([self.train_data[j] for j in indices]), self.device)
            # DDP all-reduces gradients on every backward unless told not to; only the last micro-batch syncs.
            last = i == len(group) - 1
            with self.ddp.no_sync() if self.procs.world_size > 1 and not last else nullcontext():
                with precision.autocast(self.cfg.precision, self.device):
                    loss = self.loss_fn(self.ddp, batch)
                scaled = loss.float() / len(group)
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            losses.append(loss.detach().float().item())
        if self.schedule is not None:
            self.schedule.before_optimizer_step(self.step, self.model, self.optimizer)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(self.named.values()), self.cfg.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        if self.scaler:  # skips the step when the fp16 gradients overflowed, then adapts the scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.schedule is not None and self.schedule.step_end(self.step, self.model, self.optimizer):
            self._refresh_named()
        return sum(losses) / len(losses), lr

    def _evaluate(self) -> dict[str, float]:
        return evaluate(
            self.model, self.eval_data, batch_size=self.cfg.eval_batch_size or self.cfg.batch_size,
            collate_fn=self.eval_collate, metric_fn=self.metric_fn,
        )

    def run(self) -> TrainResult:
        cfg, start = self.cfg, time.perf_counter()
        log = MetricsLog(
            cfg.output_dir, main=self.procs.is_main, total=self.total, done=self.step,
            progress=cfg.progress, history=self.history,
        )
        final_eval = None
        if self.rng is not None:
            checkpoint.set_rng_state(self.rng)
        self.model.train()
        try:
            while self.step < self.total:
                groups = self._epoch_groups()
                while self.step_in_epoch < len(groups) and self.step < self.total:
                    loss, lr = self._train_step(groups[self.step_in_epoch])
                    self.step, self.step_in_epoch = self.step + 1, self.step_in_epoch + 1
                    self.window.append(loss)
                    log.advance()
                    last, entry = self.step == self.total, {}
                    if self.step % cfg.log_every == 0 or last:
                        mean_loss = distributed.mean(sum(self.window) / len(self.window), self.procs)
                        entry.update(epoch=self.epoch, loss=mean_loss, lr=lr)
                        self.window = []
                    if self.eval_data is not None and (last or (cfg.eval_every and self.step % cfg.eval_every == 0)):
                        metrics = self._evaluate()
                        final_eval = metrics if last else None
                        entry.update({f"eval_{k}": v for k, v in metrics.items()})
                    elapsed = self.elapsed_before + time.perf_counter() - start
                    if entry:
                        log.record({"step": self.step, **entry, "elapsed": round(elapsed, 3)})
                    if cfg.save_every and (self.step % cfg.save_every == 0 or last):
                        self._save(log.history, elapsed)
                    for callback in self.callbacks:
                        callback(self.step, entry)
                if self.step_in_epoch >= len(groups):
                    self.epoch, self.step_in_epoch = self.epoch + 1, 0
            if self.schedule is not None:
                self.schedule.finish(self.model, self.optimizer)
                self._refresh_named()
        finally:
            log.close()
        if self.eval_data is not None and final_eval is None:
            final_eval = self._evaluate()
        return TrainResult(
            history=log.history,
            eval_metrics=final_eval or {},
            wall_time=time.perf_counter() - start,
            trainable_params=sum(p.numel() for p in self.named.values()),
            steps=self.step,
            output_dir=cfg.output_dir,
        )


def fit(
    model: torch.nn.Module,
    train_data: Sequence,
    eval_data: Sequence | None = None,
    *,
    config: TrainConfig | None = None,
    metric_fn: MetricFn | None = None,
    collate_fn: Callable | None = None,
    callbacks: Sequence[Callback] = (),
    loss_fn: LossFn | None = None,
    adapter_schedule=None,
    **overrides,
) -> TrainResult:
    """Train the parameters of `model` that require grad; `overrides` replace fields of `config`.

    The model must return an output with `.loss` when called with a collated batch (Hugging Face style);
    `callbacks` are called as cb(step, record) after every optimiser step. `loss_fn(model, batch)` replaces the
    training loss (default: `model(**batch).loss`), e.g. to add a router's auxiliary loss; evaluation is unchanged.
    `adapter_schedule` (a `lorakit.train.schedules.Schedule`, e.g. LISA) changes what trains while training
    (``schedule``, a field of `TrainConfig`, is the learning-rate schedule).
    """
    unknown = sorted(set(overrides) - set(TrainConfig.field_names()))
    if unknown:
        raise TypeError(f"unknown training options {unknown}; TrainConfig fields are {TrainConfig.field_names()}")
    cfg = dataclasses.replace(config or TrainConfig(), **overrides)
    procs = distributed.setup(next(model.parameters()).device)
    try:
        return _Run(model, train_data, eval_data, cfg, procs, metric_fn, collate_fn, callbacks, loss_fn, adapter_schedule).run()
    finally:
        distributed.teardown(procs)
