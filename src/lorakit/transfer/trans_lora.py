"""Trans-LoRA: move a task adapter to another base model with synthetic data only.

Paper: "Trans-LoRA: towards data-free Transferable Parameter Efficient Finetuning" (Wang et al., NeurIPS 2024,
arXiv 2405.17258). Steps: (1) a generator proposes task inputs from about 5 seed examples; (2) a discriminator
trained to tell real inputs from synthetic ones (3) keeps the synthetic inputs it judges real-like; (4) the source
base with the source adapter (the teacher) labels them; (5) a fresh adapter on the target base (any registered
method: LoRA, DoRA, ...) is distilled into the teacher's outputs. No task data other than the seeds is read.

Scope and deviations (see also `generators`, `discriminator`, `distill`):
- Classification adapters (task_type SEQ_CLS): the head is part of the adapter (`modules_to_save`), the teacher
  gives soft labels and the student matches them by KL (the paper's tasks are generative; see `distill`).
- Causal-LM adapters (task_type CAUSAL_LM) follow the paper: greedy teacher completions of the kept prompts, LM
  loss on them (`causal`). Other task types are refused.
- The seeds are kept in the distillation set with the teacher's soft labels (they are the only real inputs).
- The kept synthetic inputs are drawn at random among those the discriminator passes (rejection sampling, as
  the paper), up to `num_synthetic`; fewer than `min_synthetic` is an error, not a silent small transfer.
- The target adapter takes the source adapter's rank, alpha and target modules unless the config names others.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..core.apply import apply, config_of
from .causal import complete, completion_data, prompt_features
from .discriminator import judge
from .distill import SoftLabelled, distill, kl_to_teacher, teacher_outputs


@dataclass(frozen=True)
class TransLoRAConfig:
    """Settings of one transfer; r / lora_alpha / target_modules None take the source adapter's."""

    num_synthetic: int = 500
    candidates: int = 2000
    min_synthetic: int = 32
    target_method: str = "lora"
    r: Optional[int] = None
    lora_alpha: Optional[float] = None
    target_modules: Optional[list] = None
    filter: bool = True
    keep_fraction: float = 0.5
    threshold: Optional[float] = None
    l2: float = 1.0
    folds: int = 5
    temperature: float = 1.0
    max_new_tokens: int = 32  # causal LM: length of the teacher's completions
    lr: float = 1e-3
    epochs: int = 2
    batch_size: int = 16
    max_length: int = 64
    seed: int = 0
    progress: bool = True


def target_config(source, config: TransLoRAConfig, base_model: Optional[str], kind: str = "classification"):
    """The target adapter's config: the source's rank, alpha and targets unless `config` overrides them."""
    from ..jobs import method_config

    alpha = config.lora_alpha if config.lora_alpha is not None else getattr(source, "lora_alpha", 8)
    targets = config.target_modules or source.target_modules
    return method_config(config.target_method, config.r or source.r, alpha, 0.0, targets, kind, base_model=base_model)


def check_pair(teacher, student) -> str:
    """The kind of transfer ("classification" or "causal_lm"); a clear error when the two models do not fit it."""
    source = config_of(teacher)
    if source.task_type == "CAUSAL_LM":
        if student.get_output_embeddings() is None:
            raise ValueError(f"the source adapter is a causal-LM adapter; the target {type(student).__name__} has no "
                             "language-model head: load the target with task='causal_lm'")
        return "causal_lm"
    if source.task_type != "SEQ_CLS":
        raise NotImplementedError(f"trans_lora transfers classification (SEQ_CLS) and causal-LM (CAUSAL_LM) "
                                  f"adapters; the source adapter has task_type {source.task_type!r}")
    n_source, n_target = teacher.config.num_labels, student.config.num_labels
    if n_source != n_target or student.get_output_embeddings() is not None:
        raise ValueError(f"the source adapter's head predicts {n_source} classes, the target model "
                         f"{'is a language model' if student.get_output_embeddings() is not None else n_target}: "
                         "load the target as a classifier with the task's number of labels")
    return "classification"


