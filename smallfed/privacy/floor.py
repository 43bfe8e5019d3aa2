"""A device's own privacy floor: what its owner allows, whatever the server's config says.

Sample-level DP exists to protect a device's data from the server, yet the privacy
level, budget, noise and delta all arrive in the server's run config. A device that
sets a floor in its node config (``smallfed edge start --dp-max-epsilon ...``) checks
every training request against it and declines, saying why, when the run asks for
less privacy:

* ``dp-max-epsilon``: the most its ledger may reach, over every run on its data,
  counted with the PRV accountant at the device's own delta, whatever accountant and
  delta the run names (a larger delta would let the same ledger show a smaller epsilon);
* ``dp-min-noise``: the smallest noise multiplier it accepts;
* ``dp-max-delta``: the largest delta it accepts (1e-5 unless set).

Setting any of them also means: train only under ``privacy = "sample"``, never with
``dp-reproducible`` (a known seed lets the server regenerate and subtract the noise),
and never evaluate on this data (evaluation metrics are not noised or accounted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from smallfed.config import Config
from smallfed.privacy.local_dp import History, epsilon_of

FLOOR_KEYS = ("dp-max-epsilon", "dp-min-noise", "dp-max-delta")


@dataclass(frozen=True)
class DeviceFloor:
    """The least privacy this device accepts."""

    max_epsilon: float = math.inf
    min_noise: float = 0.0
    max_delta: float = 1e-5

    @classmethod
    def of(cls, node_config: Any) -> DeviceFloor | None:
        """The floor the node config sets, None if it sets none; ValueError on nonsense."""
        values = {}
        for key in FLOOR_KEYS:
            if key not in node_config:
                continue
            raw = node_config[key]
            try:
                value = float(raw)
            except (TypeError, ValueError):
                value = math.nan
            if not math.isfinite(value) or value < 0 or (key != "dp-min-noise" and value <= 0):
                raise ValueError(f"node config {key} = {raw!r}: must be a positive number; "
                                 "fix this SuperNode's --node-config")
            values[key.removeprefix("dp-").replace("-", "_")] = value
        return cls(**values) if values else None

    @staticmethod
    def mode_refusal(cfg: Config) -> str:
        """Why this device will not train in ``cfg``'s privacy mode at all, or ''."""
        if cfg.privacy == "sample":
            return ""
        return (f"this device trains only under sample-level DP (its node config sets a "
                f"privacy floor); the run asks privacy = '{cfg.privacy}'")

    def refusal(self, cfg: Config, history: History, step: tuple[float, float, int]) -> str:
        """Why the run's request falls below this floor, or '' when it does not."""
        if reason := self.mode_refusal(cfg):
            return reason
        if cfg.dp_reproducible:
            return ("the run draws its DP noise from its seed (dp-reproducible), which lets "
                    "the server regenerate and remove it; this device's floor refuses that")
        if cfg.dp_delta > self.max_delta:
            return f"the run's dp-delta {cfg.dp_delta:g} is above this device's {self.max_delta:g}"
        if step[0] < self.min_noise:
            return (f"the run's noise multiplier {step[0]:.4g} is below this device's "
                    f"minimum of {self.min_noise:g}")
        own = cfg.replace(dp_accountant="prv", dp_delta=self.max_delta)
        after = epsilon_of(own, [*history, step])
        if after > self.max_epsilon:
            return (f"training this round would take this device's epsilon to {after:.3f} "
                    f"(PRV, delta {self.max_delta:g}), past its own maximum of {self.max_epsilon:g}")
        return ""
