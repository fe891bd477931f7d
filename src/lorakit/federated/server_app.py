"""The Flower ServerApp: sample nodes, aggregate their adapters with a registered lorakit strategy, evaluate.

``LoRAStrategy`` keeps FedAvg's node sampling and replaces its two training hooks: ``configure_train`` sends
each node the global adapter (and, for restarting strategies, the round updates it has not merged yet) and
``aggregate_train`` checks every reply (``checks.problems``: NaN/inf, shapes, keys outside the targets),
rejects and logs bad ones, and aggregates the rest when at least ``min-replies`` are left; otherwise the round
keeps the previous global adapter; with ``server-opt`` the aggregate is then taken as a pseudo-gradient by
FedAdam / FedYogi / FedAdagrad (``optimisers``). ``start`` resumes from ``checkpoint-dir`` and checkpoints every round.
Rounds go through Flower's DP wrappers (``dp``: server- or client-side clipping) or SecAgg+ (``secagg``) when the
run config asks; with personal modules (``personal``, FedPer) they never reach the server, and after the last
round every node is sent the final global adapter to write its personalised one.
"""
from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from ..core.state import AdapterState
from . import checkpoint, dp, personal, secagg
from .aggregation import B_KEYS, aggregate, aggregation_error
from .checks import identity_problems, problems
from .experiment import Experiment, Settings, stable_seed
from .optimisers import ServerOptimiser
from .protocol import add_to_base, fold_deltas, pack_updates
from .records import config_record, from_arrays, payload, to_arrays

LOG = logging.getLogger("flwr")


