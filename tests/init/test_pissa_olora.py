"""Claim tests for the weight-only initialisers: PiSSA's adapter is the principal part of W and the residual the
rest; OLoRA's B is orthonormal with A = Bᵀ W; both match PEFT's initial factors."""
import pytest
import torch

import lorakit

from init_helpers import lorakit_factors, lorakit_model, peft_factors, peft_model

TARGETS = ("q_proj", "v_proj", "down_proj")


def test_pissa_adapter_is_the_best_rank_r_part_of_w(base):
    model = lorakit_model(base, "pissa", r=4, alpha=8, targets=TARGETS)
    for path, a in lorakit.adapters(model).items():
        w = base.get_submodule(path).weight.detach()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        principal = (u[:, :4] * s[:4]) @ vh[:4]
        assert torch.allclose(a.delta_weight(), principal, atol=1e-5), path
        residual = a.base_layer.weight.detach()
        assert torch.allclose(residual + a.delta_weight(), w, atol=1e-6), path
        # Eckart–Young: the residual holds exactly the trailing singular values
        assert torch.allclose(torch.linalg.svdvals(residual)[: len(s) - 4], s[4:], atol=1e-5), path


def test_pissa_fast_svd_leaves_a_near_optimal_residual(base):
    # On random weights (flat spectrum) the top-r subspace is ill-determined, so we check what PiSSA needs:
    # the residual the fast SVD leaves is almost as small as the optimal (exact SVD) one.
    exact = lorakit_factors(lorakit_model(base, "pissa", targets=TARGETS))
    fast = lorakit_factors(lorakit_model(base, "pissa_niter_4", targets=TARGETS))
    for path in exact:
        ratio = (fast[path]["W"].norm() / exact[path]["W"].norm()).item()
        assert 1.0 - 1e-6 <= ratio < 1.02, (path, ratio)


def test_olora_b_is_orthonormal_and_a_is_its_projection_of_w(base):
    model = lorakit_model(base, "olora", r=4, alpha=8, targets=TARGETS)
    for path, f in lorakit_factors(model).items():
        w = base.get_submodule(path).weight.detach()
        assert torch.allclose(f["B"].T @ f["B"], torch.eye(4), atol=1e-5), path
        assert torch.allclose(f["A"], f["B"].T @ w, atol=1e-5), path


def test_pissa_and_olora_initial_factors_equal_peft(base):
    for init in ("pissa", "olora"):
        ours = lorakit_factors(lorakit_model(base, init, targets=TARGETS))
        theirs = peft_factors(peft_model(base, init, targets=TARGETS))
        assert sorted(ours) == sorted(theirs)
        for path in ours:
            for key in ("A", "B", "W"):
                assert torch.allclose(ours[path][key], theirs[path][key], atol=1e-6), (init, path, key)


def test_orthogonal_factors_are_nonzero_with_a_zero_product(base):
    model = lorakit_model(base, "orthogonal", targets=TARGETS)
    for path, f in lorakit_factors(model).items():
        assert f["A"].norm() > 0.1 and f["B"].norm() > 0.1, path
        assert torch.allclose(f["B"] @ f["A"], torch.zeros_like(f["W"]), atol=1e-6), path
        assert torch.equal(f["W"], base.get_submodule(path).weight), path
    with pytest.raises(ValueError, match="even r"):
        lorakit_model(base, "orthogonal", r=3, targets=TARGETS)
