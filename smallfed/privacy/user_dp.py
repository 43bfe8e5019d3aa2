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

Secure mode (``dp-secure-rng``): the sampling and the noise come from the OS's CSPRNG
(:class:`smallfed.privacy.secure.SecureRandom`), and the noisy sum is computed on an
integer grid with an exact discrete Gaussian, which no floating-point attack on the
sampler can reach: each update is clipped a little below C, rounded to the grid
``g = z*C / 2**16`` and checked in integers to have norm at most ``2**16 / z`` grid
steps; the integer sum plus the integer noise is the mechanism's output, and scaling
it back to floats is post-processing (:mod:`smallfed.privacy.secure` has the argument).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from flwr.supercore.differential_privacy import compute_adaptive_noise_params

from smallfed.config import Config, ConfigError
from smallfed.privacy.local_dp import budget, epsilon_of
from smallfed.privacy.secure import (
    GRID_BITS,
    SecureRandom,
    discrete_gaussian,
    grid_step,
    rounding_slack,
)

Update = dict[str, np.ndarray]


def l2_norm(update: Update) -> float:
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in update.values()))


def clip(update: Update, max_norm: float) -> Update:
    """The update scaled down to L2 norm ``max_norm`` if it is longer, as float32.

    Guaranteed: ``l2_norm(clip(u, C)) <= C`` for every finite update (norms as
    :func:`l2_norm` computes them). Casting to float32 after scaling can lengthen the
    update by about 1e-7 relative, so the result is measured again after the cast and
    scaled down once more when it is over; each retry shrinks the scale by more than
    the cast can add back, so the loop ends (in practice after at most one retry).
    """
    with np.errstate(over="ignore"):
        norm = l2_norm(update)
    if math.isinf(norm):  # float64 values whose squares overflow: measure them rescaled
        peak = max((float(np.max(np.abs(v))) for v in update.values() if v.size), default=0.0)
        if math.isfinite(peak) and peak > 0:
            update = {k: np.asarray(v, np.float64) / peak for k, v in update.items()}
            norm = l2_norm(update)
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    for _ in range(100):
        out = {k: (v * scale).astype(np.float32) for k, v in update.items()}
        after = l2_norm(out)
        if not after > max_norm:  # also lets a NaN update through, as before: it is rolled back
            return out
        scale *= max_norm / after * (1 - 2.0**-20)
    raise RuntimeError(f"clip: could not bring the update under {max_norm}")  # unreachable


