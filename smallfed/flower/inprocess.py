"""An in-process Grid: the ServerApp's messages go straight to the ClientApp, one by one.

Flower's Simulation Engine (Ray) pays about 7 s to start and about 0.25 s a round in
two 0.1 s polling loops; on one machine with small models that is most of the run.
This Grid drives the very same ``ServerApp`` and ``ClientApp`` objects, with real
``Message`` and ``Context`` objects and one persistent ``Context`` per virtual node,
but calls the ClientApp directly: no actors, no queues, no polling. It is a single
process running clients in turn, not a scheduler: use the Ray backend for large
populations, several cores or a cluster. With a :class:`~smallfed.cohort.rendezvous.Cohort`
it delivers a round's train messages on one thread each, so that their training runs
as one batched computation (``cohort-size``). Exceptions in a ClientApp become error
replies, as in Flower's own engine, so a failing client never stops the round.
"""

from __future__ import annotations

import secrets
import traceback
from collections.abc import Callable, Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from smallfed.cohort.rendezvous import Cohort

ReplyHook = Callable[[Message], None]


class InProcessGrid(Grid):
    """A Grid over ``num_nodes`` virtual SuperNodes that run ``client_app`` in this process."""

    simulated = True  # no transport: see smallfed.flower.grids.simulated_grid

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: dict | None = None,
        on_reply: ReplyHook | None = None,
        node_configs: list[dict] | None = None,
        cohort: Cohort | None = None,
        cohort_size: int = 0,
    ) -> None:
        """``node_configs`` replaces the nodes' default config (their partition ids),
        one per node, for example by a ``data-dir`` each, as on devices. With a
        ``cohort``, train messages are delivered ``cohort_size`` at a time through it."""
        if node_configs is not None and len(node_configs) != num_nodes:
            raise ValueError(f"{len(node_configs)} node configs for {num_nodes} nodes")
        if cohort is not None and cohort_size < 1:
            raise ValueError(f"cohort_size {cohort_size}: a cohort delivers at least 1 message")
        folders = [c["data-dir"] for c in node_configs or [] if c.get("data-dir")]
        if cohort is not None and len(set(folders)) < len(folders):
            # A client holds its folder's ledger lock while it waits for the batch; a
            # second node of that folder would wait for it before the batch: a deadlock.
            raise ValueError("two nodes share a data-dir: a cohort needs one folder per node")
        self._client_app = client_app
        self._on_reply = on_reply
        self._run = Run.create_empty(run_id=secrets.randbits(63))
        self._run.override_config = dict(run_config or {})
        # Random node ids, as Flower's SuperLink gives: nothing may depend on them.
        self._contexts: dict[int, Context] = {}
        self._index: dict[int, int] = {}  # node id -> its place (its partition id)
        for partition_id in range(num_nodes):
            node_id = secrets.randbits(63)
            self._index[node_id] = partition_id
            self._contexts[node_id] = Context(
                run_id=self._run.run_id,
                node_id=node_id,
                node_config=dict(node_configs[partition_id]) if node_configs else
                {"partition-id": partition_id, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
        self._cohort, self._cohort_size = cohort, cohort_size
        self._replies: dict[str, Message] = {}
        self._gone: set[int] = set()  # nodes disconnected by a test of faults
        # Messages take their run and source from the process's task identity, which
        # Flower's engines set for the ServerApp; this Grid is that engine here.
        TaskIdentity.run_id = self._run.run_id
        TaskIdentity.task_id = 1
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    def server_context(self) -> Context:
        """The ServerApp's Context for this run."""
        return Context(
            run_id=self._run.run_id, node_id=0, node_config={}, state=RecordDict(),
            run_config=dict(self._run.override_config),
        )

    def node_states(self) -> dict[int, RecordDict]:
        """Each node's ``Context.state`` by its place (partition id), for a checkpoint."""
        return {self._index[n]: c.state for n, c in self._contexts.items() if len(c.state)}

    def restore_node_states(self, states: dict[int, RecordDict]) -> None:
        for node_id, context in self._contexts.items():
            context.state = states.get(self._index[node_id], RecordDict())

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(  # pylint: disable=too-many-arguments
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self._contexts if n not in self._gone]

    def place(self, node_id: int) -> int:
        """The node's place in the population: its partition id."""
        return self._index[node_id]

    def disconnect(self, node_id: int) -> None:
        """The node leaves, as a SuperNode that died (its state is kept for its return)."""
        self._gone.add(node_id)

    def reconnect(self, node_id: int) -> None:
        self._gone.discard(node_id)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        together = self._cohort is not None and len(messages) > 1 and all(
            m.metadata.message_type == MessageType.TRAIN for m in messages)
        if together:
            assert self._cohort is not None
            size = self._cohort_size
            # In partition order, not the strategy's (node ids are random per run): a
            # client's place in the batch changes its float rounding, so a run with the
            # same seed must put it in the same place.
            ordered = sorted(messages, key=lambda m: self._index.get(m.metadata.dst_node_id, -1))
            trained: dict[int, Message] = {}
            for start in range(0, len(ordered), size):
                chunk = ordered[start:start + size]
                tasks = [lambda m=m: self._deliver(m) for m in chunk]
                trained.update(zip(map(id, chunk), self._cohort.run(tasks)))
            replies = [trained[id(m)] for m in messages]
        else:
            replies = [self._deliver(msg) for msg in messages]
        for msg, reply in zip(messages, replies):
            self._replies[msg.metadata.message_id] = reply
        return [msg.metadata.message_id for msg in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(list(self.push_messages(messages)))

    def _deliver(self, msg: Message) -> Message:
        msg.metadata.__dict__["_message_id"] = str(uuid4())
        context = self._contexts.get(msg.metadata.dst_node_id)
        if context is None or msg.metadata.dst_node_id in self._gone:
            reply = Message(
                Error(code=ErrorCode.NODE_UNAVAILABLE if context else ErrorCode.UNKNOWN,
                      reason=f"node {msg.metadata.dst_node_id} is not connected"),
                reply_to=msg,
            )
        else:
            try:
                reply = self._client_app(msg, context)
            except Exception as ex:  # pylint: disable=broad-exception-caught
                reason = f"{type(ex).__name__}: {ex}\n{traceback.format_exc(limit=3)}"
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                    reply_to=msg,
                )
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        if self._on_reply is not None:
            self._on_reply(reply)
        return reply
