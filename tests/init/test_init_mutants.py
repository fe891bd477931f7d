"""Initialiser maths and messages pinned where mutation testing found them loose."""
import pytest
import torch

import lorakit
from lorakit.init import convert_to_plain_lora, pissa as pissa_module
from lorakit.init.lora_ga import LoraGAConfig, lora_ga_factors
from lorakit.init.orthogonal import orthogonal_factors
from lorakit.testing import ToyLinear


def _toy(init, r=4, **extra):
    torch.manual_seed(0)
    model = ToyLinear()
    return lorakit.apply(model, lorakit.LoRAConfig(r=r, lora_alpha=8, target_modules=["lin0", "lin1"],
                                                   init_lora_weights=init, **extra))


@pytest.mark.parametrize("init", ["olora", "orthogonal", "pissa", "pissa_niter_2"])
def test_rank_errors_name_the_initialiser(init):
    with pytest.raises(ValueError, match=rf"module 'lin\d': {init} needs r <= min\(out, in\) = \d+, found r=18"):
        _toy(init, r=18)


@pytest.mark.parametrize("init", ["olora", "orthogonal", "lora_ga", "eva"])
def test_non_lora_adapters_are_refused_naming_the_initialiser(init):
    torch.manual_seed(0)
    config = lorakit.METHODS.get("loldu").config_class(r=4, target_modules=["lin0"])
    model = lorakit.apply(ToyLinear(), config)
    with pytest.raises(ValueError, match=rf"init_lora_weights='{init}' initialises LoRA/DoRA factors"):
        lorakit.INITIALIZERS.get(init).run(model, settings=init)


def test_pissa_niter_reaches_the_factorisation(monkeypatch):
    seen = []
    real = pissa_module.pissa_factors
    monkeypatch.setattr(pissa_module, "pissa_factors", lambda w, r, s, niter=None: seen.append(niter) or real(w, r, s, niter))
    _toy("pissa_niter_3")
    _toy("pissa")
    assert seen == [3, 3, None, None]  # two adapted layers each


def test_orthogonal_factors_have_the_scale_of_peft():
    """Entries of (G Q_odd)ᵀ / 10 have mean square (r/2)/r / 100 = 0.005 (rows of Q orthonormal)."""
    torch.manual_seed(0)
    a, b = orthogonal_factors(8, 4096, 4096)
    assert a.pow(2).mean().item() == pytest.approx(0.005, rel=0.05)
    assert b.pow(2).mean().item() == pytest.approx(0.005, rel=0.05)


def test_conversion_messages_and_pattern_checks():
    plain = lorakit.AdapterState.from_model(_toy(True))
    rs_alpha = lorakit.AdapterState(lorakit.LoRAConfig(r=4, lora_alpha=8, use_rslora=True, alpha_pattern={"lin0": 4},
                                                       target_modules=["lin0", "lin1"]), plain.tensors)
    with pytest.raises(ValueError, match=r"^cannot convert an rsLoRA adapter with rank_pattern/alpha_pattern: the doubled "
                                         r"ranks would change its scaling \(PEFT refuses this too\)$"):
        convert_to_plain_lora(rs_alpha, rs_alpha)
    rs_plain = lorakit.AdapterState(lorakit.LoRAConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["lin0", "lin1"]),
                                    plain.tensors)
    assert convert_to_plain_lora(rs_plain, rs_plain).config.lora_alpha == pytest.approx(8 * 2**0.5)
    many = {f"m{i}": plain.tensors["lin0"] for i in range(8)}
    other = lorakit.AdapterState(plain.config, many)
    with pytest.raises(ValueError, match=r"^the initial adapter covers other modules than the trained one: "
                                         r"\['lin0', 'lin1', 'm0', 'm1', 'm2', 'm3'\]$"):
        convert_to_plain_lora(plain, other)
    loldu = lorakit.AdapterState.from_model(lorakit.apply(ToyLinear(), lorakit.METHODS.get("loldu").config_class(
        r=4, target_modules=["lin0"])))
    with pytest.raises(ValueError, match=r"^method 'loldu' is not plain LoRA \(ΔW = s·B A\), so its update cannot be "
                                         r"rewritten as a LoRA relative to the original weight; merge the adapter "
                                         r"into the original model instead$"):
        convert_to_plain_lora(loldu, loldu)