@dataclass(frozen=True)
class GaussianAverage:
    """The noisy average of clipped updates: sum + N(0, (z*C)^2), divided by m.

    ``secure``: the sum is an integer vector on the grid ``g = z*C / 2**GRID_BITS`` and
    the noise an exact discrete Gaussian of scale ``2**GRID_BITS`` grid steps from the
    OS's CSPRNG (``rng`` is then not used). Each update is clipped to
    ``C - sqrt(d)*g/2`` before it is rounded to the grid, and its integer norm is
    checked exactly, so one client moves the integer sum by at most ``2**GRID_BITS / z``
    grid steps: noise ``z`` times the sensitivity, as the accountant assumes.
    """

    clip: float
    noise_multiplier: float
    expected_clients: float
    secure: bool = False

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on each coordinate of the average."""
        return self.noise_multiplier * self.clip / self.expected_clients

    def __call__(self, updates: list[Update], template: Update, rng: np.random.Generator,
                 support: dict[str, np.ndarray] | None = None) -> Update:
        """``support``: the round's shared subspace (True = in it), where all updates live;
        the sum is exactly zero outside it, so only its coordinates are noised."""
        if self.secure and self.noise_multiplier * self.clip > 0:
            return self._secure(updates, template, support or {})
        total = {k: np.zeros_like(v, dtype=np.float64) for k, v in template.items()}
        for update in updates:
            for k, v in clip(update, self.clip).items():
                total[k] += v
        sigma = self.noise_multiplier * self.clip
        out = {}
        for k, v in total.items():
            noise = rng.normal(0.0, sigma, v.shape)
            if support and k in support:
                noise *= support[k]
            out[k] = ((v + noise) / self.expected_clients).astype(np.float32)
        return out

    def _secure(self, updates: list[Update], template: Update,
                support: dict[str, np.ndarray]) -> Update:
        step = grid_step(self.noise_multiplier * self.clip)
        dimension = sum(v.size for v in template.values())
        inner = (self.clip - rounding_slack(dimension, step)) * (1 - 1e-9)
        if inner <= 0:
            raise ValueError(f"secure noise: {dimension} coordinates on a grid of {step:g} "
                             f"leave no room under the clip {self.clip:g}")
        total = {k: np.zeros(v.shape, np.int64) for k, v in template.items()}
        for update in updates:
            ints = self._on_grid(update, inner, step)
            if ints is None:  # as the float path does: a NaN aggregate, which is rolled back
                return {k: np.full(v.shape, np.nan, np.float32) for k, v in template.items()}
            for k, v in ints.items():
                total[k] += v
        noise = discrete_gaussian(2**GRID_BITS, dimension)
        out, start = {}, 0
        for k, v in total.items():
            draw = noise[start:start + v.size].reshape(v.shape)
            start += v.size
            noisy = v + (draw * support[k] if k in support else draw)
            out[k] = (step * noisy.astype(np.float64) / self.expected_clients).astype(np.float32)
        return out

    def _on_grid(self, update: Update, max_norm: float, step: float) -> Update | None:
        """The update clipped to ``max_norm`` and rounded to the grid, as integers whose
        L2 norm, checked exactly, is at most 2**GRID_BITS / z (C in grid steps); None for
        an update that is not finite."""
        clipped = clip(update, max_norm)
        if not all(np.isfinite(v).all() for v in clipped.values()):
            return None
        limit = Fraction(4**GRID_BITS) / Fraction(self.noise_multiplier) ** 2
        scale = 1.0
        while True:
            ints = {k: np.rint(v.astype(np.float64) * scale / step).astype(np.int64)
                    for k, v in clipped.items()}
            if sum(_sum_of_squares(v) for v in ints.values()) <= limit:
                return ints
            scale *= 1 - 1e-6  # only float rounding could bring this here


def _sum_of_squares(values: np.ndarray) -> int:
    """Exactly: in int64 when it cannot overflow, else in Python integers."""
    if values.size == 0:
        return 0
    peak = int(np.max(np.abs(values)))
    if peak * peak * values.size < 2**62:
        return int(np.sum(values * values))
    return int(np.sum(values.astype(object) ** 2))


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
        if cfg.dp_secure_rng and cfg.dp_reproducible:
            raise ConfigError(SECURE_AND_REPRODUCIBLE)
        # OS entropy: the noise must stay secret. Secure mode: the OS's CSPRNG itself.
        self._secret_rng: np.random.Generator | SecureRandom = (
            SecureRandom() if cfg.dp_secure_rng else np.random.default_rng())

    def rng(self, server_round: int) -> np.random.Generator | SecureRandom:
        """The generator of this round's client sampling and noise.

        Secret (OS entropy) unless ``dp-reproducible``: with a known seed the noise
        could be regenerated and subtracted, and the sampled clients recomputed. With
        ``dp-secure-rng``, a :class:`SecureRandom` that reads the OS's CSPRNG.
        """
        if self.cfg.dp_reproducible:
            return np.random.default_rng([self.cfg.seed, server_round, 3])
        return self._secret_rng

    @property
    def mechanism(self) -> GaussianAverage:
        """This round's noisy average, at the current clip."""
        return GaussianAverage(self.clip_norm, self.update_noise, self.expected_clients,
                               secure=self.cfg.dp_secure_rng)

    def adapt_clip(self, updates: list[Update],
                   rng: np.random.Generator | SecureRandom) -> None:
        """Move the clip towards the target quantile of the norms (adaptive mode only)."""
        if self.cfg.dp_clip_mode != "adaptive":
            return
        # Each client adds b - 1/2 (b = 1 if left unclipped), so one client moves the
        # count by at most 1/2: the sensitivity the noise split of Andrew et al. assumes.
        unclipped = sum(bool(l2_norm(u) <= self.clip_norm) for u in updates)
        if isinstance(rng, SecureRandom):
            # In integers: twice the centred count moves by at most 1, and its noise is
            # an exact discrete Gaussian of twice the standard deviation.
            doubled = 2 * unclipped - len(updates)
            noisy = (doubled + int(discrete_gaussian(Fraction(2 * self.count_stddev)))) / 2
        else:
            noisy = unclipped - 0.5 * len(updates) + rng.normal(0.0, self.count_stddev)
        share = noisy / self.expected_clients + 0.5
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


SECURE_AND_REPRODUCIBLE = (
    "dp-secure-rng: secure mode draws noise no seed can repeat, and dp-reproducible draws "
    "it from the run's seed; set one of them to false")


def user_noise(cfg: Config) -> float:
    """``dp-noise``, or the noise that spends ``dp-target-epsilon`` in the planned rounds
    (calibrated once per key, then read from the disk cache of
    :mod:`smallfed.privacy.calibration`)."""
    from smallfed.privacy.calibration import noise_multiplier

    if cfg.dp_target_epsilon <= 0:
        return cfg.dp_noise
    return noise_multiplier(cfg.dp_target_epsilon, cfg.dp_delta,
                            cfg.clients_per_round / cfg.num_clients, cfg.num_server_rounds,
                            cfg.dp_accountant)
