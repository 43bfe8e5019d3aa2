"""A poisoned model never freezes a run: a non-finite aggregate is rolled back.

Bounded updates make this rare, but an aggregate can still overflow (a strategy of
one's own, huge weights, a bug). Without this layer the model would hold NaN or
infinity for good: every later honest update decodes against it and is rejected, and
every later round fails. Here the round is undone instead: the model stays as it was,
the strategies below get back the state they had before the round (FedAvgM's momentum
would otherwise keep the infinity), and the log names the largest replies.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from logging import ERROR

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from smallfed.flower.layers.base import Layer, stack
from smallfed.flower.records import ARRAYS_KEY


class RollbackNonFinite(Layer):
    """Undoes a round whose aggregate holds NaN or infinity, naming the largest replies."""

    def __init__(self, strategy: Strategy) -> None:
        super().__init__(strategy)
        self.rolled_back = 0

    def describe(self) -> str:
        return "a non-finite aggregate is rolled back"

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        before = snapshot(self.strategy)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is None or all(np.isfinite(a.numpy()).all() for a in arrays.values()):
            self.rolled_back = 0
            return arrays, metrics
        for part, saved in before:
            vars(part).clear()
            vars(part).update(saved)
        self.rolled_back = 1
        largest = sorted(replies, key=_largest_value, reverse=True)[:3]
        log(ERROR, "Round %d rolled back: the aggregate holds NaN or infinity; the model stays "
            "as it was. Largest replies: %s", server_round, ", ".join(
                f"node {r.metadata.src_node_id} (|value| up to {_largest_value(r):.3g})"
                for r in largest))
        return None, None

    def round_stats(self) -> dict[str, float]:
        return {"rolled_back": self.rolled_back}


def snapshot(strategy: Strategy) -> list[tuple[Strategy, dict]]:
    """Every attribute of every strategy below, copied (a layer's link to the next one is
    kept as it is): attributes that were None before the round (FedAvgM's momentum in
    round 1) come back as None."""
    return [(part, {k: v if k == "strategy" and isinstance(part, Layer) else copy.deepcopy(v)
                    for k, v in vars(part).items()}) for part in stack(strategy)]


def _largest_value(reply: Message) -> float:
    return max((float(np.abs(a.numpy()).max(initial=0.0))
                for a in reply.content[ARRAYS_KEY].values()), default=0.0)