class LoRAStrategy(FedAvg):
    """FedAvg's sampling; aggregation, checks, checkpoints and evaluation by lorakit."""

    def __init__(self, experiment: Experiment):
        s = experiment.settings
        ranks = {s.client_rank(k) for k in range(s.num_clients)}
        if len(ranks) > 1 and not experiment.rule.mixed_ranks:
            raise ValueError(f"strategy {s.strategy!r} needs one rank for all clients; client-ranks gives {sorted(ranks)}")
        super().__init__(fraction_train=s.fraction_train, fraction_evaluate=0.0, min_train_nodes=s.min_replies,
                         min_available_nodes=s.min_replies)
        self.exp, self.rule = experiment, experiment.rule
        fresh = experiment.fresh_state()
        self.personal = personal.names(s)
        if self.personal:
            personal.check_options(s, [*fresh.tensors, *fresh.modules_to_save])
        # the agreed modules and shapes, the shared tensors; the personal part (FedPer) stays on the clients
        self.reference, self.personal_init = personal.split(fresh, self.personal)
        self.state = checkpoint.ServerState(0, self.reference.clone())
        self.sent: dict[int, dict] = {}  # round -> bytes sent (wire and raw tensor bytes)
        self.on_round = None  # called with each round's record (progress), when set
        self.optimiser = None
        if s.server_opt:
            self.optimiser = ServerOptimiser(s.server_opt, s.server_lr, s.server_beta1, s.server_beta2, s.server_tau,
                                             frozen=self.rule.shared)
            self.state.opt = self.optimiser.state  # checkpointed with the rest of the server state
        self.private, self.prescreened = (dp.wrap(self, s) if s.dp else None), None
        self.secure = secagg.SecureRound(self) if s.secagg else None

    def outgoing(self, node_id: int, server_round: int, config=None) -> RecordDict:
        """The message body for one node: the global adapter and the round updates it lacks (plus ``config``,
        e.g. the clipping norm a client-side DP wrapper sends)."""
        content = RecordDict({"global": self.global_record(), "config": config_record(
            self.state.adapter.config, **{**dict(config or {}), "server-round": server_round})})
        if self.rule.restart:
            arrays, configs = pack_updates(self.state.history, self.state.synced.get(str(node_id), 0))
            if len(configs):
                content["updates"], content["update-configs"] = arrays, configs
        return content

    def global_record(self) -> ArrayRecord:
        """The global adapter as sent to every node (without the shared tensors; restarting strategies: the
        saved modules only, the adapter being fresh)."""
        g = self.state.adapter
        body = AdapterState(g.config, {}, g.modules_to_save, g.base_tensors) if self.rule.restart else g
        return to_arrays(body, skip=self.rule.shared)

    def configure_train(self, server_round, arrays, config, grid: Grid):
        """One message per sampled node (restarting strategies send each node a different catch-up)."""
        wanted = max(int(len(list(grid.get_node_ids())) * self.fraction_train), self.min_train_nodes)
        state = random.getstate()  # Flower samples with the global RNG: seed it per round, so a resumed run
        random.seed(stable_seed(self.exp.settings.seed, "sample", server_round))  # samples as an unbroken one
        try:
            node_ids, _ = sample_nodes(grid, self.min_available_nodes, wanted)
        finally:
            random.setstate(state)
        messages = []
        for node_id in sorted(node_ids):
            content = self.outgoing(node_id, server_round, config)
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id))
        sizes = [payload(r) for m in messages for r in m.content.array_records.values()]
        self.sent[server_round] = {k: sum(x[k] for x in sizes) for k in ("wire", "tensors")}
        return messages

    def parse(self, msg: Message) -> tuple[AdapterState, float, float, int, int]:
        """A reply as (adapter, examples, loss, partition, base round); the config is rebuilt from the shapes."""
        content = msg.content
        raw = from_arrays(content["arrays"], self.reference.config)
        ranks = {d[k].shape[1] for d in raw.tensors.values() for k in d if k in B_KEYS}
        if len(ranks) != 1:
            raise ValueError(f"expected one rank across modules, found {sorted(ranks) or 'none'}")
        config = self.exp.adapter_config(ranks.pop())
        for path, tensors in raw.tensors.items():  # tensors every party holds were not sent
            for key in self.rule.shared:
                if path in self.reference.tensors and key in self.reference.tensors[path] and key not in tensors:
                    tensors[key] = self.reference.tensors[path][key][: config.r].clone()
        state = AdapterState(config, raw.tensors, raw.modules_to_save, raw.base_tensors)
        metrics, info = content["metrics"], content["adapter"]
        return (state, float(metrics["num-examples"]), float(metrics["train-loss"]), int(info["partition-id"]),
                int(info["base-round"]))

    @staticmethod
    def declared(msg: Message) -> dict:
        """What a reply says it trained: its adapter config (as a dict) and base-model fingerprint."""
        info = msg.content["adapter"]
        raw = info.get("adapter-config")
        return {"config": json.loads(str(raw)) if raw is not None else None, "base-id": info.get("base-id")}

    def screen(self, server_round: int, replies) -> dict:
        """Sort replies into accepted (message, partition, adapter, examples, loss), rejected and failed; log them."""
        out = {"accepted": [], "rejected": [], "failed": 0, "uplink": 0, "uplink-tensors": 0}
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                out["failed"] += 1
                self.state.synced.pop(str(node), None)  # it may have lost its state: send it everything again
                LOG.warning("round %d: node %s failed: %s", server_round, node, msg.error.reason)
                continue
            if "arrays" in msg.content:
                size = payload(msg.content["arrays"])
                out["uplink"] += size["wire"]
                out["uplink-tensors"] += size["tensors"]
            try:
                state, n, loss, partition, base_round = self.parse(msg)
                issues = problems(state, self.reference, self.rule.mixed_ranks, n)
                issues += identity_problems(self.declared(msg), self.reference.config, self.exp.base_id)
            except (KeyError, ValueError, TypeError) as e:
                issues = [f"unreadable reply: {e}"]
            if issues:
                out["rejected"].append({"node": str(node), "reasons": issues})
                LOG.warning("round %d: rejected the update of node %s: %s", server_round, node, "; ".join(issues))
                continue
            self.state.synced[str(node)] = base_round
            out["accepted"].append((msg, partition, state, n, loss))
        return out

    def aggregate_train(self, server_round: int, replies):
        """Check each reply, aggregate the accepted ones (if enough), update the global adapter.

        Under DP the replies were screened before the wrapper clipped them: they are re-read here as clipped.
        """
        if self.prescreened is not None:
            screened, self.prescreened = self.prescreened, None
            accepted = []
            for msg, (_, partition, *_) in zip(list(replies), screened["accepted"]):
                state, n, loss = self.parse(msg)[:3]
                accepted.append((partition, state, n, loss))
        else:
            screened = self.screen(server_round, replies)
            accepted = [(p, state, n, loss) for _, p, state, n, loss in screened["accepted"]]
        rejected, failed = screened["rejected"], screened["failed"]
        uplink, uplink_tensors = screened["uplink"], screened["uplink-tensors"]
        sent = self.sent.get(server_round, {"wire": 0, "tensors": 0})
        metrics = {"accepted": len(accepted), "rejected": len(rejected), "failed": failed, "uplink-bytes": uplink,
                   "uplink-tensor-bytes": uplink_tensors, "downlink-bytes": sent["wire"],
                   "downlink-tensor-bytes": sent["tensors"]}
        self.last_rejections = rejected
        if len(accepted) < self.exp.settings.min_replies:
            LOG.warning("round %d: %d accepted update(s), fewer than min-replies=%d; the global adapter stays",
                        server_round, len(accepted), self.exp.settings.min_replies)
            return None, MetricRecord({**metrics, "skipped": 1})
        accepted.sort(key=lambda item: item[0])  # a fixed order makes the sums reproducible
        states, counts = [a[1] for a in accepted], [a[2] for a in accepted]
        if self.private is not None:  # equal weights: one client moves the mean by at most C / m
            counts = [1.0] * len(states)
        new = aggregate(self.rule.name, states, counts)
        metrics["aggregation-error"] = aggregation_error(new, states, counts)  # vs the exact weighted sum
        new = self.adopt(server_round, new, step=self.private is None)  # under DP: after the noise, in ``start``
        loss = sum(a[2] * a[3] for a in accepted) / max(sum(a[2] for a in accepted), 1e-12)
        return to_arrays(new, skip=self.rule.shared), MetricRecord({**metrics, "skipped": 0, "train-loss": loss})

    def adopt(self, rnd: int, new: AdapterState, step: bool = True) -> AdapterState:
        """Make an aggregate the global adapter, after the server optimiser's step (with ``step``); a restarting
        strategy's aggregate is kept as the round's update, and the global adapter is a fresh one."""
        if self.optimiser is not None and step:
            new = self.optimiser.step(self.state.adapter, new)
        if self.rule.restart:
            self.state.history[rnd] = AdapterState(new.config, new.tensors)
            ref = self.reference
            new = AdapterState(ref.config, ref.clone().tensors, new.modules_to_save, new.base_tensors)
        self.state.adapter = new
        return new

    def dp_record(self, aggregated: int, verified: bool) -> dict:
        """The round's DP figures: effective noise multiplier, clipping norm, epsilon so far, and whether the
        server verified each aggregated update's norm (not under SecAgg+, where it never sees one)."""
        s = self.exp.settings
        zs = [r["dp-noise-multiplier"] for r in self.state.log if "dp-noise-multiplier" in r]
        z = dp.round_noise(s, aggregated)
        return {"dp-noise-multiplier": z, "dp-clip": float(self.private.clipping_norm),
                "epsilon": dp.epsilon([*zs, z], s.dp_delta), "dp-delta": s.dp_delta, "dp-clipping-verified": int(verified)}

    def private_round(self, rnd: int, grid: Grid) -> dict:
        """One round through Flower's DP wrapper: screen, clip, aggregate, add noise; then the server step."""
        s, previous = self.exp.settings, self.state.adapter
        current = to_arrays(previous, skip=self.rule.shared)
        messages = self.private.configure_train(rnd, current, ConfigRecord(), grid)
        screened = self.prescreened = self.screen(rnd, grid.send_and_receive(messages, timeout=s.reply_timeout))
        if s.dp.startswith("client"):  # the sensitivity bound needs every update clipped: check, do not trust
            screened["accepted"] = [a for a in screened["accepted"] if not self.unclipped(rnd, a, current, screened)]
        good = [a[0] for a in screened["accepted"]]
        for msg in good:  # Flower clips reply - current array by array, in order: align the keys (checked equal)
            arrays = msg.content["arrays"]
            msg.content["arrays"] = ArrayRecord({k: arrays[k] for k in current})
        self.last_rejections = screened["rejected"]
        arrays, metrics = self.private.aggregate_train(rnd, good)
        self.prescreened = None
        if arrays is None:
            return dict(metrics) if metrics is not None else {
                "accepted": len(good), "rejected": len(screened["rejected"]), "failed": screened["failed"], "skipped": 1}
        noisy = self.with_shared(arrays, previous)  # the shared tensors were not sent, so not noised
        self.state.adapter = self.optimiser.step(previous, noisy) if self.optimiser is not None else noisy
        return {**dict(metrics), **self.dp_record(len(good), verified=True)}

    def with_shared(self, arrays: ArrayRecord, previous: AdapterState) -> AdapterState:
        """The adapter in ``arrays`` with the tensors every party holds (not sent) taken from ``previous``."""
        state = from_arrays(arrays, previous.config)
        for path, tensors in state.tensors.items():
            for key in self.rule.shared:
                if key in previous.tensors[path]:
                    tensors[key] = previous.tensors[path][key].clone()
        return state

    def secure_round(self, rnd: int, grid: Grid) -> dict:
        """One round through SecAgg+: the server gets only the weighted mean of the accepted clients' encoded
        adapters (under DP: of their clipped updates, to which it adds the noise), and decodes the aggregate."""
        s = self.exp.settings
        mean, info = self.secure(rnd, grid, self.global_record())
        accepted, self.last_rejections = info["accepted"], info["rejected"]
        for node in info["failed-nodes"]:  # it may have lost its state: send it everything again
            self.state.synced.pop(str(node), None)
        for msg in accepted:  # the round updates each node has folded in (restarting strategies)
            self.state.synced[str(msg.metadata.src_node_id)] = int(msg.content["adapter"]["base-round"])
        metrics = {"accepted": len(accepted), "rejected": len(info["rejected"]), "failed": info["failed"],
                   "uplink-bytes": info["bytes-up"], "downlink-bytes": info["bytes-down"]}
        if mean is None or len(accepted) < s.min_replies:
            LOG.warning("round %d: %d update(s) securely aggregated, fewer than min-replies=%d; the global adapter "
                        "stays", rnd, len(accepted), s.min_replies)
            return {**metrics, "skipped": 1}
        private = {}
        if self.private is not None:
            mean = dp.add_noise(mean, s, float(self.private.clipping_norm))
            private = self.dp_record(len(accepted), verified=False)
        ranks = [int(self.declared(m)["config"]["r"]) for m in accepted]
        self.adopt(rnd, self.secure.form.decode(from_arrays(mean, self.reference.config), self.reference, ranks))
        counts = [float(m.content["metrics"]["num-examples"]) for m in accepted]
        losses = [float(m.content["metrics"]["train-loss"]) for m in accepted]
        loss = sum(n * x for n, x in zip(counts, losses)) / sum(counts)
        weights = [1.0] * len(counts) if self.private is not None else counts
        bound = secagg.error_bound(weights, self.secure.max_weight, s.secagg_clip_range)
        return {**metrics, "skipped": 0, "train-loss": loss, "secagg-error-bound": bound, **private}

    def unclipped(self, rnd: int, accepted: tuple, current: ArrayRecord, screened: dict) -> bool:
        """Reject (and log) an accepted reply whose update is longer than the clipping norm sent this round."""
        msg = accepted[0]
        norm = dp.unclipped(msg.content["arrays"], current, float(self.private.clipping_norm))
        if norm is None:
            return False
        reason = f"update norm {norm:.6g} exceeds the clipping norm {self.private.clipping_norm:.6g} (not clipped)"
        screened["rejected"].append({"node": str(msg.metadata.src_node_id), "reasons": [reason]})
        LOG.warning("round %d: rejected the update of node %s: %s", rnd, msg.metadata.src_node_id, reason)
        return True

    def global_model(self):
        """The base model with the merged round updates and the global adapter on it."""
        model = self.exp.base_model()
        deltas: dict = {}
        for update in self.state.history.values():
            fold_deltas(deltas, model, update)
        return personal.join(self.state.adapter, self.personal_init).load_into(add_to_base(model, deltas))

    def start(self, grid: Grid, initial_arrays=None, num_rounds=None, timeout=None, train_config=None,
              evaluate_config=None, evaluate_fn=None) -> Result:
        """Run the rounds the checkpoint has not done yet; checkpoint and log each one."""
        s = self.exp.settings
        saved = checkpoint.load(s.checkpoint_dir) if s.checkpoint_dir else None
        if saved is not None:
            self.state = saved
            if self.private is not None and saved.log and "dp-clip" in saved.log[-1]:
                self.private.clipping_norm = saved.log[-1]["dp-clip"]  # an adaptive norm goes on where it was
            if self.optimiser is not None:
                self.optimiser.state = saved.opt
            LOG.info("resuming from %s after round %d", s.checkpoint_dir, saved.round)
        elif not self.state.log:
            self.state.log.append({"round": 0, **self.exp.evaluate(self.global_model())})
            if self.on_round is not None:
                self.on_round(self.state.log[-1])
        wait_for_nodes(grid, s.num_clients, timeout=60.0)
        for rnd in range(self.state.round + 1, s.num_rounds + 1):
            began = time.time()
            self.last_rejections = []
            if self.secure is not None:
                metrics = self.secure_round(rnd, grid)
            elif self.private is None:
                messages = self.configure_train(rnd, None, ConfigRecord(), grid)
                _, metrics = self.aggregate_train(rnd, grid.send_and_receive(messages, timeout=s.reply_timeout))
            else:
                metrics = self.private_round(rnd, grid)
            record = {"round": rnd, **dict(metrics), "rejections": self.last_rejections}
            if rnd % s.eval_every == 0 or rnd == s.num_rounds:
                record.update(self.exp.evaluate(self.global_model()))
            record["seconds"] = round(time.time() - began, 3)
            self.state.round = rnd
            self.state.log.append(record)
            LOG.info("round %d: %s", rnd, {k: v for k, v in record.items() if k != "rejections"})
            if self.on_round is not None:
                self.on_round(record)
            if s.checkpoint_dir:
                checkpoint.save(self.state, s.checkpoint_dir)
            self.write_history()
        if self.personal and self.state.round == s.num_rounds and not any("personalised" in r for r in self.state.log):
            self.personalise(grid)
            if self.on_round is not None:
                self.on_round(self.state.log[-1])
            self.write_history()
        result = Result()
        result.arrays = to_arrays(self.state.adapter)
        return result

    def personalise(self, grid: Grid) -> None:
        """Send the final global adapter to every node; each writes its personalised adapter and scores it."""
        s = self.exp.settings
        messages = [Message(content=self.outgoing(n, s.num_rounds + 1), message_type=personal.MESSAGE, dst_node_id=n)
                    for n in sorted(grid.get_node_ids())]
        clients = []
        for reply in grid.send_and_receive(messages, timeout=s.reply_timeout):
            if reply.has_error():
                LOG.warning("personalise: node %s failed: %s", reply.metadata.src_node_id, reply.error.reason)
                continue
            m = reply.content["metrics"]
            clients.append({"partition": int(m["partition-id"]), "personal-accuracy": float(m["personal-accuracy"]),
                            "global-accuracy": float(m["global-accuracy"])})
        clients.sort(key=lambda c: c["partition"])
        if s.personal_dir and clients:
            personal.write_users(s.personal_dir, [c["partition"] for c in clients])
        self.state.log.append({"round": s.num_rounds, "personalised": clients})
        LOG.info("personalised adapters: %s", clients)

    def write_history(self) -> None:
        if self.exp.settings.out_dir:
            out = Path(self.exp.settings.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            data = {"settings": self.exp.settings.to_config(), "rounds": self.state.log}
            (out / "history.json").write_text(json.dumps(data, indent=1))


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> int:
    """Wait (at most ``timeout`` s) until ``count`` nodes are connected; returns how many are."""
    deadline = time.time() + timeout
    while len(list(grid.get_node_ids())) < count and time.time() < deadline:
        time.sleep(0.5)
    return len(list(grid.get_node_ids()))


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federated experiment the run config describes."""
    LoRAStrategy(Experiment(Settings.from_config(context.run_config))).start(grid)
