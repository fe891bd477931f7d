"""LoRA-Pro's closed form against brute-force least squares on tiny shapes, and the paper's own statement."""
import pytest
import torch

from lorakit.optim.lora_pro import adjust, equivalent_gradient, solve_sylvester


def _linear_map(A, B, s):
    """The matrix M of (g_A, g_B) -> vec(s(B g_A + g_B A)), built column by column."""
    r, n = A.shape
    m = B.shape[0]
    cols = []
    for k in range(r * n + m * r):
        z = torch.zeros(r * n + m * r, dtype=torch.float64)
        z[k] = 1.0
        gA, gB = z[: r * n].view(r, n), z[r * n :].view(m, r)
        cols.append((s * (B @ gA + gB @ A)).flatten())
    return torch.stack(cols, 1)


@pytest.mark.parametrize("b_zero", [False, True])
@pytest.mark.parametrize("shape", [(5, 4, 2), (6, 7, 3)])
def test_adjusted_gradients_are_the_least_squares_fit_closest_to_lora(shape, b_zero):
    m, n, r = shape
    g = torch.Generator().manual_seed(m * n + r)
    A = torch.randn(r, n, generator=g, dtype=torch.float64)
    B = torch.zeros(m, r, dtype=torch.float64) if b_zero else torch.randn(m, r, generator=g, dtype=torch.float64)
    G = torch.randn(m, n, generator=g, dtype=torch.float64)
    s = 1.7
    gA, gB = s * B.T @ G, s * G @ A.T  # the plain LoRA gradients of a loss with full gradient G

    gA_star, gB_star = adjust(A, B, gA, gB, s)
    M = _linear_map(A, B, s)
    z_lora = torch.cat([gA.flatten(), gB.flatten()])
    # the least-squares solution closest to the LoRA gradients: z_lora + M⁺(vec G - M z_lora)
    z_best = z_lora + torch.linalg.pinv(M) @ (G.flatten() - M @ z_lora)
    best_tilde = (M @ z_best).view(m, n)

    tilde = equivalent_gradient(A, B, gA_star, gB_star, s).double()
    assert torch.allclose(tilde, best_tilde, atol=1e-4), (tilde - best_tilde).abs().max()
    assert torch.allclose(torch.cat([gA_star.flatten(), gB_star.flatten()]).double(), z_best, atol=1e-4)
    # and it is strictly better than plain LoRA's equivalent gradient
    assert (tilde - G).norm() < (equivalent_gradient(A, B, gA, gB, s).double() - G).norm()


def test_sylvester_solution_satisfies_the_equation():
    g = torch.Generator().manual_seed(0)
    P, Q = (lambda x: x @ x.T)(torch.randn(3, 3, generator=g)), (lambda x: x @ x.T)(torch.randn(3, 3, generator=g))
    C = torch.randn(3, 3, generator=g)
    X = solve_sylvester(P, Q, C)
    assert torch.allclose(P @ X + X @ Q, C, atol=1e-4)


def test_equivalent_gradient_tracks_the_full_gradient_better_than_lora_on_a_layer():
    """The card's check: with the true G from autograd on W0, LoRA-Pro's g̃ is closer to G than LoRA's."""
    torch.manual_seed(0)
    W0 = torch.randn(8, 6, requires_grad=True)
    A, B = torch.randn(2, 6, requires_grad=True), torch.randn(8, 2, requires_grad=True)
    x, y, s = torch.randn(16, 6), torch.randn(16, 8), 2.0
    loss = ((x @ (W0 + s * B @ A).T - y) ** 2).mean()
    G, gA, gB = torch.autograd.grad(loss, (W0, A, B))
    lora = (equivalent_gradient(A, B, gA, gB, s) - G).norm() / G.norm()
    pro = (equivalent_gradient(A, B, *adjust(A.detach(), B.detach(), gA, gB, s), s) - G).norm() / G.norm()
    assert pro < lora and pro < 0.95
