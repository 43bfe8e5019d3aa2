"""Replies checked one by one: a bad reply is logged and dropped, and the round goes on.

Flower's FedAvg raises on the first inconsistent reply and stops the run. Here:

* :class:`AdmitReplies` lets in one reply per node sent a message this round, and
  none larger than an update of this model and codec can be (checked on the sizes of
  the arrays' bytes, before anything is copied or decoded);
* :class:`ClientReports` reads what clients report about themselves: the epsilon
  their DP-SGD accountant has spent, and replies that decline to train (privacy
  budget spent, too little memory), which are counted and go no further;
* :class:`ValidateReplies` counts failed replies (errors) and rejects replies whose
  records are not the one ArrayRecord and one MetricRecord of an update, or whose
  ``num-examples`` is not a positive finite number, or more than the server knows
  the client holds (its partition, in simulation);
* :class:`Quorum`, just above the aggregating strategy, refuses a round with fewer than
  ``min-replies`` usable updates (the global model stays as it was) and trims the
  replies' metrics to the finite numbers every reply has.

What an update's arrays must hold depends on its codec: the decoding layer checks them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any
from logging import ERROR, INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from smallfed.flower.layers.base import Layer
from smallfed.flower.layers.sampling import Partitions
from smallfed.flower.records import (
    ARRAYS_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    message_array_bytes,
)

# node id -> the most examples the server knows it holds, or None where it cannot know.
KnownExamples = Callable[[int], int | None]


def positive_number(value: object) -> bool:
    return isinstance(value, (int, float)) and 0 < value < math.inf


def reject(server_round: int, reply: Message, problem: str) -> None:
    """Log why a reply's update is not used, naming its node."""
    log(WARNING, "Round %d: rejected the update of node %d: %s", server_round,
        reply.metadata.src_node_id, problem)


def keep_common_metrics(replies: list[Message]) -> None:
    """Reduce each reply's metrics to the keys whose value is a finite number in every reply.

    Flower's FedAvg raises (and stops the run) when replies carry different metric
    keys or lists of different lengths; one odd client must not do that.
    """
    records = [r.content[METRICS_KEY] for r in replies]
    common = set.intersection(*({k for k, v in m.items() if finite_number(v)}
                                for m in records)) if records else set()
    for reply, metrics in zip(replies, records):
        reply.content[METRICS_KEY] = MetricRecord({k: metrics[k] for k in common})


def finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


