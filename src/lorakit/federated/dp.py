"""Central differential privacy for the federated runs: Flower's DP wrappers around lorakit's strategy, and epsilon.

``wrap(strategy, settings)`` puts one of Flower's wrappers around ``LoRAStrategy``: server-side clipping,
``DifferentialPrivacyServerSideFixedClipping`` (``dp = "server-fixed"``) or ``...ServerSideAdaptiveClipping``
(``"server-adaptive"``, Andrew et al., arXiv:1905.03871), or client-side clipping,
``DifferentialPrivacyClientSideFixedClipping`` / ``...ClientSideAdaptiveClipping`` (``"client-fixed"`` /
``"client-adaptive"``), whose ClientApp counterparts are Flower's ``fixedclipping_mod`` / ``adaptiveclipping_mod``
(``mods.lorakit_mods`` puts them on lorakit's ClientApp when the run config asks for them). Either way each
accepted reply's update (the adapter tensors it sends minus the global ones) is clipped to L2 norm C (on the
server, or on the client before it leaves), lorakit's strategy averages them with equal weights (DP ignores
example counts, so one client moves the mean by at most C/m), and Gaussian noise of std z C / m is added to the
result (m: the nodes sampled per round). Bad replies are screened out before the wrapper sees them
(``LoRAStrategy.start``); with client-side clipping the server also rejects an update whose norm exceeds C
(``unclipped``), since a client that skipped the mod would otherwise break the sensitivity bound. With SecAgg+
(``secagg``, client-fixed only) the server adds the same noise to the unmasked mean (``add_noise``) and cannot
make that check: the round records say so (``dp-clipping-verified`` 0).
Where the maths conflicts, the run is refused: FLoRA and fedavg_dense publish each client's factors inside
the stacked update (noise on a sum protects nothing there), LoRA-FAIR's server correction is a non-linear
function of the individual updates whose sensitivity the Gaussian mechanism's C/m does not bound, and mixed
client ranks give updates of different shapes. FFA-LoRA is the natural fit (its update is linear in B).
Deviation from Flower 1.41: its adaptive wrappers (server- and client-side) count *clipped* updates but apply
Andrew et al.'s rule, written for the *unclipped* fraction b, C <- C exp(-η (b - γ)); with every update clipped
the norm then shrinks, away from the target. ``AdaptiveClipping`` and ``ClientAdaptiveClipping`` override that
one hook with the paper's rule in terms of the clipped fraction f = 1 - b and the target clipped fraction
q = 1 - γ: C <- C exp(η (f - q)).
Accounting (``epsilon``): Rényi DP of the Gaussian mechanism, ε_α = α / (2 z_t²) per round with the round's
effective noise multiplier z_t (``z k / m`` when only k of the m sampled nodes were aggregated), composed over
rounds and converted with ε = min_α Σ_t ε_α + log(1/δ) / (α - 1) = ρ + 2 sqrt(ρ log(1/δ)), ρ = Σ_t 1 / (2 z_t²)
(Mironov, arXiv:1702.07476). Client-level, add/remove-one neighbours; no amplification by sampling is claimed
(nodes are sampled without replacement at a fixed count), so ε is an upper bound for any sampling.
"""
from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_stdv

from .aggregation import STRATEGIES

KINDS = ("server-fixed", "server-adaptive", "client-fixed", "client-adaptive")
CONFLICTS = {
    "flora": "FLoRA's stacked update carries each client's own factors, so noise on their sum hides no client",
    "fedavg_dense": "fedavg_dense releases the exact factorisation of the clients' updates each round",
    "lora_fair": "LoRA-FAIR's server correction is non-linear in the individual updates; the Gaussian "
                 "mechanism's sensitivity C/m does not bound it",
}


