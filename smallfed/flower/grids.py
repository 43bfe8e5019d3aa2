"""Grids that wrap another Grid: one that counts the bytes crossing it, one base that forwards."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from smallfed.flower.records import message_array_bytes
from smallfed.flower.wire import MODEL, WireModel, app_bundle_bytes, message_objects


@dataclass
class Traffic:
    """Bytes of arrays sent down to clients and up from them, the messages and Flower
    objects counted, and the wire estimate of the messages (polling is the round's:
    see :func:`smallfed.flower.wire`)."""

    bytes_down: int = 0
    bytes_up: int = 0
    messages_down: int = 0
    messages_up: int = 0
    objects_down: int = 0
    objects_up: int = 0
    wire_down: float = 0.0
    wire_up: float = 0.0
    wire_up_dense: float = 0.0  # wire_up had every train reply been a dense fp32 update


def simulated_grid(grid: Grid) -> bool:
    """Whether ``grid`` reaches simulated nodes (smallfed's in-process engine, Flower's
    Ray engine) rather than a deployment's SuperNodes."""
    while isinstance(grid, ForwardingGrid):
        grid = grid._grid  # pylint: disable=protected-access
    return isinstance(grid, InMemoryGrid) or getattr(grid, "simulated", False)


class ForwardingGrid(Grid):
    """A Grid that forwards every call to another Grid; subclasses change one thing."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def set_run(self, run) -> None:  # type: ignore[no-untyped-def]
        self._grid.set_run(run)

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self._grid.run

    def create_message(  # pylint: disable=too-many-arguments
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class MeteredGrid(ForwardingGrid):
    """A Grid that forwards to another and counts each message's serialized array bytes.

    Counting at the Grid, not in the strategy, sees every message the strategy sends
    (train, evaluate, queries) on the in-process, Ray and deployment Grids alike. Each
    message is also charged to the wire estimate, and a node's first message its join.
    """

    def __init__(self, grid: Grid, wire: WireModel = MODEL,
                 dense_reply: tuple[int, int] = (0, 0)) -> None:
        """``dense_reply``: (array bytes, objects) of a train reply holding the dense
        fp32 model, what ``wire_up_dense`` charges for each train reply."""
        super().__init__(grid)
        self._traffic = Traffic()
        self.wire = wire
        self._dense_up = wire.up(*dense_reply)[1]  # a dense train reply's bytes up
        self._joined: set[int] = set()  # a resumed run joins again, as a new Flower run does

    def take(self) -> Traffic:
        """The traffic since the last call, and start counting afresh."""
        traffic, self._traffic = self._traffic, Traffic()
        return traffic

    def _count(self, messages: Iterable[Message], up: bool) -> list[Message]:
        messages = list(messages)
        traffic = self._traffic
        for msg in messages:
            size, objects = message_array_bytes(msg), message_objects(msg)
            wire_down, wire_up = (self.wire.up if up else self.wire.down)(size, objects)
            traffic.wire_down += wire_down
            traffic.wire_up += wire_up
            if up:
                traffic.bytes_up += size
                traffic.objects_up += objects
                # An update: a train reply with arrays (a declined client's reply has none).
                update = msg.metadata.message_type == MessageType.TRAIN and size > 0
                traffic.wire_up_dense += self._dense_up if update else wire_up
                continue
            traffic.wire_up_dense += wire_up
            traffic.bytes_down += size
            traffic.objects_down += objects
            node = msg.metadata.dst_node_id
            if node not in self._joined:
                self._joined.add(node)
                traffic.wire_down += self.wire.join_down + app_bundle_bytes()
                traffic.wire_up += self.wire.join_up
                traffic.wire_up_dense += self.wire.join_up
        if up:
            traffic.messages_up += len(messages)
        else:
            traffic.messages_down += len(messages)
        return messages

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(self._count(messages, up=False))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._count(self._grid.pull_messages(message_ids), up=True)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        sent = self._count(messages, up=False)
        return self._count(self._grid.send_and_receive(sent, timeout=timeout), up=True)
