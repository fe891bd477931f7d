"""Helpers for the federated app tests: a small toy run and a ClientApp with injected faults."""
from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from lorakit.federated import aggregate
from lorakit.federated.client_app import personalise, train as lorakit_train
from lorakit.federated.experiment import Experiment, Settings
from lorakit.federated.local import InProcessGrid
from lorakit.federated.mods import lorakit_mods
from lorakit.federated.server_app import LoRAStrategy


def toy(**changes) -> Settings:
    """A toy run small enough for unit tests (4 clients, 2 rounds, a few local steps)."""
    base = dict(task="toy", strategy="fedit", num_rounds=2, num_clients=4, local_steps=4, batch_size=16, lr=1e-2,
                rank=4, lora_alpha=8.0, max_train=240, max_eval=120, min_replies=2, dirichlet_alpha=1.0, eval_every=1)
    return Settings(**{**base, **changes})


def client_app(fault=None, sent=None, outer=()) -> ClientApp:
    """lorakit's ClientApp (with its mods), with ``fault(msg, context, reply) -> reply`` applied inside the mods
    and replies kept in ``sent``; ``outer`` mods run outside lorakit's (they see what leaves the node)."""
    app = ClientApp(mods=[*outer, lorakit_mods])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = lorakit_train(msg, context)
        if fault is not None:
            reply = fault(msg, context, reply)
        if sent is not None:
            sent.append((int(msg.content["config"]["server-round"]), int(context.node_config["partition-id"]), reply))
        return reply

    app.query("personalise")(personalise)
    return app


def around_rounds(strategy, before=None, after=None) -> None:
    """Call ``before(round)`` / ``after(round)`` around the strategy's node sampling of each round."""
    original = strategy.configure_train

    def configure(rnd, arrays, config, grid):
        if before:
            before(rnd)
        messages = original(rnd, arrays, config, grid)
        if after:
            after(rnd)
        return messages

    strategy.configure_train = configure


def run(settings, fault=None, grid=None, seen=None, outer=()):
    """Run ``settings`` in process with ``fault`` applied to replies; returns (strategy, replies sent, grid)."""
    sent = []

    def hook(msg, context, reply):
        if seen is not None:
            seen[(int(msg.content["config"]["server-round"]), int(context.node_config["partition-id"]))] = msg
        return fault(msg, context, reply) if fault else reply

    grid = grid or InProcessGrid(client_app(hook, sent, outer), settings.num_clients, settings.to_config())
    strategy = LoRAStrategy(Experiment(settings))
    strategy.start(grid)
    return strategy, sent, grid


def aggregate_of(strategy, sent, rnd, partitions):
    """The registered aggregate of the replies ``partitions`` sent in round ``rnd``."""
    chosen = sorted((p, reply) for r, p, reply in sent if r == rnd and p in partitions)
    parsed = [strategy.parse(reply) for _, reply in chosen]
    return aggregate(strategy.rule.name, [x[0] for x in parsed], [x[1] for x in parsed])