def _known_svd(m=32, n=24, k=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    s = torch.arange(k, 0, -1).float() * 2.0  # well separated
    return u @ torch.diag(s) @ v.T, u, v


def _projector(vectors):
    return vectors @ vectors.T


@pytest.mark.parametrize("direction,a_cols,b_cols", [
    ("ArB2r", [0, 1], [2, 3]), ("A2rBr", [2, 3], [0, 1]), ("ArBr", [1, 3], [0, 2]),
])
def test_lora_ga_directions_pick_the_documented_singular_vectors(direction, a_cols, b_cols):
    grad, u, v = _known_svd()
    a, b = lora_ga_factors(grad, 2, 1.0, LoraGAConfig(direction=direction, scale="unit"), grad)
    torch.testing.assert_close(_projector(a.T), _projector(v[:, a_cols]), atol=1e-4, rtol=0)
    torch.testing.assert_close(_projector(b), _projector(u[:, b_cols]), atol=1e-4, rtol=0)


def test_lora_ga_random_direction_is_seeded_and_disjoint():
    grad, u, v = _known_svd()
    settings = LoraGAConfig(direction="random", scale="unit")
    torch.manual_seed(1)
    a1, b1 = lora_ga_factors(grad, 2, 1.0, settings, grad)
    torch.manual_seed(2)
    a2, b2 = lora_ga_factors(grad, 2, 1.0, settings, grad)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)  # the global stream does not matter
    # A's right vectors and B's left vectors come from disjoint index sets of the top 2r
    a_idx = {int(i) for i in (v[:, :4].T @ a1.T).abs().argmax(0)}
    b_idx = {int(i) for i in (u[:, :4].T @ b1).abs().argmax(0)}
    assert len(a_idx) == 2 and len(b_idx) == 2 and not a_idx & b_idx


def test_lora_ga_weight_svd_scale_is_the_mean_root_of_the_top_weight_singular_values_over_s():
    grad, _, _ = _known_svd(seed=0)
    weight, _, _ = _known_svd(seed=1)  # singular values 16, 14, 12, ...
    unit = lora_ga_factors(grad, 2, 4.0, LoraGAConfig(scale="unit"), weight)
    scaled = lora_ga_factors(grad, 2, 4.0, LoraGAConfig(scale="weight_svd"), weight)
    factor = ((16 / 4) ** 0.5 + (14 / 4) ** 0.5) / 2
    torch.testing.assert_close(scaled[0], factor * unit[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scaled[1], factor * unit[1], atol=1e-4, rtol=1e-4)


class _Unused(torch.nn.Module):
    """Layers the forward never calls: EVA cannot see their inputs."""

    def __init__(self):
        super().__init__()
        self.used = torch.nn.Linear(16, 8)
        self.unused = torch.nn.ModuleList(torch.nn.Linear(16, 8) for _ in range(8))

    def forward(self, x):
        return self.used(x)


def _eva_model(targets):
    torch.manual_seed(0)
    return lorakit.apply(_Unused(), lorakit.LoRAConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights="eva"))


def test_eva_names_layers_the_first_batch_never_reaches():
    batches = [(torch.randn(32, 16),) for _ in range(2)]
    with pytest.raises(ValueError, match=r"^EVA: the first calibration batch never reaches unused.0, unused.1, unused.2, "
                                         r"unused.3, unused.4, unused.5; check forward_fn, or leave these modules out "
                                         r"of target_modules$"):
        lorakit.initialize(_eva_model(["used", *"01234567"]), batches, forward_fn=lambda m, b: m(*b))


