"""EVA against peft's ``initialize_lora_eva_weights`` where layers see different numbers of inputs, or share them.

peft folds every call of a layer into its incremental SVD as one step (a layer called twice per forward takes two
steps per batch; a layer skipped on a batch takes none), checks convergence after each, groups layers whose first
input is identical under one SVD (the first of them, in module order) and breaks rank ties between them by its
own argsort and swap. Ranks, alpha patterns, targets and components must come out the same.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.init import EvaConfig


class Schedules(nn.Module):
    """q/k/v share their input; ``twice`` runs two times per forward; ``sometimes`` only on flagged batches."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 16), nn.Linear(32, 16), nn.Linear(32, 16)
        self.twice, self.sometimes, self.o = nn.Linear(32, 32), nn.Linear(16, 16), nn.Linear(16, 8)

    def forward(self, x, flag):
        h = self.q(x) + self.k(x) + self.v(x)
        y = self.twice(self.twice(x).tanh())
        if bool(flag):
            h = h + self.sometimes(h)
        return self.o(h).sum() + y.sum()


def batches(n=6, rows=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(32, 32, generator=g) * torch.logspace(0, -2, 32)[:, None]  # a decaying spectrum
    return [(torch.randn(rows, 32, generator=g) @ mix, torch.tensor(i % 3 == 0)) for i in range(n)]


TARGETS = ["q", "k", "v", "twice", "sometimes", "o"]


def run_both(data, r=4, tau=0.99, rho=2.0, model=Schedules, rank_pattern=None, targets=TARGETS):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import EvaConfig as PeftEvaConfig
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    torch.manual_seed(0)
    base = model()
    ours = lorakit.apply(copy.deepcopy(base), lorakit.LoRAConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                                 rank_pattern=rank_pattern or {},
                                                                 init_lora_weights="eva"))
    lorakit.initialize(ours, data, settings=EvaConfig(tau=tau, rho=rho))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(copy.deepcopy(base), LoraConfig(
            r=r, lora_alpha=2 * r, target_modules=targets, rank_pattern=rank_pattern or {}, init_lora_weights="eva",
            eva_config=PeftEvaConfig(tau=tau, rho=rho)))
        initialize_lora_eva_weights(theirs, data, forward_fn=lambda m, b: m(*b), prepare_model_inputs_fn=None,
                                    prepare_layer_inputs_fn=None, show_progress_bar=False)
    return ours, theirs


def assert_matches_peft(ours, theirs, min_cos: float) -> None:
    """Same rank and alpha patterns and targets; each A row within ``min_cos`` of peft's (same signs)."""
    config, peft_config = lorakit.config_of(ours), theirs.peft_config["default"]
    assert config.rank_pattern == peft_config.rank_pattern
    assert config.alpha_pattern == peft_config.alpha_pattern
    assert sorted(config.target_modules) == sorted(peft_config.target_modules)
    for path, a in lorakit.adapters(ours).items():
        a_theirs = theirs.base_model.model.get_submodule(path).lora_A["default"].weight
        assert a_theirs.shape == a.lora_A.weight.shape, path
        cos = F.cosine_similarity(a_theirs, a.lora_A.weight, dim=1)
        assert torch.all(cos > min_cos), (path, cos)


@pytest.mark.parametrize("tau", [0.99, 0.9])
def test_ranks_and_components_match_peft_when_layers_see_different_inputs(tau):
    ours, theirs = run_both(batches(), tau=tau)
    assert_matches_peft(ours, theirs, min_cos=0.999)


def test_layers_with_one_input_share_components_and_the_first_takes_the_ties():
    ours, _ = run_both(batches())
    config = lorakit.config_of(ours)
    ranks = {p: config.for_module(p).r for p in lorakit.adapters(ours)}
    shared = [p for p in ("q", "k", "v") if p in ranks]
    assert shared and shared[0] == "q" and ranks["q"] == max(ranks[p] for p in shared)
    for p in shared[1:]:
        a, b = lorakit.adapters(ours)[p].lora_A.weight, lorakit.adapters(ours)["q"].lora_A.weight
        assert torch.equal(a, b[: a.shape[0]])


def test_batches_with_fewer_tokens_than_components_are_skipped_as_peft_does():
    """r=4, rho=2: 8 components; batches of 8 rows are folded in, batches of 5 rows skipped, by both."""
    data = [(x[: (48, 8, 5)[i % 3]], flag) for i, (x, flag) in enumerate(batches(n=9, seed=1))]
    ours, theirs = run_both(data)
    assert_matches_peft(ours, theirs, min_cos=0.999)


def test_layers_sharing_an_input_fit_as_many_components_as_the_largest_rank_among_them_asks():
    """q asks r=8 (16 components), k and v r=4 (8): their shared SVD must keep 16, whatever the module order."""
    ours, theirs = run_both(batches(n=9, rows=64), rank_pattern={"q": 8})
    assert_matches_peft(ours, theirs, min_cos=0.999)


class ShortThenLong(nn.Module):
    """``lin`` runs twice per forward: on 2 rows (fewer than its components), then on every row."""

    def __init__(self):
        super().__init__()
        self.lin, self.o = nn.Linear(32, 16), nn.Linear(16, 8)

    def forward(self, x, flag):
        return self.lin(x[:2]).sum() + self.o(self.lin(x)).sum()


def test_a_short_call_is_skipped_and_the_next_call_of_the_same_layer_still_counts():
    """The 2-row call is skipped, as peft skips it; the full call after it in the same forward is folded in."""
    ours, theirs = run_both(batches(), model=ShortThenLong, targets=["lin", "o"])
    assert_matches_peft(ours, theirs, min_cos=0.999)
