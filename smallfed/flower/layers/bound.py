"""Bounded influence without privacy: no client moves the model more than a few others do.

Without DP nothing bounds an update, and one update scaled by 1e6 ruins the model for
good (every honest update then decodes against a poisoned model). This layer, below
the decoding, bounds each update's two levers on the average:

* its length: the update (the client's model minus the model it was sent) is scaled
  down to ``update-clip`` if longer; with ``update-clip = 0`` (the default) the bound
  follows the updates themselves: ``update-clip-factor`` times the median norm of the
  last rounds' updates. A minority of attackers moves a median little, so honest
  updates are rarely touched while a scaled one is cut to a few honest lengths.
* its weight: where the server cannot know how many examples a client holds (a real
  device), ``num-examples`` is capped at ``max-examples``, or at 4 times the round's
  median claim. (In simulation the partition size is known and a larger claim is
  rejected by the validation layer.)

Under ``privacy = "user"`` the DP layer clips every update to ``dp-clip`` already, and
this layer is not in the stack.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from smallfed.flower.layers.base import Layer
from smallfed.flower.layers.validate import KnownExamples
from smallfed.privacy.user_dp import l2_norm  # the DP clip's norm: one definition
from smallfed.flower.records import (
    ARRAYS_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    arrays_record,
    record_arrays,
)

MEDIAN_CLAIMS = 4.0  # an unknown client may claim at most this many times the median


class BoundUpdates(Layer):
    """Clips each update's norm (fixed, or a multiple of recent medians) and caps weights."""

    def __init__(self, strategy: Strategy, *, clip: float = 0.0, factor: float = 2.0,
                 window: int = 5, max_examples: int = 0,
                 known_examples: KnownExamples | None = None) -> None:
        super().__init__(strategy)
        self.clip, self.factor, self.window = clip, factor, window
        self.max_examples = max_examples
        self.known_examples = known_examples
        self.recent: list[list[float]] = []  # the update norms of the last rounds
        self.clipped = self.capped = 0
        self.bound: float | None = None  # the last round's norm bound
        self._global: dict[str, np.ndarray] = {}

    def describe(self) -> str:
        how = (f"update norm at most {self.clip:g}" if self.clip > 0 else
               f"update norm at most {self.factor:g} x the median of the last "
               f"{self.window} rounds")
        return f"{how}; unknown clients' num-examples capped"

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.clipped = self.capped = 0
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._global = record_arrays(messages[0].content[ARRAYS_KEY]) if messages else {}
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.cap_weights(server_round, replies)
        models = [record_arrays(r.content[ARRAYS_KEY]) for r in replies]
        deltas = [{k: m[k] - self._global[k] for k in self._global} for m in models]
        norms = [l2_norm(d) for d in deltas]
        self.bound = self.norm_bound(norms)
        for reply, delta, norm in zip(replies, deltas, norms):
            if self.bound is not None and norm > self.bound:
                self.clipped += 1
                scale = self.bound / norm
                reply.content[ARRAYS_KEY] = arrays_record({
                    k: (self._global[k] + delta[k] * scale).astype(self._global[k].dtype)
                    for k in delta})
                log(INFO, "Round %d: the update of node %d (norm %.4g) scaled to the bound "
                    "%.4g", server_round, reply.metadata.src_node_id, norm, self.bound)
        return self.strategy.aggregate_train(server_round, replies)

    def norm_bound(self, norms: list[float]) -> float | None:
        """This round's bound: the fixed clip, or factor x the median of recent norms."""
        if self.clip > 0:
            return self.clip
        if self.factor <= 0:
            return None
        if norms:
            self.recent = [*self.recent, norms][-self.window:]
        history = [n for round_norms in self.recent for n in round_norms]
        return self.factor * statistics.median(history) if history else None

    def cap_weights(self, server_round: int, replies: list[Message]) -> None:
        """num-examples of clients the server cannot check, capped (see the module doc)."""
        unknown = [r for r in replies if self.known_examples is None
                   or self.known_examples(r.metadata.src_node_id) is None]
        if not unknown:
            return
        claims = [float(r.content[METRICS_KEY][NUM_EXAMPLES_KEY]) for r in replies]
        cap = self.max_examples or MEDIAN_CLAIMS * statistics.median(claims)
        for reply in unknown:
            metrics = reply.content[METRICS_KEY]
            if metrics[NUM_EXAMPLES_KEY] > cap:
                log(INFO, "Round %d: node %d claims %g examples; counted as %g", server_round,
                    reply.metadata.src_node_id, metrics[NUM_EXAMPLES_KEY], cap)
                metrics[NUM_EXAMPLES_KEY] = cap
                self.capped += 1

    def round_stats(self) -> dict[str, float]:
        return {"clipped": self.clipped}

    def state(self) -> dict:
        return {"recent": self.recent}

    def restore(self, state: dict) -> None:
        self.recent = [[float(n) for n in norms] for norms in state["recent"]]
