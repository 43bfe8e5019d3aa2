"""Simulated time: what each sampled device would take, and who misses the deadline.

A client's round takes (all from its profile and what it really did)

    2 x latency x round trips + 8 x bytes received / downlink
    + training FLOPs / train_flops + 8 x bytes sent / uplink

where the bytes and round trips are the wire estimate's when the server layer gives
one (the payload with the transport's requests and framing, and the requests' round
trips: see :mod:`smallfed.flower.wire`), and otherwise the payload alone and one
round trip.
where training FLOPs = 6 x MACs a sample x local epochs x the samples it reported.
Before the round, each sampled device is online with its profile's availability
(drawn from ``(seed, round, partition)``); offline ones are never sent a message.
After it, a reply whose time passes ``round-deadline-s`` is a straggler's and is
dropped (its work is not used). The round's simulated time is the deadline when
anyone was dropped (the server waited for it), else the slowest finisher's time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from smallfed.config import Config
from smallfed.devices.population import profile_of


@dataclass(frozen=True)
class ClientTime:
    """One sampled client in one round (a row of clients.csv)."""

    round: int
    partition: int
    device: str
    status: str  # finished, declined, dropped (past the deadline), offline, failed
    bytes_down: int
    bytes_up: int
    bytes_down_wire_est: int
    bytes_up_wire_est: int
    compute_s: float
    transfer_s: float
    total_s: float


CLIENT_FIELDS = tuple(ClientTime.__dataclass_fields__)


@dataclass(frozen=True)
class Arrival:
    """A train reply as the clock sees it."""

    node: int
    partition: int
    failed: bool
    bytes_up: int
    examples: float
    declined: bool = False
    wire: tuple[float, float, int] | None = None  # sending the reply: down, up, round trips


@dataclass
class RoundTime:
    sim_time_s: float = 0.0
    finished: int = 0
    dropped: int = 0
    offline: int = 0


class RoundClock:
    """The server's simulated clock over a device population."""

    def __init__(self, cfg: Config, flops_per_sample: float) -> None:
        self.cfg = cfg
        self.flops_per_sample = flops_per_sample
        self.rows: list[ClientTime] = []
        self.last = RoundTime()
        # node -> payload, and receiving it: wire bytes down, up, round trips
        self._down: dict[int, tuple[int, float, float, int]] = {}

    def online(self, server_round: int, nodes: list[int], partition_of: dict[int, int]
               ) -> list[int]:
        """The sampled nodes that are online this round; the others are logged offline."""
        self.last, self._down = RoundTime(), {}
        kept = []
        for node in nodes:
            pid = partition_of[node]
            profile = profile_of(self.cfg, pid)
            draw = np.random.default_rng([self.cfg.seed, server_round, pid, 19]).random()
            if profile is None or draw < profile.availability:
                kept.append(node)
                continue
            self.last.offline += 1
            self.rows.append(ClientTime(server_round, pid, profile.name, "offline", 0, 0, 0, 0,
                                        0.0, 0.0, 0.0))
        return kept

    def sent(self, bytes_down: dict[int, int],
             wire: dict[int, tuple[float, float, int]] | None = None) -> None:
        """Bytes each node was sent this round, and what receiving them cost on the wire
        (down, up, round trips); without ``wire`` the payload and one round trip."""
        self._down = {node: (size, *(wire[node] if wire else (size, 0.0, 1)))
                      for node, size in bytes_down.items()}

    def finish(self, server_round: int, arrivals: list[Arrival]) -> set[int]:
        """The nodes whose replies arrive before the deadline; the round's time and rows."""
        kept, times = set(), []
        deadline = self.cfg.round_deadline_s
        for arrival in arrivals:
            profile = profile_of(self.cfg, arrival.partition)
            if profile is None:
                kept.add(arrival.node)
                continue
            down, wire_down, wire_up, trips = self._down.get(arrival.node, (0, 0.0, 0.0, 1))
            reply_down, reply_up, reply_trips = arrival.wire or (0.0, arrival.bytes_up, 0)
            wire_down, wire_up = wire_down + reply_down, wire_up + reply_up
            compute = (self.flops_per_sample * self.cfg.local_epochs * max(arrival.examples, 0.0)
                       / profile.train_flops)
            transfer = (2 * profile.latency_s * (trips + reply_trips)
                        + 8 * wire_down / profile.downlink_bps + 8 * wire_up / profile.uplink_bps)
            total = compute + transfer
            late = deadline > 0 and total > deadline and not arrival.failed
            status = ("failed" if arrival.failed else "dropped" if late
                      else "declined" if arrival.declined else "finished")
            self.rows.append(ClientTime(server_round, arrival.partition, profile.name, status,
                                        down, arrival.bytes_up, round(wire_down),
                                        round(wire_up), round(compute, 6),
                                        round(transfer, 6), round(total, 6)))
            if late:
                self.last.dropped += 1
                continue
            kept.add(arrival.node)  # failed replies too: the strategy counts them
            if status == "finished":
                self.last.finished += 1
            if not arrival.failed:
                times.append(total)
        self.last.sim_time_s = deadline if self.last.dropped else max(times, default=0.0)
        return kept