class ClientReports(Layer):
    """Notes each client's reported epsilon and mechanism; declining replies stop here.

    The server never lowers a client's epsilon: a client that reports less than before
    (a device whose ledger was lost, or a hostile one) keeps the largest value it ever
    reported, so results.json cannot under-report.
    """

    MECHANISM = {"noise-multiplier": "noise_multiplier", "dp-sample-rate": "sample_rate",
                 "dp-steps": "steps_per_round", "dp-rounds": "rounds_trained"}

    def __init__(self, strategy: Strategy, partitions: Partitions | None = None,
                 note_epsilons: bool = True) -> None:
        """``note_epsilons``: only under sample-level DP do clients spend privacy; under
        user-level DP the server's own accountant is the only one."""
        super().__init__(strategy)
        self.partitions = partitions
        self.note_epsilons = note_epsilons
        self.epsilons: dict[int, float] = {}  # partition id -> the largest epsilon reported
        self.mechanisms: dict[int, dict[str, float]] = {}  # partition id -> its last mechanism
        self.declined = 0

    def describe(self) -> str:
        return "clients' reported epsilons and declines"

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.declined = 0
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(
            server_round, [r for r in replies if not self._declined(server_round, r)])

    def _declined(self, server_round: int, reply: Message) -> bool:
        if reply.has_error() or METRICS_KEY not in reply.content.metric_records:
            return False
        metrics = reply.content.metric_records[METRICS_KEY]
        node = reply.metadata.src_node_id
        if self.note_epsilons:
            self._note(self.partitions.of.get(node, node) if self.partitions else node, metrics)
        if not metrics.get("declined"):
            return False
        self.declined += 1
        status = reply.content.config_records.get("status", {})
        log(INFO, "Round %d: node %d declined: %s", server_round, node,
            status.get("reason", "no reason given"))
        return True

    def _note(self, place: int, metrics: MetricRecord) -> None:
        value = metrics.get("epsilon")
        if finite_number(value) and value >= 0:
            self.epsilons[place] = max(float(value), self.epsilons.get(place, 0.0))
        mechanism = {name: float(metrics[key]) for key, name in self.MECHANISM.items()
                     if finite_number(metrics.get(key))}
        if len(mechanism) == len(self.MECHANISM):
            self.mechanisms[place] = mechanism

    def round_stats(self) -> dict[str, float]:
        return {"declined": self.declined}

    def epsilon(self) -> tuple[float, float] | None:
        """(largest, mean) over every client that has reported one, or None."""
        if not self.epsilons:
            return None
        values = list(self.epsilons.values())
        return max(values), math.fsum(values) / len(values)  # fsum: order-independent

    def privacy(self) -> dict[str, Any] | None:
        """Per client: the mechanism it last reported and the largest epsilon."""
        if not self.note_epsilons:
            return None
        return {"clients": {
            str(place): {**{k: int(v) if k in ("steps_per_round", "rounds_trained") else v
                            for k, v in self.mechanisms.get(place, {}).items()},
                         "epsilon": epsilon}
            for place, epsilon in sorted(self.epsilons.items())}}

    def state(self) -> dict:
        return {"epsilons": {str(k): v for k, v in self.epsilons.items()},
                "mechanisms": {str(k): v for k, v in self.mechanisms.items()}}

    def restore(self, state: dict) -> None:
        self.epsilons = {int(k): float(v) for k, v in state["epsilons"].items()}
        self.mechanisms = {int(k): dict(v) for k, v in state.get("mechanisms", {}).items()}


class AdmitReplies(Layer):
    """One update per node sent a message, none larger than an update can be.

    Error replies pass: they carry nothing to aggregate, and the one Flower makes for a
    node that stopped answering comes from the SuperLink (node 1), not from the node.
    """

    def __init__(self, strategy: Strategy, max_reply_bytes: int) -> None:
        super().__init__(strategy)
        self.max_reply_bytes = max_reply_bytes
        self.rejected = 0
        self._sent: set[int] = set()  # nodes sent a train message this round

    def describe(self) -> str:
        return f"one reply per node sent a message, at most {self.max_reply_bytes:,} bytes"

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.rejected = 0
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._sent = {m.metadata.dst_node_id for m in messages}
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        admitted, seen = [], set()
        for reply in replies:
            if reply.has_error():  # no update in it; Flower's own come from the SuperLink
                admitted.append(reply)
                continue
            node = reply.metadata.src_node_id
            size = message_array_bytes(reply)  # the arrays' byte lengths: nothing copied
            problem = ("it was sent no message this round" if node not in self._sent
                       else "a second reply this round" if node in seen
                       else f"{size:,} bytes, more than an update of this model and codec "
                            f"({self.max_reply_bytes:,})" if size > self.max_reply_bytes
                       else None)
            seen.add(node)
            if problem:
                self.rejected += 1
                reject(server_round, reply, problem)
            else:
                admitted.append(reply)
        return self.strategy.aggregate_train(server_round, admitted)

    def round_stats(self) -> dict[str, float]:
        return {"rejected": self.rejected}


