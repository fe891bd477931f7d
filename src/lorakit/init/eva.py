"""EVA: One Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation (Paischer et al., arXiv:2410.07170).

Init rule: A_l = the top r_l right-singular vectors (principal components) of layer l's input activations,
from an incremental SVD over calibration batches; B_l = 0, so the output and the base weight are unchanged.
Ranks are redistributed: every layer computes ρ·r candidate components, the budget Σ_l r_l goes to the
components with the largest explained-variance ratio across all layers, and a layer's rank is its count
(rank 0: no adapter). With ``adjust_scaling_factors``, α_l = α·r_l/r keeps s = α/r. A layer stops taking
batches once the cosine similarity of each of its first r_l components to the previous batch's is >= τ;
calibration cycles over the batches until every layer has converged. Each call of a layer is one step of its
SVD (a layer called twice per forward takes two per batch; one a batch skips takes none), as in PEFT. Layers
that receive identical inputs (q/k/v) share one SVD. The redistributed ranks and alphas go into
``rank_pattern``/``alpha_pattern`` under full module names (entries that differ from r and lora_alpha), and
``target_modules`` lists the adapted modules, as PEFT's ``initialize_lora_eva_weights`` writes them.

Follows PEFT's ``peft/tuners/lora/eva.py`` (0.21.2), itself from ml-jku/EVA, down to its ranking (the same
argsort over candidates in its order, then the swap that gives a group's representative the larger count).
Deviations: the SVD state is fp64 (PEFT's is fp32; components agree to cosine 0.999); calibration stops
with an error after ``max_passes`` passes over the batches without convergence, where PEFT cycles for ever; the token mask is applied to any layer whose input is
[batch, seq, features], other inputs use all their rows.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from ..core.apply import adapters, apply, config_of, unwrap
from ..core.registry import INITIALIZERS
from .calibration import Calibration, layer_inputs
from .initializer import Initializer, lora_pairs, set_factors
from .ipca import IncrementalPCA


@dataclass(frozen=True)
class EvaConfig:
    """EVA settings: PEFT's ``EvaConfig`` fields and defaults, plus ``max_passes``."""

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True
    max_passes: int = 50  # passes over the calibration batches before giving up

    def __post_init__(self) -> None:
        if self.rho < 1.0:
            raise ValueError(f"EvaConfig.rho must be >= 1.0, found {self.rho}")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"EvaConfig.tau must be in [0, 1], found {self.tau}")


def group_equal_inputs(rows: dict[str, torch.Tensor]) -> dict[str, str]:
    """Each layer's representative: the first layer (in order) whose first input on the first batch is identical."""
    rep: dict[str, str] = {}
    for path, x in rows.items():
        same = [q for q in rep if rep[q] == q and rows[q].shape == x.shape and torch.equal(rows[q], x)]
        rep[path] = same[0] if same else path
    return rep


def rank_distribution(ratios: dict[str, torch.Tensor], rep: dict[str, str], max_components: dict[str, int], budget: int) -> dict[str, int]:
    """Ranks per layer: the ``budget`` largest explained-variance ratios over all layers' candidates.

    As peft: candidates listed representatives first, then the other layers group by group; its argsort; then a
    representative takes the larger count from any layer of its group (its SVD is the one checked)."""
    groups = list(dict.fromkeys(rep.values()))
    order = groups + [p for g in groups for p in rep if rep[p] == g and p != g]
    owners = [p for p in order for _ in range(min(max_components[p], len(ratios[rep[p]])))]
    values = torch.cat([ratios[rep[p]][: max_components[p]] for p in order])
    counts = dict.fromkeys(rep, 0)
    for i in values.argsort(descending=True)[:budget].tolist():
        counts[owners[i]] += 1
    for p in order[len(groups):]:
        if counts[rep[p]] < counts[p]:
            counts[rep[p]], counts[p] = counts[p], counts[rep[p]]
    return counts


