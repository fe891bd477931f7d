"""Secure aggregation of the adapters with Flower's SecAgg+ (its ``SecAggPlusWorkflow`` and ``secaggplus_mod``).

SecAgg+ (Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020) lets the
server learn only sum_k w_k x_k over the sampled clients: each client quantises w_k x_k and adds pairwise masks
that cancel in the sum, plus a private mask whose seed the server recovers from secret shares only for clients
that finished; clients that drop out mid-protocol have their pairwise masks reconstructed from their
neighbours' shares. The server therefore gets FedAvg's weighted mean sum_k n_k x_k / sum_k n_k and nothing
per client: that is FedIT's aggregate (x = the adapter tensors and the head) and FFA-LoRA's (x = B and the head;
the shared A is never sent), so only those two strategies are allowed, with one rank for all clients (the
masked vectors must have one shape). Refused, with the reason: FLoRA (its aggregate stacks each client's own
factors side by side, which a sum cannot produce), fedavg_dense and zero_pad (they weight each client's factors
by its own scaling or form s_k B_k A_k, a product a masked sum of factors does not give), LoRA-FAIR (its
correction needs the individual updates) and DP (Flower's DP wrappers clip or check each reply's arrays,
which SecAgg+ hides).

``SecureRound`` drives Flower's workflow stages (setup, share keys, collect masked vectors, unmask) for one
round of ``LoRAStrategy``: the strategy samples the nodes and builds their messages as in a plain round, and
the collect stage carries them. Flower's workflow was written for the legacy Strategy API, so the strategy
and client manager it calls are small stand-ins here. What the server can still check per client is the
reply's declared method, base model and example count and the shapes of its masked vectors; a reply that
fails is left out before the masked sum (SecAgg+ then unmasks it as a dropout). NaN/inf and values beyond the
quantisation range are refused by the client itself (``mods.as_fitres``).

Quantisation error: each client quantises w_k x_k (w_k = n_k / max_weight) stochastically with step
2 R / Q (R = ``secagg-clip-range``, Q = 2^22), so the unmasked mean differs from the exact one by at most
``error_bound`` = K (2 R / Q) / sum_k w_k per entry, plus the rounding of the weights to multiples of 1/Q.
"""
from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import FitIns, Parameters, bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

from .aggregation import STRATEGIES

LOG = logging.getLogger("flwr")
QUANTISATION = 2**22  # Flower's default quantization_range
ALLOWED = ("fedit", "ffa_lora")
CONFLICTS = {
    "flora": "FLoRA stacks each client's own factors side by side; a masked sum cannot produce a stack",
    "fedavg_dense": "fedavg_dense averages the products s_k B_k A_k; a masked sum of the factors does not give them",
    "zero_pad": "zero_pad folds each client's own scaling into its factors before averaging",
    "lora_fair": "LoRA-FAIR's server correction needs the individual updates, which secure aggregation hides",
}


def check_options(settings) -> None:
    """Refuse secure aggregation where the strategy's aggregate is not a weighted sum, or with DP."""
    s = settings
    if s.strategy in CONFLICTS or (s.strategy not in ALLOWED and s.strategy in STRATEGIES.names()):
        reason = CONFLICTS.get(s.strategy, "its aggregate is not declared a weighted sum")
        raise ValueError(f"secagg cannot be combined with strategy {s.strategy!r}: {reason}; use {' or '.join(ALLOWED)}")
    if len({s.client_rank(k) for k in range(s.num_clients)}) > 1:
        raise ValueError(f"secagg needs one rank for all clients (the masked vectors must have one shape); "
                         f"client-ranks gives {s.client_ranks!r}")
    if s.dp:
        raise ValueError(f"secagg cannot be combined with dp {s.dp!r}: Flower's DP wrappers clip or check each "
                         "reply's arrays, which secure aggregation hides; choose one")
    if not (np.isfinite(s.secagg_clip_range) and s.secagg_clip_range > 0):
        raise ValueError(f"secagg-clip-range must be finite and > 0, found {s.secagg_clip_range}")
    if max(int(s.num_clients * s.fraction_train), s.min_replies) < 2:
        raise ValueError("secagg needs at least 2 sampled nodes per round")


def error_bound(num_examples, max_weight: float, clip_range: float, quantisation: int = QUANTISATION) -> float:
    """Entry-wise bound on |SecAgg+ mean - exact weighted mean| from the stochastic quantisation."""
    weights = [n / max_weight for n in num_examples]
    return len(weights) * (2 * clip_range / quantisation) / sum(weights)


def content_bytes(content: RecordDict) -> int:
    """Bytes of a message body: arrays as Flower counts them; config and metric values (bytes, str, numbers,
    lists of them) by their size, 8 bytes a number, plus their keys."""
    def size(v) -> int:
        if isinstance(v, (list, tuple)):
            return sum(size(x) for x in v)
        return len(v) if isinstance(v, (bytes, str)) else 8

    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += record.count_bytes()
        else:
            total += sum(len(k) + size(v) for k, v in record.items())
    return total


