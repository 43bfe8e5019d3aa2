"""User-level DP-FedAvg on the server (McMahan et al. 2018), as a layer.

The mechanism and its accountant are :class:`smallfed.privacy.user_dp.UserLevelDP`;
this layer applies them to a round. Before the round it asks the accountant whether
one more round fits the budget: if not, nobody is sent anything and the model stays.
After it, DP-FedAvg's step (each decoded update clipped, the sum noised, divided by the
expected number of clients) replaces the aggregation of the strategy below, which only
builds the round's messages: a median or Krum's selection has another sensitivity
than the one the accountant composes. The clip happens here, after decoding, so the
bound holds whatever a codec did to an update's norm. Poisson sampling, which the
accountant assumes, is the sampling layer's (with this layer's secret generator).

With ``strategy = "fedavgm"`` the noised average is a pseudo-gradient for server
momentum (DP-FedAvgM): v <- momentum * v + average, model <- model + server-lr * v.
It uses only released values, so it is post-processing: the guarantee is unchanged,
and the momentum averages the noise of several rounds away.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from smallfed.flower.layers.base import Layer
from smallfed.flower.records import ARRAYS_KEY, arrays_record, record_arrays
from smallfed.privacy.subspace import round_subspace
from smallfed.privacy.user_dp import UserLevelDP


class UserLevelDPLayer(Layer):
    """DP-FedAvg: clipped updates, a noised sum, an accountant that stops at the budget."""

    def __init__(self, strategy: Strategy, dp: UserLevelDP, server_lr: float = 1.0,
                 momentum: float = 0.0) -> None:
        super().__init__(strategy)
        self.dp = dp
        self.server_lr, self.momentum = server_lr, momentum
        self._velocity: dict[str, np.ndarray] = {}
        self.aggregated = 0
        self._global: dict[str, np.ndarray] = {}  # empty: the round was skipped
        self._support: dict[str, np.ndarray] = {}  # the round's shared subspace, if any

    def describe(self) -> str:
        secure = (", secure noise (exact discrete Gaussian, OS CSPRNG)"
                  if self.dp.cfg.dp_secure_rng else "")
        return (f"clip {self.dp.clip_norm:g} ({self.dp.cfg.dp_clip_mode}), noise multiplier "
                f"{self.dp.noise:.4g}, budget {self.dp.budget:g}{secure}")

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.aggregated, self._global = 0, {}
        allowed, after = self.dp.start_round()
        if not allowed:
            log(WARNING, "Round %d skipped: it would take epsilon to %.3f, past the budget "
                "of %.3f; no more training", server_round, after, self.dp.budget)
            return []
        self._global = record_arrays(arrays)
        self._support = round_subspace(config, {k: v.shape for k, v in self._global.items()})
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """DP-FedAvg's step: global + noisy average of clipped deltas (noise even with none)."""
        if not self._global:
            return None, None
        replies = list(replies)
        self.aggregated = len(replies)
        deltas = []
        for reply in replies:
            model = record_arrays(reply.content[ARRAYS_KEY])
            deltas.append({k: model[k] - self._global[k] for k in self._global})
        rng = self.dp.rng(server_round)
        clip_norm = self.dp.clip_norm
        average = self.dp.mechanism(deltas, self._global, rng, self._support)
        self.dp.adapt_clip(deltas, rng)
        log(INFO, "Round %d: DP-FedAvg over %d clients, clip %.4g (next %.4g), noise std %.4g",
            server_round, len(replies), clip_norm, self.dp.clip_norm,
            self.dp.update_noise * clip_norm / self.dp.expected_clients)
        if self.momentum:
            self._velocity = {k: self.momentum * self._velocity.get(k, 0.0) + v
                              for k, v in average.items()}
            average = self._velocity
        new = {k: (self._global[k] + self.server_lr * average[k]).astype(self._global[k].dtype)
               for k in average}
        return arrays_record(new), MetricRecord({"clients": len(replies), "dp-clip": clip_norm})

    def round_stats(self) -> dict[str, float]:
        return {"aggregated": self.aggregated}

    def epsilon(self) -> tuple[float, float]:
        """Every client has the same guarantee: the server's accountant's."""
        return self.dp.epsilon, self.dp.epsilon

    def privacy(self) -> dict:
        """The server's mechanism and how many rounds its accountant composed."""
        return {"noise_multiplier": self.dp.noise, "sample_rate": self.dp.sample_rate,
                "rounds_accounted": len(self.dp.history), "epsilon": self.dp.epsilon}

    def state(self) -> dict:
        return {"user_dp": self.dp.state(), "velocity": self._velocity}

    def restore(self, state: dict) -> None:
        self.dp.restore(state["user_dp"])
        self._velocity = dict(state.get("velocity", {}))
