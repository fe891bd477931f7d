"""The Flower ClientApp: fine-tune a lorakit adapter on this node's shard and send the adapter back.

Only adapter tensors (and ``modules_to_save``) leave the node. For restarting strategies (FLoRA) the node keeps
the sum of the merged round updates in ``context.state`` and folds it into its base weights every round.
Node config: ``partition-id`` (which shard), optionally ``rank`` (overrides the run config's client ranks).
With personal modules (FedPer) the node keeps their part (``personal.remember``) and never sends it; the
``query.personalise`` message after the last round makes it write its personalised adapter. The reply's arrays
keep the order of the global adapter received (Flower's clipping mods compare the two key lists); under SecAgg+
they are the strategy's secure form of the adapter (``aggregation.secure_form``); ``mods.lorakit_mods`` adds
client-side DP clipping and SecAgg+ where the run config asks for them.
"""
from __future__ import annotations

import functools

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..core.state import AdapterState
from .aggregation import SECURE
from .experiment import Experiment, Settings, stable_seed
from .mods import lorakit_mods
from . import personal
from .protocol import add_to_base, fold_deltas, receive, unpack_updates
from .records import config_from_record, config_record, from_arrays, to_arrays
from .secagg import wire_order

app = ClientApp(mods=[lorakit_mods])


@functools.lru_cache(maxsize=4)
def experiment_for(settings: Settings) -> Experiment:
    """One Experiment per run config and process (the model and data load once)."""
    return Experiment(settings)


def merged_base(exp: Experiment, content: RecordDict, store: RecordDict):
    """The base model with every round update received so far folded in; returns (model, last round folded)."""
    model = exp.base_model()
    sync = store.get("sync", ConfigRecord({"base-round": 0}))
    done = int(sync["base-round"])
    deltas = {k: torch.from_numpy(v.numpy().copy()) for k, v in store.get("merged", ArrayRecord()).items()}
    if "updates" in content:
        updates = unpack_updates(content["updates"], content["update-configs"], type(exp.adapter_config()))
        pending = [r for r in updates if r > done]
        if pending and pending[0] != done + 1:
            raise RuntimeError(f"this node folded rounds up to {done} but the server sent rounds from {pending[0]}")
        for rnd in pending:
            fold_deltas(deltas, model, updates[rnd])
            done = rnd
    store["merged"] = ArrayRecord({k: v for k, v in deltas.items()})
    store["sync"] = ConfigRecord({"base-round": done})
    return add_to_base(model, deltas), done


def node_model(exp: Experiment, msg: Message, context: Context):
    """This node's model with the global adapter received (and its personal part); returns (model, base round)."""
    s, rule = exp.settings, exp.rule
    server_round = int(msg.content["config"]["server-round"])
    partition = int(context.node_config["partition-id"])
    rank = int(context.node_config.get("rank", s.client_rank(partition)))
    model, base_round = merged_base(exp, msg.content, context.state)
    # restarting strategies draw a fresh adapter every round; the others start from the global adapter
    seed = stable_seed(s.seed, "init", server_round, partition) if rule.restart else s.seed
    exp.add_adapter(model, rank, seed)
    own = AdapterState.from_model(model)
    incoming = from_arrays(msg.content["global"], config_from_record(msg.content["config"]))
    state = receive(own, incoming)
    own_part = personal.restore(context.state, s, partition, server_round) if personal.names(s) else None
    if own_part is not None:  # FedPer: the personal part this node trained in earlier rounds
        state = personal.join(state, from_arrays(own_part, state.config))
    state.load_into(model)
    return model, base_round


def local_round(exp: Experiment, msg: Message, context: Context) -> tuple[AdapterState, int, float, int]:
    """Build this node's model, take in the global adapter, train; returns (adapter, examples, loss, base round).

    With personal modules, their part is kept in ``context.state`` and left out of the returned adapter."""
    model, base_round = node_model(exp, msg, context)
    partition = int(context.node_config["partition-id"])
    num_examples, loss = exp.train_local(model, partition, int(msg.content["config"]["server-round"]))
    state = AdapterState.from_model(model)
    mine = personal.names(exp.settings)
    if mine:
        state, own = personal.split(state, mine)
        personal.remember(context.state, exp.settings, partition, int(msg.content["config"]["server-round"]),
                          to_arrays(own))
    return state, num_examples, loss, base_round


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local fine-tuning."""
    exp = experiment_for(Settings.from_config(context.run_config))
    state, num_examples, loss, base_round = local_round(exp, msg, context)
    partition = int(context.node_config["partition-id"])
    sent = state
    if exp.settings.secagg:  # what the strategy's secure form sums: at the run's fixed shapes
        sent = SECURE[exp.rule.name].encode(state, exp.adapter_config(exp.settings.max_rank))
    arrays = to_arrays(sent, skip=exp.rule.shared)
    arrays = ArrayRecord({k: arrays[k] for k in wire_order(arrays.keys(), msg.content["global"].keys())})
    content = RecordDict({
        "arrays": arrays,
        "metrics": MetricRecord({"num-examples": num_examples, "train-loss": loss}),
        "adapter": config_record(state.config, **{"base-round": base_round, "partition-id": partition,
                                                   "base-id": exp.base_id}),
    })
    return Message(content=content, reply_to=msg)


@app.query("personalise")
def personalise(msg: Message, context: Context) -> Message:
    """After the last round: join the final global adapter with this node's personal part, write it as a PEFT
    adapter (``personal-dir/client-<k>``), and score the personalised and the global model on this node's mix."""
    from ..core import fingerprint
    from ..formats.peft import save_state

    exp = experiment_for(Settings.from_config(context.run_config))
    s, partition = exp.settings, int(context.node_config["partition-id"])
    if personal.restore(context.state, s, partition, int(msg.content["config"]["server-round"])) is None:
        raise RuntimeError(f"node of partition {partition} holds no personal adapter (it trained in no round)")
    model, _ = node_model(exp, msg, context)
    mine = AdapterState.from_model(model)
    scores = {"personal-accuracy": exp.client_score(model, partition)}
    fresh = exp.add_adapter(exp.base_model(), mine.config.r, s.seed)
    _, init = personal.split(AdapterState.from_model(fresh), personal.names(s))
    personal.join(personal.split(mine, personal.names(s))[0], init).load_into(fresh)
    scores["global-accuracy"] = exp.client_score(fresh, partition)
    if s.personal_dir:
        name = s.model if s.task != "toy" else None
        save_state(mine.replace(base_model_name_or_path=name), f"{s.personal_dir}/client-{partition}",
                   base=fingerprint.record(exp.base_model()))
    content = RecordDict({"metrics": MetricRecord({**scores, "partition-id": partition})})
    return Message(content=content, reply_to=msg)
