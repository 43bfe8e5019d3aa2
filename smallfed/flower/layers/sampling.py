"""Who trains each round: nodes sampled by partition id, with a generator seeded by round.

Flower's node ids are random on every run and its strategies sample them with the
global ``random`` module, so two runs with the same seed would train different
clients. :class:`Partitions` asks each node once for its partition id (a ``query``
message); :class:`PartitionSampling` draws partition ids with numpy's generator seeded
by ``(seed, round)`` and shows the strategy below it a Grid of only those nodes. Replies
come back up sorted by partition, so float sums are identical run to run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from smallfed.flower.grids import ForwardingGrid
from smallfed.flower.layers.base import Layer
from smallfed.flower.records import METRICS_KEY


class VisibleNodes(ForwardingGrid):
    """A view of a Grid that shows only some nodes to the strategy below."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        super().__init__(grid)
        self._node_ids = node_ids

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)


def reported_partition(reply: Message) -> int:
    """The partition id a query reply reports; -1 for none or nonsense."""
    if reply.has_error():
        return -1
    value = reply.content.metric_records.get(METRICS_KEY, {}).get("partition-id", -1)
    return int(value) if isinstance(value, (int, float)) and 0 <= value < 2**31 else -1


class Partitions:
    """Node id -> partition id, learned by asking each node once.

    Shared by the layers that need a node's place in the population (sampling, the
    device clock, reply order); it is not a layer itself.
    """

    def __init__(self, clients_per_round: int, wait_for_nodes_s: float = 600.0) -> None:
        self.clients_per_round = clients_per_round
        self.wait_for_nodes_s = wait_for_nodes_s
        self.of: dict[int, int] = {}
        self.reported: set[int] = set()  # nodes that told their partition id (simulation)

    def discover(self, grid: Grid) -> dict[int, int]:
        """Map node id -> partition id of the connected nodes, asking only new ones.

        Nodes that report no partition id (a real device with only a data folder) get
        the next free ids in node-id order, so the mapping is still deterministic.
        """
        deadline = time.monotonic() + self.wait_for_nodes_s
        # Wait for a full round of nodes before the first round only: later, a device
        # that died or went offline must not stall the federation (the round goes on
        # with the nodes that are there; a returning node joins the next one).
        needed = self.clients_per_round if not self.of else 1
        while len(node_ids := list(grid.get_node_ids())) < needed:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(node_ids)} nodes connected after {self.wait_for_nodes_s:.0f} s; "
                    f"clients-per-round needs {self.clients_per_round}")
            log(INFO, "Waiting for nodes: %d of %d connected", len(node_ids), needed)
            time.sleep(1.0)
        unknown = sorted(n for n in node_ids if n not in self.of)
        if unknown:
            self._ask(grid, unknown)
        return {n: self.of[n] for n in node_ids if n in self.of}

    def _ask(self, grid: Grid, nodes: list[int]) -> None:
        queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY)
                   for n in nodes]
        unassigned = []
        # As long as a round may wait: on Ray the first replies wait for actors to start.
        for reply in grid.send_and_receive(queries, timeout=self.wait_for_nodes_s):
            node = reply.metadata.src_node_id
            pid = reported_partition(reply)
            if pid >= 0 and pid not in self.of.values():
                self.of[node] = pid
                self.reported.add(node)
            else:
                unassigned.append(node)
        next_free = max(self.of.values(), default=-1) + 1
        for offset, node in enumerate(sorted(unassigned)):
            self.of[node] = next_free + offset

    def order(self, replies: Iterable[Message]) -> list[Message]:
        """Replies in partition order (a stable order for float sums)."""
        return sorted(replies, key=lambda m: self.of.get(m.metadata.src_node_id, 0))


# (round) -> the generator of that round's Poisson draw (user-level DP keeps it secret).
PoissonRng = Callable[[int], np.random.Generator]


class PartitionSampling(Layer):
    """Samples nodes by partition id, seeded by round; replies come back in partition order."""

    def __init__(
        self, strategy: Strategy, partitions: Partitions, *, clients_per_round: int,
        fraction_evaluate: float, seed: int, poisson: tuple[float, PoissonRng] | None = None,
    ) -> None:
        """``poisson`` = (rate, rng): sample every client independently with that rate,
        the sampling user-level DP's accountant assumes, instead of a fixed count."""
        super().__init__(strategy)
        self.partitions = partitions
        self.clients_per_round = clients_per_round
        self.fraction_evaluate = fraction_evaluate
        self.seed = seed
        self.poisson = poisson
        self.sampled = 0

    def describe(self) -> str:
        how = (f"Poisson, rate {self.poisson[0]:.4g}" if self.poisson
               else f"{self.clients_per_round} a round")
        return f"clients sampled by partition id ({how}, seed {self.seed})"

    def sample(self, grid: Grid, server_round: int, count: int, purpose: int) -> list[int]:
        """Node ids chosen by partition id with a generator seeded by the round."""
        available = self.partitions.discover(grid)
        by_partition = sorted(available, key=available.__getitem__)
        if self.poisson is not None and purpose == 0:
            rate, rng = self.poisson
            picked = rng(server_round).random(len(by_partition)) < rate
            return [node for node, keep in zip(by_partition, picked) if keep]
        rng = np.random.default_rng([self.seed, server_round, purpose])
        chosen = rng.choice(len(by_partition), size=min(count, len(by_partition)), replace=False)
        return [by_partition[i] for i in sorted(chosen)]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        nodes = self.sample(grid, server_round, self.clients_per_round, purpose=0)
        messages = list(self.strategy.configure_train(
            server_round, arrays, config, VisibleNodes(grid, nodes)))
        self.sampled = len(messages)  # the layers below may send to fewer (offline, budget)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, self.partitions.order(replies))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fraction_evaluate <= 0:
            return []
        count = max(1, round(self.fraction_evaluate * len(list(grid.get_node_ids()))))
        nodes = self.sample(grid, server_round, count, purpose=1)
        return self.strategy.configure_evaluate(
            server_round, arrays, config, VisibleNodes(grid, nodes))

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, self.partitions.order(replies))

    def round_stats(self) -> dict[str, float]:
        return {"sampled": self.sampled}


class RoundOffset(Layer):
    """Numbers rounds after a resume's: round k of the resumed loop is round done + k."""

    def __init__(self, strategy: Strategy, done: int = 0) -> None:
        super().__init__(strategy)
        self.done = done

    def describe(self) -> str:
        return f"rounds numbered from {self.done + 1}"

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round + self.done, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round + self.done, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.done, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self.done, replies)
