"""KnOTS: the inputs' updates in the shared SVD basis of [ΔW_1 … ΔW_n], merged there."""
from __future__ import annotations

import torch
from merge_helpers import assert_close, mixed, update, weighted_sum

from lorakit.merging import combine
from lorakit.merging.combine import _layout, _part
from lorakit.merging.knots import shared_basis
from lorakit.merging.task_vectors import combine_task_vectors

WEIGHTS = [0.6, 1.2, -0.5]


def _parts(states, path):
    layout = _layout(path, states)
    return [_part(s, path, layout) for s in states]


def test_shared_basis_is_the_svd_of_the_side_by_side_updates():
    states = mixed()
    for path in ("lin0", "lin1"):
        basis, reps = shared_basis(_parts(states, path))
        assert_close(basis.T @ basis, torch.eye(basis.shape[1], dtype=basis.dtype), f"{path}: U orthonormal")
        for s, rep in zip(states, reps):
            assert_close((basis @ rep).float(), update(s, path), f"{path}: U r_i = ΔW_i")
        side_by_side = torch.cat([update(s, path).double() for s in states], dim=1)
        u, sv, _ = torch.linalg.svd(side_by_side, full_matrices=False)
        k = basis.shape[1]
        assert k == int((sv > 1e-5 * sv[0]).sum())  # the dense float32 updates carry rounding noise below 1e-5
        # same subspace and the same singular directions (up to sign): |Uᵀ U_ref| is the identity
        assert_close((basis.T @ u[:, :k]).abs(), torch.eye(k, dtype=basis.dtype), f"{path}: basis", atol=1e-6)


def test_knots_with_task_arithmetic_is_task_arithmetic():
    """The paper's identity: summing the representations and mapping back gives Σ w_i ΔW_i."""
    states = mixed()
    out = combine(states, "knots", WEIGHTS, inner="task_arithmetic")
    for path in out.modules():
        assert_close(out.delta(path), weighted_sum(states, WEIGHTS, path), f"knots-TA {path}")


def test_knots_ties_is_ties_on_the_representations():
    """Reference built from the definition: a dense float64 SVD of [ΔW_1 … ΔW_n], TIES on S·V_iᵀ, then U·merged."""
    states = mixed()
    out = combine(states, "knots", WEIGHTS, density=0.3)
    for path in out.modules():
        deltas = [update(s, path).double() for s in states]
        u, sv, vh = torch.linalg.svd(torch.cat(deltas, dim=1), full_matrices=False)
        keep = sv > 1e-5 * sv[0]  # drop the float32 rounding noise of the dense updates
        u, svh = u[:, keep], sv[keep, None] * vh[keep]
        reps = torch.stack(torch.split(svh, deltas[0].shape[1], dim=1)).float()
        merged = combine_task_vectors(reps, WEIGHTS, "ties", density=0.3)
        assert_close(out.delta(path), (u.float() @ merged), f"knots-TIES {path}", atol=1e-5)


def test_knots_result_rank_is_at_most_the_summed_rank():
    states = mixed()
    out = combine(states, "knots", WEIGHTS)
    assert out.module_config("lin0").r <= 4 + 2
    assert out.module_config("lin1").r <= min(12, 4 + 8 + 2)
    assert combine(states, "knots", WEIGHTS, rank=2).module_config("lin1").r == 2
