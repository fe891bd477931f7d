"""Run the ServerApp's strategy and the ClientApp in one process, without Ray or a SuperLink.

``InProcessGrid`` is a Flower ``Grid`` that hands each message straight to a ``ClientApp`` with that node's
persistent ``Context``; a ClientApp that raises produces an error reply, as Flower's runtimes do. A node given a
``latency`` (seconds) above the round's timeout is a straggler: it runs the message (its state moves on) but its
reply arrives too late and is dropped, as Flower's ``send_and_receive`` drops replies after its timeout. The benchmark
and the fast tests drive the very same app code through it; ``runner`` runs it on Flower's own engines.
"""
from __future__ import annotations

import copy
import itertools
import uuid
from typing import Iterable, Mapping, Optional

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from .experiment import Experiment, Settings
from .server_app import LoRAStrategy


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process (node ids 1..N, partition-id = index)."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: Mapping,
                 node_configs: Optional[list[dict]] = None):
        self.client_app = client_app
        # Messages take their run and sender from the process's task identity, which Flower's runtimes set.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
        self.contexts = {}
        for k in range(num_nodes):
            node_config = {"partition-id": k, "num-partitions": num_nodes, **((node_configs or [{}] * num_nodes)[k])}
            self.contexts[k + 1] = Context(run_id=1, node_id=k + 1, node_config=node_config, state=RecordDict(),
                                           run_config=dict(run_config))
        self.offline: set[int] = set()  # node ids that take no messages (a node that left)
        self.latency: dict[int, float] = {}  # node id -> seconds its reply takes (stragglers)
        self.late: list[Message] = []  # replies that came after the timeout
        self._ids = itertools.count()

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return getattr(self, "_run", None)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.offline]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("InProcessGrid answers through send_and_receive only")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("InProcessGrid answers through send_and_receive only")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> list[Message]:
        """Deliver each message to its node's ClientApp; a node that is offline sends nothing back."""
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node in self.offline:
                continue
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            delivered = copy.deepcopy(msg)  # as over a wire: the node gets its own copy of a shared body
            try:
                reply = self.client_app(delivered, self.contexts[node])
            except Exception as e:  # noqa: BLE001 - as Flower's runtimes: a failing ClientApp is an error reply
                reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
            late = timeout is not None and self.latency.get(node, 0.0) > timeout
            (self.late if late else replies).append(reply)
        return replies


def run_in_process(settings: Settings, client_app: Optional[ClientApp] = None, grid: Optional[InProcessGrid] = None,
                   node_configs: Optional[list[dict]] = None, on_round=None) -> LoRAStrategy:
    """Run the federated experiment in this process; returns the strategy (its ``state.log`` is the history).

    ``on_round(record)`` is called with each round's record (progress)."""
    from .client_app import app as default_app

    grid = grid or InProcessGrid(client_app or default_app, settings.num_clients, settings.to_config(), node_configs)
    strategy = LoRAStrategy(Experiment(settings))
    strategy.on_round = on_round
    strategy.start(grid)
    return strategy
