"""Claim tests for EVA (arXiv:2410.07170): A holds the top right-singular vectors of the layer inputs, ranks are
redistributed within the budget by explained variance (rank 0 drops the adapter), and the result matches PEFT's
``initialize_lora_eva_weights`` on the same calibration data."""
import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.init import EvaConfig
from lorakit.init.calibration import Calibration, layer_inputs
from lorakit.init.eva import rank_distribution

from init_helpers import lm_batches, lorakit_factors, lorakit_model, peft_model
from test_eva_peft_schedules import assert_matches_peft

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_components_are_the_top_right_singular_vectors_of_the_inputs(base):
    batches = lm_batches(1, 8, 16)  # one batch: EVA's incremental SVD is then the exact PCA of it
    model = lorakit_model(base, "eva", r=4, targets=ALL, batches=batches)
    rows = layer_inputs(base, {p: base.get_submodule(p) for p in lorakit.adapters(model)}, batches[0],
                        Calibration.of(batches))
    for path, f in lorakit_factors(model).items():
        x = rows[path]
        _, s, vh = torch.linalg.svd(x - x.mean(dim=0), full_matrices=False)
        r = f["A"].shape[0]
        cos = F.cosine_similarity(f["A"], vh[:r], dim=1).abs()
        gaps = (s[:r] - s[1 : r + 1]) / s[0]
        clear = gaps > 1e-2  # components whose singular value is separated from the next one
        # 0.995, not 1: EVA's SVD is randomised (q = 2k, 4 power iterations), exact only for a clear spectrum
        assert torch.all(cos[clear] > 0.995), (path, cos, gaps)
        assert torch.equal(f["B"], torch.zeros_like(f["B"])), path


def test_ranks_stay_within_the_budget_and_alphas_keep_the_scaling(base):
    model = lorakit_model(base, "eva", r=4, alpha=8, targets=ALL, batches=lm_batches(3, 4, 16))
    config = lorakit.config_of(model)
    ranks = {p: config.for_module(p).r for p in lorakit.adapters(model)}
    assert sum(ranks.values()) == 4 * 14, ranks  # 14 adapted layers at r=4
    assert max(ranks.values()) <= 8 and len(set(ranks.values())) > 1, ranks  # rho = 2, and ranks did move
    for path, r in ranks.items():
        assert config.for_module(path).lora_alpha / r == 8 / 4, path
        assert config.rank_pattern.get(path, 4) == r  # full module names, as PEFT writes them


class TwoInputs(nn.Module):
    """One layer sees isotropic inputs, the other inputs of rank 8: EVA gives the whole budget to the second."""

    def __init__(self):
        super().__init__()
        self.flat, self.lowrank = nn.Linear(64, 8), nn.Linear(64, 8)

    def forward(self, x, z):
        return self.flat(x) + self.lowrank(z)


def _two_input_batches():
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(8, 64, generator=g)
    return [(torch.randn(128, 64, generator=g), torch.randn(128, 8, generator=g) @ basis) for _ in range(3)]


def test_a_layer_can_lose_its_adapter_and_peft_agrees():
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    torch.manual_seed(0)
    base = TwoInputs()
    batches = _two_input_batches()
    ours = copy.deepcopy(base)
    lorakit.apply(ours, lorakit.LoRAConfig(r=4, lora_alpha=8, target_modules=["flat", "lowrank"], init_lora_weights="eva"))
    lorakit.initialize(ours, batches)
    config = lorakit.config_of(ours)
    assert list(lorakit.adapters(ours)) == ["lowrank"] and config.target_modules == ["lowrank"]
    assert config.rank_pattern == {"lowrank": 8} and config.alpha_pattern == {"lowrank": 16.0}
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["flat", "lowrank"],
                                                            init_lora_weights="eva"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        initialize_lora_eva_weights(theirs, batches, forward_fn=lambda m, b: m(*b), prepare_model_inputs_fn=None,
                                    prepare_layer_inputs_fn=None, show_progress_bar=False)
    peft_config = theirs.peft_config["default"]
    assert peft_config.rank_pattern == config.rank_pattern and peft_config.alpha_pattern == config.alpha_pattern
    assert list(peft_config.target_modules) == config.target_modules
    a_theirs = theirs.base_model.model.lowrank.lora_A["default"].weight
    assert torch.allclose(F.cosine_similarity(a_theirs, ours.lowrank.lora_A.weight, dim=1), torch.ones(8), atol=1e-4)


