"""Many LoRA jobs trained at once on one frozen base (LoRAFusion, Zhu et al., arXiv:2510.00206).

Each job has its own adapter (rank, targets, alpha), data, seed and `TrainConfig` (lr, steps, batch size,
schedule, clipping, checkpoints). One round is one optimiser step of every running job: the rows of all their
micro-batches are bin-packed by tokens into shared micro-batches (`multi_pack`), each run through the base
once, with every row's tokens routed to its job's adapter (`multi_kernel`, the per-job segment kernel, or
`multi_lora.BatchedLoRA`, the serving engine's operator with a backward); per-job losses are summed, so one
backward gives every job exactly its own gradient.

Exactness: a job's adapter equals what `fit` trains alone (seeded `apply`, then `fit`) from the same base,
seed and data: the same per-epoch order (`DistributedSampler`, seed), initial weights (`apply` under
``torch.manual_seed(seed)``), loss normalisation (the mean of each of its micro-batches, averaged over
accumulation) and optimiser, schedule and clipping per job. Only the floating-point order of sums differs.
Checkpoints are `fit`'s own files, keyed by the names `fit` uses, so either can resume the other's.

Deviations from the paper: LoRAFusion pipelines jobs across GPUs and solves a MILP for balanced micro-batches;
here one process cuts the length-sorted rows into micro-batches by dynamic programming (padded tokens plus a
per-micro-batch overhead). Jobs are plain LoRA on linear layers (plus
``modules_to_save`` heads, routed by row) in fp32 without dropout; anything else is refused, naming the job and
the field. A job whose loss or gradient norm is not finite, or whose data is malformed, stops alone; the others
continue unchanged.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from .. import optim
from ..core import fingerprint
from ..core.adapter import ModulesToSave
from ..core.apply import apply, config_of, trainable_parameters, unwrap, wrapped_modules
from ..data.encode import IGNORE_INDEX
from ..formats.peft import save_peft
from ..methods.lora import LoRALinear
from . import checkpoint
from .evaluate import collate_for, evaluate, to_device
from .loop import epoch_groups
from .metrics_log import MetricsLog
from .multi_jobs import Job, JobError, JobResult, JobStopped, base_dropout, check_job
from .multi_lora import JobAdapters, MultiLoRA, Routing
from .multi_pack import pack
from .schedule import lr_multiplier, warmup_count


class _JobRun:
    """The training state of one job: its adapters, optimiser, schedule, data position and log."""

    def __init__(self, job: Job, hooks: MultiLoRA):
        check_job(job)
        self.job, self.cfg, self.hooks = job, job.config, hooks
        model, cfg = hooks.model, job.config
        with hooks.detached(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # as `lorakit train`: the adapter's initial weights follow the seed
            apply(model, job.adapter)
            try:
                self.adapter_config = config_of(model)
                self.named = trainable_parameters(model)
                self.wrapped = wrapped_modules(model)
            finally:
                unwrap(model)
        layers = adapters_of(self.wrapped)
        for path, layer in layers.items():
            if type(layer) is not LoRALinear or not isinstance(layer.base_layer, nn.Linear):
                raise JobError(f"job '{job.name}': field 'targets': module '{path}' is a "
                               f"{type(layer.base_layer).__name__}; multi-job training adapts nn.Linear layers only")
        heads = {p: w.module for p, w in self.wrapped.items() if isinstance(w, ModulesToSave)}
        self.adapters = JobAdapters(job.name, layers, heads)
        self.optimizer = optim.create(cfg.optimizer, nn.ModuleList(self.wrapped.values()), cfg.lr, cfg.weight_decay)
        self.sampler = DistributedSampler(job.train_data, num_replicas=1, rank=0, shuffle=True, seed=cfg.seed)
        steps_per_epoch = math.ceil(math.ceil(len(self.sampler) / cfg.batch_size) / cfg.grad_accum_steps)
        self.total = cfg.max_steps or cfg.epochs * steps_per_epoch
        warmup = warmup_count(self.total, cfg.warmup_ratio, cfg.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_multiplier(cfg.schedule, warmup, self.total))
        self.step = self.epoch = self.step_in_epoch = 0
        self.history, self.window, self.elapsed_before, self.groups = [], [], 0.0, None
        self.result = JobResult(name=job.name, trainable_params=sum(p.numel() for p in self.named.values()),
                                output_dir=cfg.output_dir)
        path = checkpoint.resolve(cfg.resume, cfg.output_dir)
        if path is not None:
            self._restore(path)
        self.log: Optional[MetricsLog] = None  # opened at the first step: adding a job writes nothing
        self.start, self.loss = time.perf_counter(), 0.0

    @property
    def running(self) -> bool:
        return self.result.status == "running"

    def _restore(self, path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=False)
        checkpoint.load_trainable(self.named, state["trainable"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self.history, self.window, self.elapsed_before = state["history"], state["window"], state["elapsed"]

    def _save(self, elapsed: float) -> None:
        state = {  # `fit`'s checkpoint layout: `fit(resume=...)` continues this job alone, and the other way round
            "step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "trainable": {n: p.detach().cpu().clone() for n, p in self.named.items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "scaler": None,
            "rng": [checkpoint.rng_state()], "world_size": 1, "history": self.log.history, "window": self.window,
            "elapsed": elapsed, "config": dataclasses.asdict(self.cfg), "schedule": None,
        }
        checkpoint.atomic_save(state, checkpoint.checkpoint_path(self.cfg.output_dir, self.step))

    def next_rows(self, check: Callable) -> list[tuple]:
        """This step's examples as (run, features, loss normaliser); raises JobStopped on malformed data."""
        if self.log is None:
            self.log = MetricsLog(self.cfg.output_dir, main=True, total=self.total, done=self.step, progress=False,
                                  history=self.history)
        if self.groups is None:
            self.groups = epoch_groups(self.sampler, self.epoch, self.cfg)
        while self.step_in_epoch >= len(self.groups):  # as `fit`: a checkpoint may end exactly at an epoch's end
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self.groups = epoch_groups(self.sampler, self.epoch, self.cfg)
        group, rows = self.groups[self.step_in_epoch], []
        for micro in group:
            feats = []
            for i in micro:
                problem = check(self.job.train_data[i])
                if problem:
                    raise JobStopped(f"training example {i}: {problem}")
                feats.append(self.job.train_data[i])
            # `fit` averages each micro-batch's mean loss over the accumulation steps: one normaliser per micro-batch
            count = len(feats) if not isinstance(feats[0]["labels"], list) else sum(
                sum(1 for y in f["labels"][1:] if y != IGNORE_INDEX) for f in feats)
            if count == 0:
                raise JobStopped(f"a micro-batch of examples {micro} has no label to learn from")
            rows += [(self, f, float(count * len(group))) for f in feats]
        self.loss = 0.0
        return rows

    def fail(self, message: str) -> None:
        self.result.status, self.result.error = "failed", f"job '{self.job.name}' stopped at step {self.step + 1}: {message}"
        self.optimizer.zero_grad(set_to_none=True)

    def finish_step(self) -> None:
        """Clip, step the optimiser and schedule, log, evaluate and checkpoint as `fit` does."""
        cfg, params = self.cfg, list(self.named.values())
        if cfg.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if not torch.isfinite(norm):
                return self.fail(f"gradient norm is {norm.item()}")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step, self.step_in_epoch = self.step + 1, self.step_in_epoch + 1
        self.window.append(self.loss)
        self.log.advance()
        last, entry = self.step == self.total, {}
        if self.step % cfg.log_every == 0 or last:
            entry.update(epoch=self.epoch, loss=sum(self.window) / len(self.window), lr=lr)
            self.window = []
        if self.job.eval_data is not None and (last or (cfg.eval_every and self.step % cfg.eval_every == 0)):
            metrics = self.evaluate()
            self.result.eval_metrics = metrics if last else {}
            entry.update({f"eval_{k}": v for k, v in metrics.items()})
        elapsed = self.elapsed_before + time.perf_counter() - self.start
        if entry:
            self.log.record({"step": self.step, **entry, "elapsed": round(elapsed, 3)})
        if cfg.save_every and (self.step % cfg.save_every == 0 or last):
            self._save(elapsed)
        if last:
            self.result.status = "done"

    def evaluate(self, data: Optional[Sequence] = None, batch_size: Optional[int] = None) -> dict[str, float]:
        """`evaluate` on the model as this job alone sees it."""
        with self.hooks.only(self.adapters):
            return evaluate(self.hooks.model, self.job.eval_data if data is None else data,
                            batch_size=batch_size or self.cfg.eval_batch_size or self.cfg.batch_size)

    def close(self) -> JobResult:
        if self.log is not None:
            self.log.close()
            self.history = self.log.history
        r = self.result
        r.history, r.steps, r.wall_time = self.history, self.step, time.perf_counter() - self.start
        return r


