"""Simulated devices on the server: who is online, and whose reply misses the deadline.

The arithmetic lives in :class:`smallfed.devices.RoundClock`; this layer applies it
to a round. Of the nodes the sampling layer chose, only those online (drawn from
their device's availability) are shown to the layers below and sent a message; a
reply whose simulated time passes ``round-deadline-s`` is a straggler's and is dropped
before anything else looks at it. A device is charged the wire estimate of its
messages, bytes and round trips (:mod:`smallfed.flower.wire`); its join happens at
discovery, before its first round, and is not charged to a round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from smallfed.devices.clock import Arrival, ClientTime, RoundClock
from smallfed.flower.layers.base import Layer
from smallfed.flower.layers.sampling import Partitions, VisibleNodes
from smallfed.flower.layers.validate import positive_number
from smallfed.flower.records import METRICS_KEY, NUM_EXAMPLES_KEY, message_array_bytes
from smallfed.flower.wire import MODEL, WireModel, message_objects


class DeviceClock(Layer):
    """Simulated device time: offline clients are not sent a message, stragglers are dropped."""

    def __init__(self, strategy: Strategy, clock: RoundClock, partitions: Partitions,
                 extra_bytes: Callable[[int], tuple[int, int]] | None = None,
                 examples_of: Callable[[int], int | None] | None = None,
                 wire: WireModel = MODEL) -> None:
        """``extra_bytes(node)``: (down, up) bytes the node exchanged this round besides
        the train message and reply (secure aggregation's keys and shares, charged as
        payload); ``examples_of(node)``: its example count where replies carry none
        (secure aggregation's replies count 1)."""
        super().__init__(strategy)
        self.clock = clock
        self.partitions = partitions
        self.extra_bytes = extra_bytes or (lambda node: (0, 0))
        self.examples_of = examples_of
        self.wire = wire

    def describe(self) -> str:
        deadline = self.clock.cfg.round_deadline_s
        return (f"devices {self.clock.cfg.devices!r}, round deadline "
                f"{f'{deadline:g} s' if deadline else 'none'}")

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        online = self.clock.online(server_round, list(grid.get_node_ids()), self.partitions.of)
        messages = list(self.strategy.configure_train(
            server_round, arrays, config, VisibleNodes(grid, online)))
        sizes = {m.metadata.dst_node_id: message_array_bytes(m)
                 + self.extra_bytes(m.metadata.dst_node_id)[0] for m in messages}
        self.clock.sent(sizes, {m.metadata.dst_node_id: self._receiving(m, sizes)
                                for m in messages})
        return messages

    def _receiving(self, message: Message, sizes: dict[int, int]) -> tuple[float, float, int]:
        """A node receiving its train message: wire bytes down and up, and round trips."""
        objects = message_objects(message)
        return (*self.wire.down(sizes[message.metadata.dst_node_id], objects),
                self.wire.round_trips(objects, pulled=True))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        kept = self.clock.finish(server_round, [self._arrival(r) for r in replies])
        if self.clock.last.dropped:
            log(INFO, "Round %d: %d stragglers past the %.1f s deadline dropped", server_round,
                self.clock.last.dropped, self.clock.cfg.round_deadline_s)
        return self.strategy.aggregate_train(
            server_round, [r for r in replies if r.metadata.src_node_id in kept])

    def _arrival(self, reply: Message) -> Arrival:
        examples, declined = 0.0, False
        if not reply.has_error():
            metrics = reply.content.metric_records.get(METRICS_KEY, {})
            value = metrics.get(NUM_EXAMPLES_KEY)
            examples = float(value) if positive_number(value) else 0.0
            declined = bool(metrics.get("declined"))
        node = reply.metadata.src_node_id
        if self.examples_of is not None and not declined:
            examples = float(self.examples_of(node) or 0)
        size = message_array_bytes(reply) + self.extra_bytes(node)[1]
        objects = message_objects(reply)
        return Arrival(node, self.partitions.of.get(node, -1), reply.has_error(), size,
                       examples, declined, (*self.wire.up(size, objects),
                                            self.wire.round_trips(objects, pulled=False)))

    def take_rows(self) -> list[ClientTime]:
        """The clients.csv rows of the rounds since the last call, in a fixed order."""
        rows = sorted(self.clock.rows, key=lambda row: (row.round, row.partition))
        self.clock.rows.clear()
        return rows

    def round_stats(self) -> dict[str, float]:
        last = self.clock.last
        return {"offline": last.offline, "dropped": last.dropped, "finished": last.finished,
                "sim_time_s": last.sim_time_s}
