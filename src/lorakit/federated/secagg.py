"""Secure aggregation of the adapters with Flower's SecAgg+ (its ``SecAggPlusWorkflow`` and ``secaggplus_mod``).

SecAgg+ (Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020) lets the
server learn only sum_k w_k x_k over the sampled clients: each client quantises w_k x_k and adds pairwise masks
that cancel in the sum, plus a private mask whose seed the server recovers from secret shares only for clients
that finished; clients that drop out mid-protocol have their pairwise masks reconstructed from their
neighbours' shares. The server therefore gets the weighted mean sum_k n_k x_k / sum_k n_k and nothing per
client. A strategy can use it when its aggregate is a function of such sums: its secure form
(``aggregation.secure_form``) says what x_k a client encodes and how the server decodes the mean. FedIT: the
adapter tensors; FFA-LoRA: B (the shared A is never sent); zero_pad: A and B zero-padded to the run's largest
rank with s_k / s folded in, so mixed ranks go through one fixed shape; fedavg_dense: the dense s_k B_k A_k;
LoRA-FAIR: A_k, B_k and s B_k A_k (its correction is a function of those three sums). Refused, with the reason:
FLoRA (its aggregate stacks each client's own factors side by side, which no sum produces; fedavg_dense merges
the same update).

Differential privacy (``dp = "client-fixed"``), Flower's composition: each client clips its update (reply minus
the global adapter) to the norm C the server's ``DifferentialPrivacyClientSideFixedClipping`` sends, with
``fixedclipping_mod``, before ``secaggplus_mod`` masks it; clients weigh in with weight 1 (DP's equal weights),
so the unmasked mean is the mean of the clipped updates, and the server adds Gaussian noise of std z C / m to it
(Flower's ``add_gaussian_noise_inplace``), as the wrapper does to a plain aggregate. The server can no longer
check that a client clipped (it never sees an update): the run's records say so (``dp-clipping-verified`` 0)
and the epsilon assumes honest clients. Refused: server-side clipping (it clips each update on the server, which
SecAgg+ hides) and client-side adaptive clipping (Flower's mechanism learns C from each client's clipped bit,
which ``adaptiveclipping_mod`` sends in clear in the reply's metrics, one bit per client about its update, and
which its wrapper reads while aggregating the individual updates; summing the bits under the masks as well would
be another mechanism than Flower's).

``SecureRound`` drives Flower's workflow stages (setup, share keys, collect masked vectors, unmask) for one
round of ``LoRAStrategy``: the strategy samples the nodes and builds their messages as in a plain round, and
the collect stage carries them. Flower's workflow was written for the legacy Strategy API, so the strategy
and client manager it calls are small stand-ins here. What the server can still check per client is the
reply's declared method, rank, base model and example count and the shapes of its masked vectors; a reply that
fails is left out before the masked sum (SecAgg+ then unmasks it as a dropout). NaN/inf and values beyond the
quantisation range are refused by the client itself (``mods.as_fitres``).

Quantisation error: each client quantises w_k x_k (w_k = n_k / max_weight; under DP w_k = 1) stochastically
with step 2 R / Q (R = ``secagg-clip-range``, Q = 2^22), so the unmasked mean differs from the exact one by at
most ``error_bound`` = K (2 R / Q) / sum_k w_k per entry, plus the rounding of the weights to multiples of 1/Q.
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

from .aggregation import SECURE, STRATEGIES
from .records import to_arrays

LOG = logging.getLogger("flwr")
QUANTISATION = 2**22  # Flower's default quantization_range
CONFLICTS = {
    "flora": "FLoRA stacks each client's own factors side by side, which no sum of masked vectors produces "
             "(fedavg_dense merges the same update and can)",
}
DP_CONFLICTS = {
    "server-fixed": "server-side clipping clips each update on the server, which secure aggregation hides",
    "server-adaptive": "server-side clipping clips each update on the server, which secure aggregation hides",
    "client-adaptive": "Flower's adaptive clipping learns the norm from each client's clipped bit, which its mod sends "
                       "in clear beside the masked update (one bit per client about its update) and its wrapper reads "
                       "while aggregating the individual updates, which SecAgg+ hides",
}


def check_options(settings) -> None:
    """Refuse secure aggregation where the strategy's aggregate is not a function of weighted sums, or with a DP
    kind that needs the individual updates."""
    s = settings
    if s.strategy not in SECURE and s.strategy in STRATEGIES.names():
        reason = CONFLICTS.get(s.strategy, "it declares no secure form (its aggregate is not a function of sums)")
        raise ValueError(f"secagg cannot be combined with strategy {s.strategy!r}: {reason}; use one of "
                         f"{', '.join(sorted(SECURE))}")
    if s.dp in DP_CONFLICTS:
        raise ValueError(f"secagg cannot be combined with dp {s.dp!r}: {DP_CONFLICTS[s.dp]}; use dp client-fixed "
                         "(each client clips before masking, the server adds the noise)")
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
        self.lora, self.form, self.private = lora, SECURE[lora.rule.name], bool(s.dp)
        # under DP every client weighs 1 (one client moves the mean by at most C / m)
        self.max_shard = float(max(len(shard) for shard in lora.exp.shards))
        self.max_weight = 1.0 if self.private else self.max_shard
        super().__init__(num_shares=1.0, reconstruction_threshold=2 / 3, max_weight=self.max_weight,
                         clipping_range=s.secagg_clip_range, quantization_range=QUANTISATION, timeout=s.reply_timeout)

    def layout(self, current: ArrayRecord) -> ArrayRecord:
        """What every client's masked vector holds (the reference adapter, encoded), in the order it is sent."""
        ref = self.lora.reference
        encoded = to_arrays(self.form.encode(ref, ref.config), skip=self.lora.rule.shared)
        return ArrayRecord({k: encoded[k] for k in wire_order(encoded.keys(), current.keys())})

    def __call__(self, rnd: int, grid, current: ArrayRecord) -> tuple[ArrayRecord | None, dict]:
        """Run the four stages; returns (the unmasked weighted mean of the encoded adapters, in the layout of
        ``layout``, or None; the round's counts). ``current`` is the global record the nodes are sent."""
        info = {"rejected": [], "failed": 0, "failed-nodes": [], "accepted": [], "bytes-up": 0, "bytes-down": 0}
        layout, self.current = self.layout(current), current
        self.expected = [(1,)] + [a.numpy().shape for a in layout.values()]
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
        mean = {k: Array(np.ascontiguousarray(v, dtype=layout[k].numpy().dtype)) for k, v in zip(layout.keys(), out["mean"])}
        return ArrayRecord(mean), info

    def _configure(self, rnd: int, grid):
        source = self.lora.private or self.lora  # the DP wrapper adds the clipping norm to each node's config
        messages = source.configure_train(rnd, self.current, ConfigRecord(), grid)
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
                info["failed-nodes"].append(node)
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
        declared, want = lora.declared(msg), lora.reference.config.to_dict()
        issues = identity_problems(declared, lora.reference.config, lora.exp.base_id)
        got = declared["config"] or {}
        if not lora.rule.mixed_ranks and any(got.get(k) != want[k] for k in ("r", "lora_alpha")):
            issues.append(f"adapter r={got.get('r')}, lora_alpha={got.get('lora_alpha')}: the strategy needs the "
                          f"run's r={want['r']}, lora_alpha={want['lora_alpha']}")
        n = float(msg.content["metrics"]["num-examples"])
        weight = int(msg.content["fitres.num_examples"]["num_examples"])
        if not (0 < n <= self.max_shard) or weight != (1 if self.private else n):
            issues.append(f"num-examples {n:g}, weight {weight}: expected a count in (0, {self.max_shard:g}] and "
                          f"a weight {'of 1 (DP)' if self.private else 'equal to it'}")
        masked = msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.MASKED_PARAMETERS, [])
        shapes = [bytes_to_ndarray(b).shape for b in masked]
        if shapes != self.expected:
            issues.append(f"masked vector shapes {shapes[:4]}..., expected {self.expected[:4]}... "
                          f"({len(shapes)} vs {len(self.expected)} arrays)")
        return issues


def wire_order(keys, received) -> list[str]:
    """The order a reply's arrays are sent in: the keys of the record received first, in its order (Flower's
    clipping mods compare the two lists), then the others sorted."""
    keys, received = list(keys), list(received)
    return [k for k in received if k in keys] + sorted(k for k in keys if k not in received)