def check_options(settings) -> None:
    """Refuse invalid or conflicting DP settings with one ValueError naming the option and what to do."""
    s = settings
    if s.dp not in KINDS:
        raise ValueError(f"dp {s.dp!r} is not one of {', '.join(KINDS)} (or '' for none)")
    if not (math.isfinite(s.dp_noise) and s.dp_noise >= 0):
        raise ValueError(f"dp-noise (the noise multiplier z) must be finite and >= 0, found {s.dp_noise}")
    if not (math.isfinite(s.dp_clip) and s.dp_clip > 0):
        raise ValueError(f"dp-clip (the clipping norm C) must be > 0, found {s.dp_clip}")
    if not 0 < s.dp_delta < 1:
        raise ValueError(f"dp-delta must be in (0, 1), found {s.dp_delta}")
    if s.dp.endswith("adaptive") and s.dp_noise > 0 and s.dp_noise >= 2 * (sampled(s) / 20):
        raise ValueError(f"dp-noise {s.dp_noise} is too large for {s.dp} clipping with {sampled(s)} sampled "
                         f"nodes (it must stay below {2 * sampled(s) / 20:g}, Flower's clipped-count noise)")
    if s.strategy in CONFLICTS:
        raise ValueError(f"dp cannot be combined with strategy {s.strategy!r}: {CONFLICTS[s.strategy]}; "
                         "use fedit or ffa_lora")
    if STRATEGIES.get(s.strategy).restart:
        raise ValueError(f"dp cannot be combined with the restarting strategy {s.strategy!r}")
    if len({s.client_rank(k) for k in range(s.num_clients)}) > 1:
        raise ValueError("dp needs one rank for all clients (clipping compares updates of one shape); "
                         f"client-ranks gives {s.client_ranks!r}")


def sampled(settings) -> int:
    """Nodes sampled per round (as ``LoRAStrategy.configure_train`` samples them)."""
    return max(int(settings.num_clients * settings.fraction_train), settings.min_replies)


class PaperRule:
    """The clipping-norm update of Andrew et al. in terms of the clipped fraction (see above)."""

    def _geometric_update(self, clipped_fraction: float) -> None:
        self.clipping_norm *= math.exp(self.clip_norm_lr * (clipped_fraction - self.target_clipped_quantile))


class AdaptiveClipping(PaperRule, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping with the clipping-norm update of Andrew et al."""


class ClientAdaptiveClipping(PaperRule, DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping with the clipping-norm update of Andrew et al."""


def wrap(strategy, settings):
    """Flower's DP wrapper for ``settings.dp`` around ``strategy``."""
    s, m = settings, sampled(settings)
    if s.dp.endswith("fixed"):
        fixed = DifferentialPrivacyServerSideFixedClipping if s.dp == "server-fixed" else DifferentialPrivacyClientSideFixedClipping
        return fixed(strategy, s.dp_noise, s.dp_clip, m)
    adaptive = AdaptiveClipping if s.dp == "server-adaptive" else ClientAdaptiveClipping
    return adaptive(strategy, s.dp_noise, m, initial_clipping_norm=s.dp_clip)


def unclipped(arrays, current, clip: float) -> float | None:
    """The L2 norm of the update ``arrays - current`` (both ArrayRecords) when it exceeds ``clip``, else None."""
    norm = math.sqrt(sum(float(np.sum((arrays[k].numpy().astype(np.float64) - current[k].numpy()) ** 2))
                         for k in current))
    return norm if norm > clip * (1 + 1e-5) + 1e-7 else None  # float32 round-off of the client's clipping


def add_noise(mean: ArrayRecord, settings, clip: float) -> ArrayRecord:
    """``mean`` plus Gaussian noise of std z C / m, as Flower's client-side wrapper adds it to an aggregate (used
    under SecAgg+, where the aggregate comes from the unmasking instead of the wrapper)."""
    arrays = [a.numpy().copy() for a in mean.values()]
    add_gaussian_noise_inplace(arrays, compute_stdv(settings.dp_noise, clip, sampled(settings)))
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in zip(mean.keys(), arrays)})


def round_noise(settings, aggregated: int) -> float:
    """The round's effective noise multiplier when ``aggregated`` of the sampled nodes made up the mean."""
    return settings.dp_noise * aggregated / sampled(settings)


def epsilon(noise_multipliers: list[float], delta: float) -> float:
    """ε at ``delta`` after Gaussian releases with these noise multipliers (RDP composition; inf if any is 0)."""
    if not noise_multipliers:
        return 0.0
    if min(noise_multipliers) <= 0:
        return math.inf
    rho = sum(1 / (2 * z * z) for z in noise_multipliers)
    return rho + 2 * math.sqrt(rho * math.log(1 / delta))
