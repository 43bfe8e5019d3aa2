"""Distributed DP for secure aggregation: the distributed discrete Gaussian (DDG).

Kairouz, Liu and Steinke (2021, "The Distributed Discrete Gaussian Mechanism for
Federated Learning with Secure Aggregation", ICML, arXiv:2102.06387), as TensorFlow
Federated's ``DistributedDpSumFactory`` and google-research/federated's
``distributed_dp/`` ship it. Each client turns its model update into d integers modulo
2^b and adds its own share of the noise; secure aggregation (SecAgg+) reveals only the
sum modulo 2^b, which the server decodes. No one, the server included, sees an update
without the noise of at least ``min_survivors`` clients on it.

The pipeline (:meth:`IntegerEncoding.encode`) and why each step
---------------------------------------------------------------
1. **Clip** to L2 norm C: bounds one client's influence, as in central DP-FedAvg.
2. **Randomized Hadamard rotation** (seeded by public randomness, the same for every
   client of a round): a random permutation and random signs, then an orthonormal
   Walsh-Hadamard transform on blocks whose sizes are the powers of two in d's binary
   expansion (no padding: exactly d coordinates go on the wire). The map is orthogonal,
   so norms are unchanged, and it *flattens*: a coordinate of a block of size m is a
   random-sign sum whose variance is ``|x_B|^2 / m`` (x_B: the coordinates the
   permutation put in the block), on average ``|x|^2 / d``. Without it, one large
   coordinate would force a coarse grid or many bits; with it, the sum of n clients
   needs about ``log2(2k * n * C / (gamma * sqrt(d)))`` bits per coordinate.
   Small blocks flatten less: a spike that the permutation sends into a block of size
   m (probability m/d) stays ``1/sqrt(m)`` of its size instead of ``1/sqrt(d)``. This
   costs only the modular-wrap probability of that coordinate (utility), never privacy;
   dense model updates spread over all blocks in proportion.
3. **Scale** by ``1/gamma`` (``scale`` is gamma, the grid step): C becomes ``c = C/gamma``
   integer units.
4. **Conditional randomized rounding**: each coordinate rounds up with
   probability its fractional part (unbiased), redrawn until the rounded vector's norm
   is at most ``sensitivity = min(c + sqrt(d), sqrt(c^2 + d/4 + sqrt(2 ln(1/beta)) *
   (c + sqrt(d)/2)))`` (their Theorem 1's bound, ``accounting_utils.
   rounded_l2_norm_bound``). A draw passes with probability at least 1 - beta (about
   0.39 at beta = exp(-0.5)), and the check is exact (integers), so the bound holds for
   every output: it is the L2 sensitivity the noise is calibrated to, slightly above c.
   The coin flips come from the OS's CSPRNG: they are part of the mechanism.
5. **Noise**: each client adds ``discrete_gaussian(noise_std, d)``, an exact sample of
   N_Z(0, noise_std^2) drawn from OS entropy (:mod:`smallfed.privacy.secure`).
6. **Wrap** modulo 2^b: SecAgg masks and sums in the ring Z/2^b, so the values it takes
   must be residues. Wrapping is a deterministic function of the integer sum, and the
   server's centred lift back to [-2^(b-1), 2^(b-1)) is exact while the sum stays in
   range; :func:`plan_encoding` picks gamma so that it does with k_stddevs of margin.

What the accountant is told, and why that is sound
--------------------------------------------------
With n clients' shares in the sum the noise is a sum of n independent N_Z(0, s^2)
(s = ``noise_std``), which is not itself a discrete Gaussian. Kairouz et al.'s
analysis of such sums (their Theorem 1, in the Renyi form of their Proposition 14 /
Eq. 17 as ``accounting_utils.compute_rdp_dgaussian`` implements it; its third term
is the one used here) bounds the mechanism
``X -> X + Y`` on integer vectors of L2 sensitivity Delta by
``D_alpha <= (alpha / 2) * (Delta / (sqrt(n) s) + tau sqrt(d))^2`` for all alpha > 1,
with ``tau = 10 * sum_{k=1}^{n-1} exp(-2 pi^2 s^2 k / (k + 1))``. That is the Renyi
curve of the Gaussian mechanism with noise multiplier
``z' = 1 / (1/z + tau sqrt(d))``, ``z = sqrt(n) s / Delta``. :meth:`IntegerEncoding.
noise_multiplier` returns z' and refuses (ValueError) when the tau term changes it by
more than 1e-6 relative (``z tau sqrt(d) > 1e-6``): then the per-round zCDP parameter
``1/(2 z'^2)`` is within 2e-6 relative of the central mechanism's at z. With the noise
plan_encoding picks, tau is below 1e-20. In Renyi terms the distributed mechanism is
then no worse than the central Gaussian mechanism at z', so z' (at the number of
survivors, at least ``min_survivors``) goes into the same accountant as central DP.

Poisson subsampling of clients is argued exactly as :mod:`smallfed.privacy.secure`
argues it for one discrete Gaussian, and the argument carries over unchanged: Opacus's
RDP bound at an integer order alpha expands binomially into ``E_P[(Q/P)^k] =
exp((k - 1) D_k(Q || P))`` for k <= alpha with positive weights, so any mechanism whose
unsampled Renyi curve is at most the Gaussian's at z' (above) gets at most the
subsampled Gaussian's value at z'. Same caveats as there: integer orders of the
direction Opacus computes, not fractional orders, the reverse direction or PRV.

Assumptions the guarantee rests on
----------------------------------
* **At least min_survivors clients' noise is in every released sum.** Each client adds
  only ``1/sqrt(min_survivors)`` of the noise the sum needs, so the secure-aggregation
  protocol must refuse to unmask a sum of fewer clients (SecAgg+'s reconstruction
  threshold); dropouts above that only add noise. ``noise_multiplier(survivors)`` is the
  multiplier of the sum actually released.
* **Neighbouring rounds differ in one participant's update** (replaced by any vector of
  norm <= C, e.g. zero), with that participant's noise share present in both: the
  analysis above (Kairouz et al.'s, and TFF's) is a shift of a fixed noise
  distribution. A client that is absent also withholds its noise share, so under the
  add/remove relation the noise variance itself changes by a factor (n + 1)/n; against
  an adversary that knows every other update exactly that is worth about d/(4 n^2) nats
  of KL per round (d = 13802, n = 67: 0.77), which the Gaussian accountant does not
  count. This gap is not closed here: like Kairouz et al. and TFF, the accounting
  treats an absent client as a participant with a zero update.
* **Amplification by sampling needs a secret sample.** The server that runs SecAgg
  learns which clients took part, so against the server itself only the unsampled
  guarantee (sample rate 1) holds; the subsampled epsilon protects against those who
  see only the released models, as in central DP (``dp-publish-sample``).
* The rounding and noise randomness stay secret on the client; the rotation seed is
  public. Timing side channels (retries, rejection sampling) are not covered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from smallfed.privacy.secure import discrete_gaussian, secure_uniform

MAX_INFLATION = 1.1  # the rounded sensitivity may exceed the clip by at most 10% (float units)
TAU_TOLERANCE = 1e-6  # relative change of the noise multiplier the tau term may cause
NOISE_BITS = 12  # plan_encoding rounds the noise std up to this many significant bits
# The clip in integer units is capped: the rotation's float error (~1e-14 relative) must
# stay far below the rounding bound's slack over the clip (>= 1/2 unit), or the exact
# norm check would reject every draw; a finer grid gains nothing measurable anyway.
_MAX_UNITS = 2.0**40
_MAX_NOISE_STD = 2.0**40  # discrete_gaussian's limit
_MAX_ROUNDING_TRIES = 1000  # each passes with probability >= 1 - beta; see encode


# --------------------------------------------------------------------------- rotation

def _block_sizes(dimension: int) -> list[int]:
    """The powers of two in ``dimension``'s binary expansion, largest first."""
    return [1 << k for k in reversed(range(dimension.bit_length())) if dimension >> k & 1]