def trans_lora(teacher, teacher_tokenizer, student, student_tokenizer, seeds: Sequence[str], generator,
               config: TransLoRAConfig = TransLoRAConfig(), real: Sequence[str] = (),
               log: Callable[[str], None] = lambda message: None) -> dict:
    """Distil `teacher` (a base with its adapter) into a new adapter applied to `student`; returns the record.

    `seeds` are the real task inputs (their labels are not needed); `real` adds real unlabeled inputs that the
    discriminator may also learn from. `generator.propose(seeds, n, seed)` gives the candidates; `log` hears
    one line per step.
    """
    kind = check_pair(teacher, student)
    seeds = list(seeds)
    if len(seeds) < 2:
        raise ValueError(f"trans_lora needs at least 2 seed examples, got {len(seeds)}")
    log(f"proposing {config.candidates} inputs from {len(seeds)} seeds ({generator.describe()})")
    candidates = generator.propose(seeds, config.candidates, config.seed)
    if len(candidates) < 2:
        raise ValueError(f"the generator ({generator.describe()}) proposed {len(candidates)} distinct inputs")
    log(f"reading {len(candidates)} distinct proposals with the source model and its adapter")
    if kind == "classification":
        probs, feats = teacher_outputs(teacher, teacher_tokenizer, candidates, config.max_length,
                                       temperature=config.temperature)
        seed_probs, seed_feats = teacher_outputs(teacher, teacher_tokenizer, seeds + list(real), config.max_length,
                                                 temperature=config.temperature)
    else:
        feats = prompt_features(teacher, teacher_tokenizer, candidates, config.max_length)
        seed_feats = prompt_features(teacher, teacher_tokenizer, seeds + list(real), config.max_length)
    if config.filter:
        verdict = judge(seed_feats, feats, l2=config.l2, folds=config.folds, keep_fraction=config.keep_fraction,
                        threshold=config.threshold, seed=config.seed)
        passed, p_real = verdict.keep.nonzero().flatten().tolist(), verdict.p_real
    else:
        passed, p_real = list(range(len(candidates))), None
    if len(passed) < config.min_synthetic:
        raise ValueError(f"the discriminator kept {len(passed)} of {len(candidates)} synthetic inputs, fewer than "
                         f"min_synthetic={config.min_synthetic}: propose more candidates, or use a generator whose "
                         f"inputs look more like the seeds ({generator.describe()})")
    log(f"the discriminator kept {len(passed)} of {len(candidates)}" if config.filter else "no filter: all kept")
    kept = sorted(random.Random(config.seed).sample(passed, min(config.num_synthetic, len(passed))))
    texts = [candidates[i] for i in kept] + seeds
    torch.manual_seed(config.seed)  # the target adapter's initial weights follow the seed
    apply(student, target_config(config_of(teacher), config, getattr(student.config, "_name_or_path", None), kind))
    record = {"generator": generator.describe(), "kind": kind, "seeds": len(seeds), "real_unlabeled": len(real),
              "candidates": len(candidates), "passed_filter": len(passed), "distilled_on": len(texts),
              "filter": config.filter,
              "mean_p_real": None if p_real is None else {"kept": round(float(p_real[passed].mean()), 4),
                                                          "all": round(float(p_real.mean()), 4)},
              "synthetic_inputs": texts[: len(kept)]}
    train = dict(lr=config.lr, epochs=config.epochs, batch_size=config.batch_size, seed=config.seed,
                 progress=config.progress)
    if kind == "classification":
        soft = torch.cat([probs[kept], seed_probs[: len(seeds)]])
        data = SoftLabelled(texts, soft, student_tokenizer, config.max_length)
        before = kl_to_teacher(student, data, temperature=config.temperature)
        log(f"distilling a {config.target_method} adapter on {len(texts)} inputs ({config.epochs} epochs)")
        result = distill(student, data, temperature=config.temperature, **train)
        record.update(teacher_class_shares=[round(float(v), 4) for v in soft.mean(0)], kl_before=round(before, 5),
                      kl_after=round(kl_to_teacher(student, data, temperature=config.temperature), 5))
    else:
        from ..train import evaluate, fit

        log(f"completing {len(texts)} prompts with the source model (greedy, {config.max_new_tokens} new tokens)")
        data = completion_data(texts, complete(teacher, teacher_tokenizer, texts, config.max_new_tokens),
                               student_tokenizer, config.max_length)
        before = evaluate(student, data)["loss"]
        log(f"training a {config.target_method} adapter on {len(texts)} teacher completions ({config.epochs} epochs)")
        result = fit(student, data, None, **train)
        record.update(lm_loss_before=round(before, 5), lm_loss_after=round(evaluate(student, data)["loss"], 5))
    record.update(steps=result.steps, wall_time_s=round(result.wall_time, 1), config=dataclasses.asdict(config))
    return record