class SecureRound(SecAggPlusWorkflow):
    """One SecAgg+ round of a ``LoRAStrategy`` (see the module docstring)."""

    def __init__(self, lora):
        s = lora.exp.settings
        self.lora, self.max_weight = lora, float(max(len(shard) for shard in lora.exp.shards))
        super().__init__(num_shares=1.0, reconstruction_threshold=2 / 3, max_weight=self.max_weight,
                         clipping_range=s.secagg_clip_range, quantization_range=QUANTISATION, timeout=s.reply_timeout)

    def __call__(self, rnd: int, grid, current: ArrayRecord) -> tuple[ArrayRecord | None, dict]:
        """Run the four stages; returns (the unmasked weighted mean as an ArrayRecord or None, the round's counts)."""
        info = {"rejected": [], "failed": 0, "accepted": [], "bytes-up": 0, "bytes-down": 0}
        self.expected = [(1,)] + [a.numpy().shape for a in current.values()]
        out = {}
        context = SimpleNamespace(
            state=RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd}),
                              MAIN_PARAMS_RECORD: ArrayRecord()}),
            strategy=SimpleNamespace(configure_fit=lambda *a: self._configure(rnd, grid),
                                     aggregate_fit=lambda r, results, failures: self._keep(out, results)),
            client_manager=SimpleNamespace(num_available=lambda: len(list(grid.get_node_ids()))),
            history=SimpleNamespace(add_metrics_distributed_fit=lambda **kw: None))
        screened = SimpleNamespace(get_node_ids=grid.get_node_ids,
                                   send_and_receive=lambda msgs, timeout=None: self._screen(rnd, grid, msgs, timeout, info))
        state = WorkflowState()
        for i, step in enumerate((self.setup_stage, self.share_keys_stage, self.collect_masked_vectors_stage,
                                  self.unmask_stage)):
            if i == 1:
                state.nid_to_fitins = self.contents  # lorakit's messages ride in the collect stage
            if not step(screened, context, state):
                LOG.warning("round %d: secure aggregation halted (too few nodes left to unmask)", rnd)
                return None, info
        if "mean" not in out:
            return None, info
        mean = {k: Array(np.ascontiguousarray(v, dtype=current[k].numpy().dtype)) for k, v in zip(current.keys(), out["mean"])}
        return ArrayRecord(mean), info

    def _configure(self, rnd: int, grid):
        messages = self.lora.configure_train(rnd, None, ConfigRecord(), grid)
        self.contents = {m.metadata.dst_node_id: m.content for m in messages}
        empty = FitIns(Parameters(tensors=[], tensor_type="numpy.ndarray"), {})
        return [(SimpleNamespace(node_id=n), empty) for n in self.contents]

    @staticmethod
    def _keep(out: dict, results) -> tuple:
        if not results:
            return None, {}
        params = results[0][1].parameters
        out["mean"] = parameters_to_ndarrays(params)
        return params, {}

    def _screen(self, rnd: int, grid, messages, timeout, info: dict) -> list[Message]:
        """Send one stage's messages; count bytes; leave out collect-stage replies the server must refuse."""
        messages = list(messages)
        info["bytes-down"] += sum(content_bytes(m.content) for m in messages)
        replies, kept = grid.send_and_receive(messages, timeout=timeout), []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                info["failed"] += 1
                LOG.warning("round %d: node %s failed: %s", rnd, node, msg.error.reason)
                continue
            info["bytes-up"] += content_bytes(msg.content)
            if "adapter" in msg.content:  # the collect stage: lorakit's reply around the masked vector
                issues = self._problems(msg)
                if issues:
                    info["rejected"].append({"node": str(node), "reasons": issues})
                    LOG.warning("round %d: rejected the update of node %s: %s", rnd, node, "; ".join(issues))
                    continue
                info["accepted"].append(msg)
            kept.append(msg)
        return kept

    def _problems(self, msg: Message) -> list[str]:
        from .checks import identity_problems

        lora = self.lora
        issues = identity_problems(lora.declared(msg), lora.reference.config, lora.exp.base_id)
        n = float(msg.content["metrics"]["num-examples"])
        if not (0 < n <= self.max_weight) or int(msg.content["fitres.num_examples"]["num_examples"]) != n:
            issues.append(f"num-examples {n:g}: expected a count in (0, {self.max_weight:g}], the same in both records")
        masked = msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.MASKED_PARAMETERS, [])
        shapes = [bytes_to_ndarray(b).shape for b in masked]
        if shapes != self.expected:
            issues.append(f"masked vector shapes {shapes[:4]}..., expected {self.expected[:4]}... "
                          f"({len(shapes)} vs {len(self.expected)} arrays)")
        return issues