class ValidateReplies(Layer):
    """Drops failed replies, and updates that are not one ArrayRecord, one MetricRecord."""

    def __init__(self, strategy: Strategy, known_examples: KnownExamples | None = None,
                 required_metrics: tuple[str, ...] = ()) -> None:
        """``required_metrics``: metrics the strategy below needs, finite and >= 0 (q-FedAvg's
        train-loss)."""
        super().__init__(strategy)
        self.known_examples = known_examples
        self.required_metrics = required_metrics
        self.failed = self.rejected = 0

    def describe(self) -> str:
        return "failed and malformed replies dropped, the round goes on"

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.failed = self.rejected = 0
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        good = []
        for reply in replies:
            if reply.has_error():
                self.failed += 1
                reason = (reply.error.reason or "no reason given").strip().splitlines()
                log(WARNING, "Round %d: node %d failed: %s", server_round,
                    reply.metadata.src_node_id, reason[0] if reason else "no reason given")
            elif problem := (check_envelope(reply) or self.check_examples(reply)
                             or self.check_required(reply)):
                self.rejected += 1
                reject(server_round, reply, problem)
            else:
                good.append(reply)
        return self.strategy.aggregate_train(server_round, good)

    def check_required(self, reply: Message) -> str | None:
        metrics = reply.content[METRICS_KEY]
        for name in self.required_metrics:
            value = metrics.get(name)
            if not (finite_number(value) and value >= 0):
                return f"the strategy needs '{name}', a finite number >= 0; got {value!r}"
        return None

    def check_examples(self, reply: Message) -> str | None:
        """Does the reply claim more examples than the server knows the client holds?"""
        known = self.known_examples(reply.metadata.src_node_id) if self.known_examples else None
        claimed = reply.content[METRICS_KEY][NUM_EXAMPLES_KEY]
        if known is not None and claimed > known:
            return f"claims {claimed:g} examples, its partition holds {known}"
        return None

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Evaluation replies: one MetricRecord of finite numbers, no arrays, an example
        count the server can believe; what Flower's aggregation raises ends the round's
        evaluation, not the run."""
        good = [r for r in replies if not r.has_error() and not self.check_evaluation(r)]
        keep_common_metrics(good)
        if not good:
            return None
        try:
            return self.strategy.aggregate_evaluate(server_round, good)
        except Exception as err:  # pylint: disable=broad-exception-caught
            log(ERROR, "Round %d: federated evaluation not aggregated (%s: %s)", server_round,
                type(err).__name__, err)
            return None

    def check_evaluation(self, reply: Message) -> str | None:
        content = reply.content
        if content.array_records or set(content.metric_records) != {METRICS_KEY}:
            return f"expected one MetricRecord '{METRICS_KEY}', got {list(content.keys())}"
        weight = content[METRICS_KEY].get(NUM_EXAMPLES_KEY)
        if not positive_number(weight):
            return f"'{NUM_EXAMPLES_KEY}' must be a positive finite number, got {weight!r}"
        return self.check_examples(reply)

    def round_stats(self) -> dict[str, float]:
        return {"failed": self.failed, "rejected": self.rejected}


def check_envelope(reply: Message) -> str | None:
    """Why a train reply is not an update's records, or None if it is."""
    content = reply.content
    if set(content.array_records) != {ARRAYS_KEY} or set(content.metric_records) != {
            METRICS_KEY}:
        return (f"expected one ArrayRecord '{ARRAYS_KEY}' and one MetricRecord "
                f"'{METRICS_KEY}', got {list(content.keys())}")
    if content.config_records:
        return f"an update carries no ConfigRecord, got {list(content.config_records)}"
    weight = content[METRICS_KEY].get(NUM_EXAMPLES_KEY)
    if not positive_number(weight):
        return f"'{NUM_EXAMPLES_KEY}' must be a positive finite number, got {weight!r}"
    return None


class Quorum(Layer):
    """Aggregates only with at least min-replies usable updates, trimmed to common metrics."""

    def __init__(self, strategy: Strategy, min_replies: int = 1) -> None:
        super().__init__(strategy)
        self.min_replies = min_replies
        self.aggregated = 0

    def describe(self) -> str:
        return f"a round needs {self.min_replies} usable updates"

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.aggregated = 0
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if len(replies) < self.min_replies:
            log(ERROR, "Round %d failed: %d usable updates, min-replies is %d; the global "
                "model stays as it was", server_round, len(replies), self.min_replies)
            return None, None
        keep_common_metrics(replies)
        try:
            result = self.strategy.aggregate_train(server_round, replies)
        except Exception as err:  # pylint: disable=broad-exception-caught
            # Whatever a strategy raises on replies it cannot use must not end the run.
            log(ERROR, "Round %d failed: the strategy could not aggregate (%s: %s); the "
                "global model stays as it was", server_round, type(err).__name__, err)
            return None, None
        self.aggregated = len(replies)
        return result

    def round_stats(self) -> dict[str, float]:
        return {"aggregated": self.aggregated}