def test_ranks_patterns_and_components_match_peft(base):
    from peft.tuners.lora.eva import initialize_lora_eva_weights
    from peft.tuners.lora.config import EvaConfig as PeftEvaConfig

    batches = lm_batches(3, 4, 16)
    ours = lorakit_model(base, "eva", r=4, targets=ALL, batches=None)
    lorakit.initialize(ours, batches, settings=EvaConfig(tau=0.95))
    theirs = peft_model(base, "eva", r=4, targets=ALL, eva_config=PeftEvaConfig(tau=0.95))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        initialize_lora_eva_weights(theirs, batches, show_progress_bar=False)
    assert_matches_peft(ours, theirs, min_cos=0.999)  # fp32 vs fp64 SVD state


def test_rank_distribution_breaks_ties_towards_the_layer_that_owns_the_svd():
    ratios = {"q": torch.tensor([0.5, 0.3, 0.1]), "o": torch.tensor([0.4, 0.2, 0.2])}
    rep = {"q": "q", "k": "q", "o": "o"}  # k shares q's input
    sizes = {"q": 3, "k": 3, "o": 3}
    assert rank_distribution(ratios, rep, sizes, budget=6) == {"q": 2, "k": 2, "o": 2}
    # 0.5 (q), 0.5 (k), 0.4 (o), then the tie 0.3/0.3 goes to q, whose SVD is the one checked for convergence
    assert rank_distribution(ratios, rep, sizes, budget=4) == {"q": 2, "k": 1, "o": 1}


def test_whitening_divides_by_the_root_singular_values(base):
    batches = lm_batches(1, 8, 16)
    model = lorakit_model(base, "eva", r=4, targets=("v_proj",))
    lorakit.initialize(model, batches, settings={"whiten": True})
    unwhitened = lorakit_model(base, "eva", r=4, targets=("v_proj",))
    lorakit.initialize(unwhitened, batches)
    for path, a in lorakit.adapters(model).items():
        w, u = a.lora_A.weight, lorakit.adapters(unwhitened)[path].lora_A.weight
        assert torch.allclose(F.cosine_similarity(w, u, dim=1), torch.ones(w.shape[0]), atol=1e-5)
        assert torch.all(w.norm(dim=1)[1:] >= w.norm(dim=1)[:-1] - 1e-6)  # smaller singular values: longer rows
        assert not torch.allclose(w.norm(dim=1), torch.ones(w.shape[0]))


def test_sequence_labels_do_not_mask_tokens_and_padding_does():
    """Classification batches carry one label per sequence: EVA must calibrate on every unpadded token."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=64, num_labels=3)).eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 100, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[:2, 8:] = 0  # two padded rows
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}
    path = "bert.encoder.layer.0.attention.self.query"
    rows = layer_inputs(base, {path: base.get_submodule(path)}, batch, Calibration.of([batch]), label_mask_value=-100)
    assert rows[path].shape == (int(mask.sum()), 32)
    model = lorakit.apply(copy.deepcopy(base), lorakit.LoRAConfig(r=2, target_modules=["query", "value"],
                                                                  init_lora_weights="eva"))
    lorakit.init.initialize(model, [batch])
    a = lorakit.adapters(model)[path].lora_A.weight
    assert torch.isfinite(a).all() and a.abs().sum() > 0