def adapters_of(wrapped: dict) -> dict[str, nn.Module]:
    """The adapter layers (not the full copies) of a ``wrapped_modules`` dict."""
    return {p: m for p, m in wrapped.items() if not isinstance(m, ModulesToSave)}


class MultiTrainer:
    """Jobs that join (`add`) and leave (they finish, fail or are `stop`ped) while the others train; `step` runs one
    round, `run` runs rounds until no job is left. ``max_tokens``: padded tokens per shared micro-batch; ``backend``:
    "jobs" (`multi_kernel`) or one of the serving operator's (`multi_lora.BatchedLoRA`)."""

    def __init__(self, model: nn.Module, *, max_tokens: int = 1024, fused: bool = True, collate_fn=None,
                 disable_dropout: bool = False, backend: str = "jobs"):
        if wrapped_modules(model):
            raise ValueError("MultiTrainer takes the plain base model; unwrap(model) first")
        active = base_dropout(model, disable=disable_dropout)
        if active:
            raise ValueError(
                f"the base model trains with dropout ({active[0]} and {len(active) - 1} more): one shared pass cannot "
                "draw the masks each job's solo run would, so no job would equal its solo run; pass "
                "disable_dropout=True (lorakit train-many --no-base-dropout) to train every job without it")
        for p in model.parameters():
            p.requires_grad_(False)
        fingerprint.remember(model)
        self.hooks, self.max_tokens, self.collate_fn = MultiLoRA(model, fused, backend), max_tokens, collate_fn
        self.runs: dict[str, _JobRun] = {}
        self.results: dict[str, JobResult] = {}
        self.closed: dict[str, _JobRun] = {}
        emb = model.get_input_embeddings()
        self.vocab, self.num_labels = emb.num_embeddings, getattr(model.config, "num_labels", None)
        self.device = next(model.parameters()).device

    def add(self, job: Job) -> None:
        """Add a job; it takes its first step in the next round."""
        if job.name in self.runs or job.name in self.results:
            raise JobError(f"job '{job.name}': field 'name': another job has this name")
        run = _JobRun(job, self.hooks)
        self.hooks.watch(run.adapters)
        self.runs[job.name] = run
        if run.step >= run.total:  # resumed from its last checkpoint: nothing left to do
            run.result.status = "done"

    def stop(self, name: str) -> JobResult:
        """Take a job out now (its adapter keeps the steps taken so far)."""
        run = self.runs[name]
        if run.running:
            run.result.status = "stopped"
        return self._close(name)

    def _close(self, name: str) -> JobResult:
        self.closed[name] = self.runs.pop(name)
        self.results[name] = self.closed[name].close()
        return self.results[name]

    def check_example(self, f: dict) -> Optional[str]:
        """What is wrong with one encoded example for this base, or None."""
        ids, labels = f.get("input_ids"), f.get("labels")
        if not ids or not isinstance(ids, list) or len(f.get("attention_mask", ())) != len(ids):
            return "input_ids missing or empty, or attention_mask of another length"
        if not all(isinstance(i, int) and 0 <= i < self.vocab for i in ids):
            return f"a token id outside the vocabulary [0, {self.vocab})"
        if isinstance(labels, list):
            if len(labels) != len(ids) or not all(y == IGNORE_INDEX or 0 <= y < self.vocab for y in labels):
                return f"labels must match input_ids in length and hold token ids or {IGNORE_INDEX}"
        elif not isinstance(labels, int) or not 0 <= labels < (self.num_labels or 0):
            return f"label {labels!r} outside [0, {self.num_labels})"
        return None

    def step(self) -> bool:
        """One round: one optimiser step of every running job; True while jobs remain."""
        rows = []
        self.hooks.model.train()
        for run in list(self.runs.values()):
            if run.running:
                try:
                    rows += run.next_rows(self.check_example)
                except JobStopped as e:
                    run.fail(str(e))
        order = {name: i for i, name in enumerate(self.runs)}
        for micro in pack(rows, self.max_tokens, length=lambda row: len(row[1]["input_ids"])):
            micro.sort(key=lambda row: order[row[0].job.name])  # a job's rows adjacent: one slot each
            self._forward_backward(micro)
        for name, run in list(self.runs.items()):
            if run.running and any(row[0] is run for row in rows):
                run.finish_step()
            if not run.running:
                self._close(name)
        return bool(self.runs)

    def _forward_backward(self, rows: list[tuple]) -> None:
        runs = [r[0] for r in rows]
        collate = collate_for(runs[0].job.train_data, self.collate_fn)
        batch = to_device(collate([r[1] for r in rows]), self.device)
        routing = self.hooks.routing = Routing.build([r.adapters for r in runs], batch["attention_mask"])
        try:
            logits = self.hooks.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        finally:
            self.hooks.routing = None
        per_row = row_losses(logits, batch["labels"]) / torch.tensor([r[2] for r in rows], device=logits.device)
        total = None
        for _, a, b in routing.segments:
            run, part = runs[a], per_row[a:b].sum()
            if not run.running:
                continue
            if not torch.isfinite(part):
                run.fail(f"loss is {part.item()}")
                continue
            run.loss += part.item()
            total = part if total is None else total + part
        if total is not None:
            total.backward()

    def run(self) -> dict[str, JobResult]:
        """Train until every job has finished, failed or been stopped; results by job name."""
        while self.step():
            pass
        return dict(self.results)

    def base_record(self, name: str) -> dict:
        """The base model's fingerprint as job ``name``'s adapter sees it (the originals of its full copies left out)."""
        run, model = self.runs.get(name) or self.closed[name], self.hooks.model
        skip = frozenset(f"{p}.{k}" for p in run.adapters.heads for k, _ in model.get_submodule(p).named_parameters())
        return fingerprint.record(model, skip_values=skip)

    def save(self, name: str, path):
        """Write job ``name``'s adapter as a PEFT directory (with ``lorakit_base.json``), as `save_peft` does."""
        run = self.runs.get(name) or self.closed[name]
        model = self.hooks.model
        with self.hooks.detached(), torch.random.fork_rng(devices=[]):
            apply(model, run.adapter_config)
            try:
                for p, m in wrapped_modules(model).items():
                    m.load_adapter_tensors(run.wrapped[p].adapter_tensors())
                return save_peft(model, path)
            finally:
                unwrap(model)


def row_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy per row: of its label (classification) or of its next tokens (causal LM, -100 ignored)."""
    if labels.dim() == 1:
        return F.cross_entropy(logits.float(), labels, reduction="none")
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # as transformers' ForCausalLMLoss
    ce = F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return ce.view(labels.shape).sum(1)


def train_many(model: nn.Module, jobs: Sequence[Job], **options) -> dict[str, JobResult]:
    """Train ``jobs`` together on ``model`` (see `MultiTrainer`); results by job name."""
    trainer = MultiTrainer(model, **options)
    for job in jobs:
        trainer.add(job)
    return trainer.run()