def test_eva_says_what_to_do_when_it_does_not_converge():
    from lorakit.init import EvaConfig

    batches = [(torch.randn(32, 16),) for _ in range(2)]
    with pytest.raises(ValueError, match=r"^EVA did not converge in 1 passes over 2 batches \(tau=1.0\); unconverged: "
                                           r"used. Pass more or larger batches, lower tau, or raise EvaConfig.max_passes$"):
        lorakit.initialize(_eva_model(["used"]), batches, forward_fn=lambda m, b: m(*b),
                           settings=EvaConfig(tau=1.0, max_passes=1))


def test_conversion_keeps_modules_to_save_and_base_tensors():
    plain = lorakit.AdapterState.from_model(_toy(True))
    saved = {"head": {"weight": torch.ones(3, 12)}}
    base = {"emb.weight": torch.zeros(40, 16)}
    state = lorakit.AdapterState(plain.config, plain.tensors, saved, base)
    out = convert_to_plain_lora(state, state)
    assert out.modules_to_save is saved and out.base_tensors is base


@pytest.mark.parametrize("shape", [(64, 48), (48, 64)])
def test_lora_ga_weight_svd_is_the_seeded_randomised_svd_with_q_min_4r_m_n(shape):
    """A flat-spectrum weight, where the randomised SVD's q = min(4r, m, n) = 8 shows in the top singular values."""
    g = torch.Generator().manual_seed(5)
    grad, weight = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        _, s_w, _ = torch.svd_lowrank(weight, q=8, niter=4)
    unit = lora_ga_factors(grad, 2, 4.0, LoraGAConfig(scale="unit"), weight)
    scaled = lora_ga_factors(grad, 2, 4.0, LoraGAConfig(scale="weight_svd"), weight)
    factor = (s_w[:2] / 4).sqrt().mean()
    torch.testing.assert_close(scaled[0], factor * unit[0], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(scaled[1], factor * unit[1], atol=1e-7, rtol=1e-6)


def test_lora_ga_rank_error_names_the_initialiser():
    model = lorakit.apply(ToyLinear(), lorakit.LoRAConfig(r=9, target_modules=["lin0"]))
    with pytest.raises(ValueError, match=r"module 'lin0': lora_ga needs 2·r <= min\(out, in\)"):
        lorakit.INITIALIZERS.get("lora_ga").run(model)


def test_eva_lists_the_first_six_unconverged_layers():
    from lorakit.init import EvaConfig

    torch.manual_seed(0)
    chain = torch.nn.Sequential(*(torch.nn.Linear(16, 16) for _ in range(8)))  # eight distinct inputs: no groups
    model = lorakit.apply(chain, lorakit.LoRAConfig(r=2, target_modules=list("01234567"), init_lora_weights="eva"))
    batches = [(torch.randn(32, 16),) for _ in range(2)]
    with pytest.raises(ValueError, match=r"; unconverged: (\d, ){5}\d\. Pass more"):
        lorakit.initialize(model, batches, forward_fn=lambda m, b: m(*b), settings=EvaConfig(tau=1.0, max_passes=1))


def test_eva_takes_each_layers_rank_from_the_rank_pattern():
    torch.manual_seed(0)
    model = lorakit.apply(_Unused(), lorakit.LoRAConfig(r=2, lora_alpha=4, target_modules=["used"],
                                                          rank_pattern={"used": 3}, init_lora_weights="eva"))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 16, generator=g),) for _ in range(4)]
    config = lorakit.AdapterState.from_model(lorakit.initialize(model, batches, forward_fn=lambda m, b: m(*b))).config
    # one layer takes the whole budget, 3; its alpha stays 4, since its rank did not change
    assert config.rank_pattern == {"used": 3} and config.alpha_pattern == {}
