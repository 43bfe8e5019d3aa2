"""User-level DP-FedAvg (McMahan et al. 2018): clip each client's update, noise the sum.

The server samples clients by Poisson sampling with rate q = clients-per-round /
num-clients, clips each decoded update to L2 norm C (``dp-clip``), sums them, adds
Gaussian noise of standard deviation z*C (``dp-noise``) to the sum, and divides by
the expected number of clients m = q*N. One client changes the sum by at most C, so
the average has sensitivity C/m and noise z*C/m: the subsampled Gaussian mechanism
that Opacus's accountants compose over rounds (history: (z, q, 1) a round).

Why the clip happens on the server, after decoding: a codec stage can grow a clipped
update's norm (stochastic quantisation moves values anywhere in their block's range),
so a client-side clip would not bound what the server adds up. Clipping what is
actually aggregated makes the bound hold for any codec. The guarantee is central DP:
it protects each client's participation against anyone who sees the released models,
and assumes the server itself is trusted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from flwr.supercore.differential_privacy import compute_adaptive_noise_params

from smallfed.config import Config
from smallfed.privacy.local_dp import budget, epsilon_of

Update = dict[str, np.ndarray]


def l2_norm(update: Update) -> float:
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in update.values()))


def clip(update: Update, max_norm: float) -> Update:
    """The update scaled down to L2 norm ``max_norm`` if it is longer."""
    norm = l2_norm(update)
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {k: (v * scale).astype(np.float32) for k, v in update.items()}


@dataclass(frozen=True)
class GaussianAverage:
    """The noisy average of clipped updates: sum + N(0, (z*C)^2), divided by m."""

    clip: float
    noise_multiplier: float
    expected_clients: float

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on each coordinate of the average."""
        return self.noise_multiplier * self.clip / self.expected_clients

    def __call__(self, updates: list[Update], template: Update, rng: np.random.Generator) -> Update:
        total = {k: np.zeros_like(v, dtype=np.float64) for k, v in template.items()}
        for update in updates:
            for k, v in clip(update, self.clip).items():
                total[k] += v
        sigma = self.noise_multiplier * self.clip
        return {k: ((v + rng.normal(0.0, sigma, v.shape)) / self.expected_clients).astype(
            np.float32) for k, v in total.items()}


class UserLevelDP:
    """The server's side of DP-FedAvg: the mechanism, the sampling rate, the accountant.

    With adaptive clipping (Andrew et al. 2021) the clip C moves each round towards
    the ``dp-clip-quantile`` of the update norms: C <- C * exp(-lr * (f - quantile)),
    where f is the share of updates left unclipped, counted with Gaussian noise. The
    count's noise and the update's noise together spend what noise z alone would:
    Flower's ``compute_adaptive_noise_params`` splits z (the paper's Theorem 1), and
    the accountant composes z.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.sample_rate = cfg.clients_per_round / cfg.num_clients
        self.expected_clients = float(cfg.clients_per_round)  # q * N
        self.noise = user_noise(cfg)
        self.clip_norm = cfg.dp_clip
        self.count_stddev, self.update_noise = 0.0, self.noise
        if cfg.dp_clip_mode == "adaptive":
            self.count_stddev, self.update_noise = compute_adaptive_noise_params(
                self.noise, self.expected_clients, cfg.dp_clip_count_stddev or None)
        self.history: list[tuple[float, float, int]] = []
        self.epsilon = 0.0  # of the rounds in history; the accountant is slow, so kept
        self.budget = budget(cfg)
        self._secret_rng = np.random.default_rng()  # OS entropy: the noise must stay secret

    def rng(self, server_round: int) -> np.random.Generator:
        """The generator of this round's client sampling and noise.

        Secret (OS entropy) unless ``dp-reproducible``: with a known seed the noise
        could be regenerated and subtracted, and the sampled clients recomputed.
        """
        if self.cfg.dp_reproducible:
            return np.random.default_rng([self.cfg.seed, server_round, 3])
        return self._secret_rng

    @property
    def mechanism(self) -> GaussianAverage:
        """This round's noisy average, at the current clip."""
        return GaussianAverage(self.clip_norm, self.update_noise, self.expected_clients)

    def adapt_clip(self, updates: list[Update], rng: np.random.Generator) -> None:
        """Move the clip towards the target quantile of the norms (adaptive mode only)."""
        if self.cfg.dp_clip_mode != "adaptive":
            return
        # Each client adds b - 1/2 (b = 1 if left unclipped), so one client moves the
        # count by at most 1/2: the sensitivity the noise split of Andrew et al. assumes.
        centred = sum((l2_norm(u) <= self.clip_norm) - 0.5 for u in updates)
        share = (centred + rng.normal(0.0, self.count_stddev)) / self.expected_clients + 0.5
        self.clip_norm *= math.exp(-self.cfg.dp_clip_lr * (share - self.cfg.dp_clip_quantile))

    def state(self) -> dict:
        """The accountant's history and the clip, for a checkpoint (JSON)."""
        return {"history": self.history, "clip_norm": self.clip_norm, "epsilon": self.epsilon}

    def restore(self, state: dict) -> None:
        self.history = [(float(z), float(q), int(n)) for z, q, n in state["history"]]
        self.clip_norm = float(state["clip_norm"])
        self.epsilon = float(state["epsilon"])

    def start_round(self) -> tuple[bool, float]:
        """Account for one more round if the budget allows: (allowed, epsilon after it)."""
        after = epsilon_of(self.cfg, [*self.history, (self.noise, self.sample_rate, 1)])
        if after > self.budget:
            return False, after
        self.history.append((self.noise, self.sample_rate, 1))
        self.epsilon = after
        return True, after


def user_noise(cfg: Config) -> float:
    """``dp-noise``, or the noise that spends ``dp-target-epsilon`` in the planned rounds."""
    from opacus.accountants.utils import get_noise_multiplier  # 2 s: only when DP is on

    if cfg.dp_target_epsilon <= 0:
        return cfg.dp_noise
    return get_noise_multiplier(
        target_epsilon=cfg.dp_target_epsilon, target_delta=cfg.dp_delta,
        sample_rate=cfg.clients_per_round / cfg.num_clients, steps=cfg.num_server_rounds,
        accountant=cfg.dp_accountant,
    )