def _hadamard_blocks(x: np.ndarray) -> np.ndarray:
    """The orthonormal Walsh-Hadamard transform of each power-of-two block of x.

    H/sqrt(m) is symmetric and orthogonal, hence its own inverse: the same function
    rotates and unrotates. Butterflies on a (blocks, 2, h) view, one numpy pass a level.
    """
    out = np.empty_like(x)
    start = 0
    for m in _block_sizes(x.size):
        y = x[start:start + m]
        h = 1
        while h < m:
            y = y.reshape(-1, 2, h)
            y = np.stack((y[:, 0] + y[:, 1], y[:, 0] - y[:, 1]), axis=1)
            h *= 2
        out[start:start + m] = y.reshape(m) / math.sqrt(m)
        start += m
    return out


def _permutation_and_signs(dimension: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Public randomness of the rotation: a seeded permutation and random signs."""
    rng = np.random.default_rng(seed)
    return rng.permutation(dimension), rng.integers(0, 2, dimension) * 2.0 - 1.0


def rotate(x: np.ndarray, seed: int) -> np.ndarray:
    """The randomized Hadamard rotation: permute, flip signs, Hadamard per block."""
    perm, signs = _permutation_and_signs(x.size, seed)
    return _hadamard_blocks(np.asarray(x, np.float64)[perm] * signs)


def unrotate(y: np.ndarray, seed: int) -> np.ndarray:
    """The inverse of :func:`rotate` (its transpose: the map is orthogonal)."""
    perm, signs = _permutation_and_signs(y.size, seed)
    x = np.empty(y.size, np.float64)
    x[perm] = _hadamard_blocks(np.asarray(y, np.float64)) * signs
    return x


# --------------------------------------------------------------------------- rounding

def rounded_norm_bound(units: float, beta: float, dimension: int) -> float:
    """The L2 norm bound, in integer units, after conditional randomized rounding of a
    vector of norm at most ``units`` (Kairouz et al. 2021, Theorem 1 / Proposition 22;
    ``accounting_utils.rounded_l2_norm_bound``)."""
    bound = units + math.sqrt(dimension)  # every coordinate moves by less than 1
    if beta == 0:
        return bound
    squared = (units**2 + dimension / 4
               + math.sqrt(2 * math.log(1 / beta)) * (units + math.sqrt(dimension) / 2))
    return min(bound, math.sqrt(squared))


def _squared_norm(v: np.ndarray) -> int:
    """``sum(v**2)`` exactly, as a Python integer (int64 squares would overflow)."""
    a = np.abs(v).astype(np.uint64)
    if a.size < 2**32 and int(a.max(initial=0)) < 2**32:  # squares < 2^64; sum halves
        sq = a * a
        high = int(np.sum(sq >> np.uint64(32), dtype=np.uint64))
        low = int(np.sum(sq & np.uint64(0xFFFFFFFF), dtype=np.uint64))
        return (high << 32) + low
    big = v.astype(object)
    return int(np.dot(big, big))


# --------------------------------------------------------------------------- the encoding

@dataclass(frozen=True)
class IntegerEncoding:
    """Clip -> randomized Hadamard rotation -> scale -> conditional randomized rounding
    -> (+ discrete Gaussian noise) -> wrap mod 2^bits. See the module docstring."""

    dimension: int  # d: float coordinates in, integers out (no padding)
    clip: float  # L2 clip C applied before rotation
    bits: int  # b: values wrap modulo 2^b (1..62)
    scale: float  # gamma: one integer unit is gamma in float units
    noise_std: float  # per-client discrete Gaussian std in integer units (0: no noise)
    beta: float = math.exp(-0.5)  # conditional rounding's bias

    def __post_init__(self) -> None:
        if self.dimension < 1:
            raise ValueError(f"dimension must be >= 1, got {self.dimension}")
        if not 1 <= self.bits <= 62:
            raise ValueError(f"bits must be in 1..62, got {self.bits}")
        if not (self.clip > 0 and self.scale > 0 and math.isfinite(self.clip / self.scale)):
            raise ValueError("clip and scale must be finite and > 0")
        if self.clip / self.scale > _MAX_UNITS:
            raise ValueError(f"clip / scale = {self.clip / self.scale:g} integer units is "
                             "beyond float64's precision (2^40 at most): use a coarser scale")
        if not 0 <= self.noise_std <= _MAX_NOISE_STD:
            raise ValueError(f"noise_std must be in [0, 2^40], got {self.noise_std}")
        if not 0 <= self.beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {self.beta}")

    @property
    def sensitivity(self) -> float:
        """L2 norm bound of one client's rounded integer vector (before noise), in
        integer units: the clip ``C / gamma`` inflated by the rounding (encode checks it
        exactly). Changing one client's update moves the integer sum by at most this."""
        return rounded_norm_bound(self.clip / self.scale, self.beta, self.dimension)

    def noise_multiplier(self, survivors: int) -> float:
        """The noise multiplier z' the accountant may compose for a sum of ``survivors``
        clients' encodings: ``sqrt(survivors) * noise_std / sensitivity``, lowered by
        Kairouz et al.'s tau term to ``1 / (1/z + tau sqrt(d))`` (module docstring).

        Raises ValueError when the tau term would change it by more than 1e-6 relative
        (too little noise per client for the sum to behave like one discrete Gaussian).
        0 when there is no noise.
        """
        if survivors < 1:
            raise ValueError(f"survivors must be >= 1, got {survivors}")
        if self.noise_std == 0:
            return 0.0
        z = math.sqrt(survivors) * self.noise_std / self.sensitivity
        s2 = float(self.noise_std) ** 2
        tau = 10 * math.fsum(math.exp(-2 * math.pi**2 * s2 * k / (k + 1))
                             for k in range(1, survivors))
        if z * tau * math.sqrt(self.dimension) > TAU_TOLERANCE:
            raise ValueError(
                f"noise_std {self.noise_std:g} is too small for the sum of {survivors} "
                f"discrete Gaussians to count as one (tau = {tau:.3g} at dimension "
                f"{self.dimension}): use a finer scale (more bits) so each client's noise "
                "is at least a few integer units")
        return 1 / (1 / z + tau * math.sqrt(self.dimension))

    def encode(self, vector: np.ndarray, rotation_seed: int) -> np.ndarray:
        """float vector of length d -> uint64 residues in [0, 2^bits) of length d:
        clipped, rotated, scaled, conditionally rounded, noised, wrapped."""
        x = np.asarray(vector, np.float64).reshape(-1)
        if x.size != self.dimension:
            raise ValueError(f"expected {self.dimension} values, got {x.size}")
        norm = float(np.linalg.norm(x))
        if not math.isfinite(norm):
            raise ValueError("the vector has non-finite values")
        if norm > self.clip:
            x = x * (self.clip / norm)
        y = rotate(x, rotation_seed) / self.scale
        total = self._round(y)
        if self.noise_std > 0:
            total += discrete_gaussian(Fraction(self.noise_std), self.dimension)
        return np.mod(total, np.int64(1) << self.bits).astype(np.uint64)

    def _round(self, y: np.ndarray) -> np.ndarray:
        """Randomized rounding with OS randomness, redrawn until ``|r|^2 <= sensitivity^2``
        holds in exact integers. The cap on tries is a safety net: a clipped input passes
        each try with probability >= 1 - beta, so 1000 failures (chance < beta^1000) mean
        float error beyond the bound's slack, not bad luck."""
        floor = np.floor(y)
        fraction = y - floor
        floor = floor.astype(np.int64)
        bound = math.floor(Fraction(self.sensitivity) ** 2)
        for _ in range(_MAX_ROUNDING_TRIES):
            rounded = floor + (secure_uniform(y.size) < fraction)
            if _squared_norm(rounded) <= bound:
                return rounded
        raise RuntimeError("conditional rounding failed 1000 times: the input was not "
                           "within the clip")

    def decode_sum(self, total: np.ndarray, rotation_seed: int) -> np.ndarray:
        """The sum mod 2^bits of several clients' encodings -> the float sum of their
        clipped vectors plus their noise (centred lift, times gamma, inverse rotation).

        ``total`` may be any integer array congruent to that sum mod 2^bits, e.g. a plain
        uint64 sum that overflowed (2^bits divides 2^64). Exact while the true integer
        sum lies in [-2^(bits-1), 2^(bits-1)); a coordinate outside wraps around.
        """
        t = np.asarray(total).reshape(-1)
        if t.size != self.dimension:
            raise ValueError(f"expected {self.dimension} values, got {t.size}")
        residues = t.astype(np.uint64) & np.uint64((1 << self.bits) - 1)
        lifted = residues.astype(np.int64)
        lifted[lifted >= 1 << (self.bits - 1)] -= 1 << self.bits
        return unrotate(lifted * self.scale, rotation_seed)


# --------------------------------------------------------------------------- planning

def _noise_grid(sigma: float) -> float:
    """sigma rounded *up* to NOISE_BITS significant bits: at most 0.05% more noise, and a
    dyadic rational with a small denominator, which the exact sampler draws ~3x faster."""
    if sigma == 0:
        return 0.0
    step = math.ldexp(1.0, math.frexp(sigma)[1] - NOISE_BITS)
    return math.ceil(sigma / step) * step


def _solve(dimension: int, clip: float, bits: int, noise_multiplier: float,
           min_survivors: int, max_clients: int, k_stddevs: float,
           beta: float) -> tuple[float, float] | None:
    """The largest clip in integer units c (and its noise std) whose sum fits, or None.

    Per coordinate, the sum of ``max_clients`` encodings has standard deviation about
    ``sqrt(n^2 c^2 / d + n / 4 + n s^2)`` (aligned updates of norm c flattened over d
    coordinates, rounding variance <= 1/4, noise s^2 each), as TFF's
    ``_heuristic_scale_factor`` models it; k_stddevs of it must fit in 2^(bits-1). The
    noise s grows with c (it is calibrated to the inflated sensitivity), so the fit is
    monotone in c: bisect. Accept only if the inflation is at most MAX_INFLATION.
    """
    n, half = max_clients, 2.0 ** (bits - 1)

    def noise(c: float) -> float:  # (1 + 1e-6): the tau allowance of noise_multiplier
        delta = rounded_norm_bound(c, beta, dimension) * (1 + TAU_TOLERANCE)
        return _noise_grid(noise_multiplier * delta / math.sqrt(min_survivors))

    def fits(c: float) -> bool:
        spread = n * n * c * c / dimension + n / 4 + n * noise(c) ** 2
        return k_stddevs * math.sqrt(spread) <= half

    high = min(_MAX_UNITS, half * math.sqrt(dimension) / (k_stddevs * n))  # signal alone
    low = high * 2.0**-80
    if not fits(low):
        return None
    for _ in range(200):
        mid = math.sqrt(low * high)
        low, high = (mid, high) if fits(mid) else (low, mid)
    if rounded_norm_bound(low, beta, dimension) > MAX_INFLATION * low:
        return None
    return low, noise(low)


def bits_needed(*, dimension: int, clip: float, noise_multiplier: float, min_survivors: int,
                max_clients: int, k_stddevs: float = 4.0, beta: float = math.exp(-0.5)) -> int:
    """The fewest bits plan_encoding accepts for these parameters (ValueError if none)."""
    for bits in range(1, 63):
        if _solve(dimension, clip, bits, noise_multiplier, min_survivors, max_clients,
                  k_stddevs, beta) is not None:
            return bits
    raise ValueError(f"no bit width up to 62 holds the sum of {max_clients} clients with "
                     f"noise multiplier {noise_multiplier} at dimension {dimension}")


def plan_encoding(*, dimension: int, clip: float, bits: int, noise_multiplier: float,
                  min_survivors: int, max_clients: int, k_stddevs: float = 4.0,
                  beta: float = math.exp(-0.5)) -> IntegerEncoding:
    """The finest grid gamma, and the per-client noise, such that

    (a) the sum of ``min_survivors`` clients' noise has multiplier >= noise_multiplier
        relative to the *inflated* sensitivity (``noise_multiplier(min_survivors) >=
        noise_multiplier``: the accountant's z is honoured), and
    (b) the sum of up to ``max_clients`` encodings, signal and noise, stays within
        [-2^(b-1), 2^(b-1)) with k_stddevs of margin per coordinate (TFF's choice of
        scale; for updates the rotation spreads evenly, every term is subgaussian and a
        coordinate wraps with probability about 2 exp(-k^2/2) at most: 6.7e-4 at k = 4,
        6.3e-5 if the sum is close to Gaussian).

    The finest grid satisfying (b) minimises the rounding error and the inflation. A
    noise multiplier of 0 means no DP: no noise, gamma from the signal range only.
    ValueError when the bits cannot hold the sum without inflating the sensitivity
    beyond MAX_INFLATION times the clip, naming the bit width that would.
    """
    if dimension < 1 or clip <= 0 or noise_multiplier < 0 or k_stddevs <= 0:
        raise ValueError("need dimension >= 1, clip > 0, noise_multiplier >= 0, k_stddevs > 0")
    if not 1 <= min_survivors <= max_clients:
        raise ValueError(f"need 1 <= min_survivors ({min_survivors}) <= max_clients "
                         f"({max_clients})")
    if not 1 <= bits <= 62:
        raise ValueError(f"bits must be in 1..62, got {bits}")
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    solved = _solve(dimension, clip, bits, noise_multiplier, min_survivors, max_clients,
                    k_stddevs, beta)
    if solved is None:
        needed = bits_needed(dimension=dimension, clip=clip, noise_multiplier=noise_multiplier,
                             min_survivors=min_survivors, max_clients=max_clients,
                             k_stddevs=k_stddevs, beta=beta)
        raise ValueError(
            f"bits={bits} cannot hold the sum of {max_clients} clients with noise multiplier "
            f"{noise_multiplier} at dimension {dimension} ({k_stddevs:g} standard "
            f"deviations of margin) without the rounding inflating the sensitivity beyond "
            f"{MAX_INFLATION}x the clip: use bits >= {needed}")
    units, noise_std = solved
    encoding = IntegerEncoding(dimension=dimension, clip=clip, bits=bits, scale=clip / units,
                               noise_std=noise_std, beta=beta)
    encoding.noise_multiplier(min_survivors)  # the tau check: raises if not negligible
    return encoding


def unamplified_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon of ``rounds`` releases of the sum, none subsampled, at ``delta``.

    What holds against a server that knows who took part (amplification by sampling
    needs the sample to be secret). What is proved for the distributed discrete Gaussian
    is a Renyi bound (see the module docstring): each round is (1 / (2 z^2))-zCDP, and
    the rounds add up to rho = rounds / (2 z^2). That is converted to (epsilon, delta)
    with Canonne, Kamath and Steinke's (2020, Prop. 12) conversion from Renyi DP,
    minimised over the order: tighter than rho + 2 sqrt(rho log(1/delta)), and above the
    continuous Gaussian's exact value, which the sum is not proved to match.
    """
    from scipy.optimize import minimize_scalar

    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    rho = rounds / (2 * noise_multiplier**2)

    def epsilon(log_order: float) -> float:
        alpha = 1 + math.exp(log_order)
        return (alpha * rho + (math.log(1 / delta) + (alpha - 1) * math.log(1 - 1 / alpha)
                               - math.log(alpha)) / (alpha - 1))

    best = minimize_scalar(epsilon, bounds=(-10.0, 12.0), method="bounded",
                           options={"xatol": 1e-9})
    return max(0.0, float(best.fun))
