"""EVA (arXiv:2410.07170), the claims of its abstract at test scale.

1. "initialize the LoRA matrices with the obtained right-singular vectors and re-distribute ranks among all
   weight matrices to explain the maximal amount of variance": over all adapted layers, the explained-variance
   ratios that EVA's A matrices capture of their layers' centred inputs must sum to the maximum any
   allocation of the same total rank can reach (each layer at most rho·r components, as EVA allows), computed
   here from exact SVDs. Threshold: at least 0.99 of that maximum (EVA's SVD is randomised and incremental);
   the uniform allocation and a random (Kaiming) A are reported beside it.
2. "EVA exhibits faster convergence than competitors": against default LoRA (Kaiming A, B = 0) on a small
   deterministic task (EVA calibrated on all six of its batches), same AdamW and lr, as steps to reach the loss default LoRA ends at (the level fixed
   before the runs). Threshold: the one-sided 95% lower bound over five seeds of the geometric-mean
   speed-up is above 1.
"""
import pytest
import torch

import lorakit
from lorakit.init.calibration import Calibration, layer_inputs

from convergence import log_speedups, lower_bound
from init_helpers import lm_batches, lorakit_model

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
R, RHO = 4, 2


def _captured(a: torch.Tensor, x: torch.Tensor) -> float:
    """Share of the centred rows of ``x`` that lies in the row space of ``a``."""
    q = torch.linalg.qr(a.double().T).Q  # [n, r] orthonormal basis of the row space
    return ((x @ q).pow(2).sum() / x.pow(2).sum()).item()


def test_ranks_go_where_they_explain_the_most_variance(base):
    # Catches: ranks left uniform or allocated by raw variance instead of each layer's explained-variance ratio,
    # components that are not the top singular vectors, or a budget that grows.
    batches = lm_batches(1, 8, 32)  # one batch: EVA's incremental SVD is then that batch's PCA
    model = lorakit_model(base, "eva", r=R, targets=ALL, batches=batches)
    paths = list(lorakit.adapters(model))
    layers = {p: base.get_submodule(p) for p in (p for p, _ in base.named_modules() if p.endswith(ALL))}
    rows = layer_inputs(base, layers, batches[0], Calibration.of(batches))
    ratios, uniform, random = [], 0.0, 0.0
    torch.manual_seed(0)
    for path, x in rows.items():
        x = (x - x.mean(dim=0)).double()
        s2 = torch.linalg.svdvals(x).pow(2)
        ratio = s2 / s2.sum()
        ratios.append(ratio[: RHO * R])
        uniform += ratio[:R].sum().item()
        random += _captured(torch.nn.init.kaiming_uniform_(torch.empty(R, x.shape[1]), a=5 ** 0.5), x)
    best = torch.cat(ratios).sort(descending=True).values[: R * len(rows)].sum().item()
    eva = sum(_captured(a.lora_A.weight.detach(), (rows[p] - rows[p].mean(dim=0)).double())
              for p, a in lorakit.adapters(model).items())
    ranks = {p: a.lora_A.weight.shape[0] for p, a in lorakit.adapters(model).items()}
    assert sum(ranks.values()) <= R * len(rows) and len(paths) <= len(rows)
    assert eva >= 0.99 * best, f"EVA captures {eva:.3f}, the best allocation {best:.3f} (uniform {uniform:.3f}, " \
                               f"random A {random:.3f})"


@pytest.mark.slow  # about 20 s of CPU
def test_converges_faster_than_default_lora(base):
    # Catches: an A that is not aligned with the inputs' leading directions (no faster than a random A).
    low, speedups = lower_bound(log_speedups(base, "eva", ("q_proj", "v_proj", "up_proj", "down_proj"), range(5),
                                                calibration=6))  # every batch: EVA's SVD must converge
    assert low > 1, f"speed-ups {speedups}; 95% lower bound {low:.2f}x <= 1x"