def eva_components(model, layers: dict[str, torch.nn.Module], ranks: dict[str, int], calibration: Calibration,
                   settings: EvaConfig) -> dict[str, torch.Tensor]:
    """Per layer, the components [r_l, in] EVA assigns (r_l after redistribution; may be 0)."""
    rho = settings.rho
    if rho > 1000:  # as PEFT: cap absurd rho at what the largest dimension allows
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // max(ranks.values()))
    mask_value = settings.label_mask_value if settings.use_label_mask else None
    first = layer_inputs(model, layers, calibration.batches[0], calibration, mask_value, per_call=True)
    silent = [p for p in layers if p not in first]
    if silent:
        raise ValueError(f"EVA: the first calibration batch never reaches {', '.join(silent[:6])}; "
                         "check forward_fn, or leave these modules out of target_modules")
    rep = group_equal_inputs({p: first[p][0] for p in layers})
    size: dict[str, int] = {}  # layers sharing an SVD share its size: the largest they ask for
    for p in rep:
        size[rep[p]] = max(size.get(rep[p], 0), round(ranks[p] * rho))
    max_components = {p: size[rep[p]] for p in rep}
    reps = [p for p in rep if rep[p] == p]
    pca = {p: IncrementalPCA(max_components[p]) for p in reps}
    converged = {p: torch.zeros(max_components[p], dtype=torch.bool) for p in reps}
    dist = dict(max_components)
    limit = settings.max_passes * len(calibration.batches)
    for step in range(limit + 1):
        needed = [p for p in reps if not bool(converged[p][: dist[p]].all())]
        if not needed:
            break
        if step == limit:
            raise ValueError(
                f"EVA did not converge in {settings.max_passes} passes over {len(calibration.batches)} batches "
                f"(tau={settings.tau}); unconverged: {', '.join(needed[:6])}. Pass more or larger batches, lower "
                "tau, or raise EvaConfig.max_passes"
            )
        batch = calibration.batches[step % len(calibration.batches)]
        calls = first if step == 0 else layer_inputs(model, {p: layers[p] for p in needed}, batch, calibration,
                                                     mask_value, per_call=True)
        for p in needed:
            for rows in calls.get(p, []):  # as peft: each call of the layer is one incremental step
                if rows.shape[0] < max_components[p]:
                    continue  # fewer tokens than components: skip this call for this layer, as peft
                previous = pca[p].components
                pca[p].partial_fit(rows)
                if previous is not None:
                    sim = torch.nn.functional.cosine_similarity(pca[p].components, previous, dim=1)
                    converged[p] = (sim >= settings.tau).cpu()
        if all(pca[p].fitted for p in reps):
            dist = rank_distribution({p: pca[p].explained_variance_ratio for p in reps}, rep, max_components,
                                     sum(ranks.values()))
    out = {}
    for path in layers:
        r, source = dist[path], pca[rep[path]]
        u = source.components[:r].clone()
        if settings.whiten:
            u = u / source.singular_values[:r].sqrt()[:, None]
        out[path] = u
    return out


@INITIALIZERS.register()
class EVA(Initializer):
    """A from the principal components of each layer's inputs, B = 0, ranks redistributed by explained variance."""

    name = "eva"
    needs_data = True
    settings_class = EvaConfig

    @classmethod
    def run(cls, model, calibration=None, settings=None):
        settings = settings or EvaConfig()
        config = config_of(model)
        pairs = lora_pairs(model, cls.name)
        ranks = {p: config.for_module(p).r for p in pairs}
        components = eva_components(model, {p: a.base_layer for p, a in pairs.items()}, ranks, calibration, settings)
        new_config = redistributed_config(config, list(adapters(model)), components, settings)
        unwrap(model)
        apply(model, new_config)
        fresh = adapters(model)
        for path, u in components.items():
            if u.shape[0]:
                b = torch.zeros(fresh[path].adapter_tensors()["lora_B.weight"].shape)
                set_factors(fresh[path], u, b, subtract=False, init_name=cls.name)
        return model


def redistributed_config(config, paths: list[str], components: dict[str, torch.Tensor], settings: EvaConfig):
    """The config after redistribution: full-name rank/alpha patterns and the adapted modules as targets."""
    rank_pattern, alpha_pattern, targets = {}, {}, []
    for path in paths:
        module = config.for_module(path)
        r, alpha = module.r, module.lora_alpha
        new_r = components[path].shape[0] if path in components else r
        if new_r == 0:
            continue
        if new_r != r and settings.adjust_scaling_factors:
            alpha *= new_r / r
        targets.append(path)
        if new_r != config.r:
            rank_pattern[path] = new_r
        if alpha != config.lora_alpha:
            alpha_pattern[path] = alpha
    return dataclasses.replace(config, target_modules=targets, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
