"""Secure mode (``dp-secure-rng``): DP noise and DP sampling that resist two practical attacks.

Why this module exists
----------------------
1. **Floating-point attacks on Gaussian samplers.** A textbook sampler turns uniform
   floats into Gaussian floats (Box-Muller, polar, Ziggurat). The set of floats it can
   output is sparse and irregular, and ``x + noise`` rounds differently for different
   ``x``: from one released value an attacker can often tell which of two neighbouring
   inputs it came from, so the mechanism is not DP at all. Mironov (2012) showed it for
   the Laplace mechanism; Jin, McMurtry, Rubinstein and Ohrimenko (2021, "Are we there
   yet? Timing and floating-point attacks on differential privacy systems",
   arXiv:2112.05307) mounted such attacks on the Gaussian mechanisms of DP libraries,
   Opacus among them; Holohan and Braghin (2021, "Secure random sampling in
   differential privacy", arXiv:2107.10138) study the attacks and a mitigation (the one
   Opacus's ``secure_mode`` implements, which still samples floats). The defence used
   here is the exact one: never let floats touch the randomness. The noise is an
   *exact* sample of the discrete Gaussian N_Z(0, s^2) (Canonne, Kamath and Steinke
   2020, "The Discrete Gaussian for Differential Privacy", arXiv:2004.00010, their
   Algorithms 1-3), drawn with integer and rational arithmetic only; the value it is
   added to is first rounded to the same integer grid, the sum is an exact integer,
   and only then is it scaled back to floats. Scaling, dividing by the expected count
   and casting to float32 are deterministic functions of that integer vector, that is
   post-processing, which cannot weaken DP.
2. **Predictable generators.** numpy's PCG64 and torch's Mersenne Twister are fast
   statistical generators, not cryptographic ones: from enough outputs their state can
   be recovered and every later draw (the noise, the Poisson sample) predicted. Secure
   mode reads every random bit from the operating system's CSPRNG (``os.urandom``, and
   ``secrets`` for the rare big integers), never seeded. This replaces Opacus's own
   ``secure_mode``, which needs ``torchcsprng``; that package has no build for torch
   2.13.

The grid, and what is guaranteed
--------------------------------
:func:`secure_gaussian_noise` returns ``g * Z`` with ``Z ~ N_Z(0, 2^(2k))`` exactly and
the grid step ``g = sigma / 2^k`` (``k = GRID_BITS = 16`` by default), so the noise has
the scale sigma the accountant assumes, in units of g exactly ``s = 2^k``. The
mechanisms in smallfed then work in integer units of g:

* The value to be noised is rounded to the grid, ``X = rint(x / g)``, and the integer
  ``X + Z`` is released (scaled back by g). Rounding moves each coordinate by at most
  g/2, so a vector clipped to ``C - sqrt(d) * g / 2`` (d coordinates) still has norm
  at most C after rounding; :func:`rounding_slack` gives that margin. User-level
  DP-FedAvg rounds each clipped client update and checks the bound in exact integer
  arithmetic (``||X||^2 * z^2 <= 4^k``), so one client moves the integer sum by at
  most ``Delta = C / g = 2^k / z`` in L2, and the noise is ``s = 2^k = z * Delta``:
  the same ratio z the accountant composes. Where only a sum of clipped vectors is at
  hand (DP-SGD's per-sample gradients, see :func:`use_secure_noise`), the sum is
  rounded once; two neighbouring sums then differ after rounding by at most
  ``||x_j|| + sqrt(d) * g``, so the per-sample clip is lowered by ``sqrt(d) * g``.
  With k = 16 the margin is ``sqrt(d) * z * C / 2^17`` (d = 50,000: 0.17% of C at
  z = 1) and costs nothing measurable.
* For integer sensitivity Delta, the discrete Gaussian satisfies the same
  concentrated-DP / Renyi-DP bound as the continuous Gaussian with the same sigma:
  ``Delta^2 / (2 s^2)``-zCDP, i.e. ``D_alpha <= alpha * Delta^2 / (2 s^2)`` for every
  alpha > 1 (CKS 2020, Sec. 2). For vectors of independent coordinates the Renyi
  divergences add, so an integer shift of L2 norm Delta gives the same bound: the
  vector mechanism is as private as the continuous Gaussian it replaces. Without
  subsampling, every epsilon computed from that curve holds.
* Subsampling: argued, not proved. smallfed's accountants (Opacus ``prv``, ``rdp``,
  ``gdp``) compose the Poisson-subsampled *continuous* Gaussian. Opacus's RDP bound is
  ``E_P[(1 - q + q Q/P)^alpha]`` with ``Q/P = exp((2<x,Delta> - |Delta|^2) / (2 s^2))``
  (shifting a discrete Gaussian by an integer vector keeps its normaliser). At integer
  alpha a binomial expansion turns it into moment generating functions with positive
  weights, and the discrete Gaussian's are at most the continuous one's
  (``E e^{tZ} <= e^{t^2 s^2 / 2}``, the subgaussianity bound of CKS 2020), so that
  divergence is at most the continuous value. This is our argument, not a published
  theorem; it does not cover fractional orders, the reverse divergence (which Mironov
  et al. 2019 show is never the worse one for the continuous Gaussian), or the
  PRV/PLD accountants. At s = 2^16 grid steps we expect any difference to be far below
  the accountants' own numerical error, but we have no proof of that.
* Sampling. :func:`secure_poisson` keeps an item when a 53-bit secure uniform is below
  the rate: the probability is ``ceil(q * 2^53) / 2^53``, within 2^-53 of q.
* Not covered: timing side channels (the rejection samplers' running time depends on
  the values drawn; Jin et al. also describe timing attacks), and float rounding
  inside Opacus's per-sample clipping and float32 summation (as in Opacus itself).

Cost: the sampler is vectorised rejection sampling in numpy with the random bits from
``os.urandom``; see README ("secure mode") for measured timings.
"""

from __future__ import annotations

import math
import os
import secrets
import types
from collections.abc import Iterator
from fractions import Fraction
from functools import lru_cache
from typing import Any

import numpy as np

GRID_BITS = 16  # noise grid g = sigma / 2**GRID_BITS; the integer noise scale is 2**16
_INT64_SAFE = 2**62
_MAX_SCALE = 2**40  # discrete Gaussian scales beyond this belong on a coarser grid


# --------------------------------------------------------------------------- random bits

def _random_u64(n: int) -> np.ndarray:
    """``n`` uniform 64-bit integers from the OS's CSPRNG."""
    if n == 0:
        return np.empty(0, np.uint64)
    return np.frombuffer(os.urandom(8 * n), dtype=np.uint64)


def _uniform_below(m: Any, n: int) -> np.ndarray:
    """``n`` exactly uniform integers in ``[0, m)``; ``m`` an int or an integer array.

    Rejection from 64-bit words (no modulo bias) while m < 2**62; beyond, Python's
    ``secrets.randbelow`` one by one (only the rare exact-rational corner needs it).
    """
    if isinstance(m, (int, np.integer)):
        m = int(m)
        if m <= 0:
            raise ValueError("the range must be positive")
        if m >= _INT64_SAFE:
            return np.array([secrets.randbelow(m) for _ in range(n)] or [], dtype=object)
        if m & (m - 1) == 0:  # a power of two: mask the bits
            return (_random_u64(n) & np.uint64(m - 1)).astype(np.int64)
        m = np.full(n, m, np.uint64)
    else:
        m = np.asarray(m).astype(np.uint64)
    out = np.empty(n, np.uint64)
    todo = np.arange(n)
    while todo.size:
        mm = m[todo]
        u = _random_u64(todo.size)
        rem = (np.uint64(0) - mm) % mm  # 2**64 mod m
        ok = u <= ~rem  # u < 2**64 - (2**64 mod m): the last partial block is rejected
        out[todo[ok]] = u[ok] % mm[ok]
        todo = todo[~ok]
    return out.astype(np.int64)


def _bernoulli_ratio(num: np.ndarray, den: int) -> np.ndarray:
    """Bernoulli(num / den) for each ``num`` in [0, den], exactly (integer comparison)."""
    return np.asarray(_uniform_below(den, len(num)) < num, dtype=bool)


def _bernoulli_exp_at_most_1(num: np.ndarray, den: int) -> np.ndarray:
    """Bernoulli(exp(-num/den)) for num/den in [0, 1]: CKS 2020 Algorithm 1, vectorised.

    K = 1; while Bernoulli(gamma / K): K += 1; output K odd. P(odd) = e^-gamma. The draw
    Bernoulli(gamma / K) is Bernoulli(num / den) and Bernoulli(1 / K), independent (the
    latter is certain for K = 1, so not drawn).
    """
    n = len(num)
    k = np.ones(n, np.int64)
    active = np.ones(n, bool)
    while True:
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        a = _bernoulli_ratio(num[idx], den)
        later = np.flatnonzero(a & (k[idx] > 1))
        if later.size:
            a[later] = _uniform_below(k[idx[later]], later.size) == 0
        k[idx[a]] += 1
        active[idx[~a]] = False
    return k % 2 == 1


@lru_cache(maxsize=None)
def _exp_minus_1_words(words: int) -> tuple[int, ...]:
    """floor(e^-1 * 2**(64 * words)) as 64-bit words, most significant first, exactly:
    partial sums of the alternating series sum (-1)^k / k! bracket e^-1 within 1/(n+1)!,
    and terms are added until both ends of the bracket have the same floor."""
    bits = 64 * words
    terms = 8
    while True:
        partial = sum(Fraction((-1) ** k, math.factorial(k)) for k in range(terms + 1))
        error = Fraction(1, math.factorial(terms + 1))
        low = math.floor((partial - error) * 2**bits)
        if low == math.floor((partial + error) * 2**bits):
            return tuple((low >> (64 * (words - 1 - i))) & (2**64 - 1) for i in range(words))
        terms += 16


def _bernoulli_exp_minus_1(n: int) -> np.ndarray:
    """Bernoulli(e^-1), exactly: a uniform real 0.u0 u1 u2... (64-bit words, drawn while
    needed) is below e^-1 when its first word that differs from e^-1's is smaller."""
    result = np.zeros(n, bool)
    todo = np.arange(n)
    word = 0
    while todo.size:
        bound = np.uint64(_exp_minus_1_words(max(4, word + 1))[word])
        u = _random_u64(todo.size)
        result[todo[u < bound]] = True
        todo = todo[u == bound]  # a tie: probability 2**-64, decided by the next word
        word += 1
    return result


def _bernoulli_exp(whole: np.ndarray, frac: np.ndarray, den: int) -> np.ndarray:
    """Bernoulli(exp(-gamma)), gamma = whole + frac/den >= 0 (CKS 2020 Algorithm 1, gamma > 1:
    ``whole`` Bernoulli(e^-1) trials, all of which must succeed, then the fractional part)."""
    result = np.ones(len(whole), bool)
    remaining = whole.astype(np.int64)
    alive = remaining > 0
    while alive.any():
        idx = np.flatnonzero(alive)
        result[idx[~_bernoulli_exp_minus_1(idx.size)]] = False
        remaining[idx] -= 1
        alive = result & (remaining > 0)
    idx = np.flatnonzero(result)
    result[idx] = _bernoulli_exp_at_most_1(frac[idx], den)
    return result


def _discrete_laplace(t: int, n: int) -> np.ndarray:
    """``n`` samples with P(y) proportional to exp(-|y|/t), t a positive integer (CKS
    2020 Algorithm 2 with s = 1): U uniform below t, kept with probability e^(-U/t);
    V geometric (Bernoulli(e^-1) successes); X = U + tV; a random sign, rejecting -0."""
    out = np.empty(n, np.int64)
    todo = np.arange(n)
    while todo.size:
        u = _uniform_below(t, todo.size)
        keep = _bernoulli_exp_at_most_1(u, t)
        u, slots = u[keep], todo[keep]
        v = np.zeros(u.size, np.int64)
        going = np.ones(u.size, bool)
        while going.any():
            idx = np.flatnonzero(going)
            ok = _bernoulli_exp_minus_1(idx.size)
            v[idx[ok]] += 1
            going[idx[~ok]] = False
        x = u + t * v
        negative = (_random_u64(x.size) & np.uint64(1)).astype(bool)
        valid = ~(negative & (x == 0))
        out[slots[valid]] = np.where(negative, -x, x)[valid]
        done = np.zeros(todo.size, bool)
        done[np.flatnonzero(keep)[valid]] = True
        todo = todo[~done]
    return out


# --------------------------------------------------------------------------- discrete Gaussian

def discrete_gaussian(sigma: float | int | Fraction, size: int | tuple[int, ...] = ()) -> np.ndarray:
    """Exact samples of the discrete Gaussian N_Z(0, sigma^2): P(x) ∝ exp(-x^2 / (2 sigma^2)).

    CKS 2020 Algorithm 3: propose Y from the discrete Laplace of integer scale t (sigma
    itself when it is an integer, else floor(sigma) + 1), accept with probability
    exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2)). sigma^2 is taken as the exact rational
    ``Fraction(sigma) ** 2`` and every acceptance test compares integers: no float
    touches the randomness. Vectorised: every pending coordinate takes the same step
    together, and rejected ones are drawn again. Returns int64 of the given shape.
    """
    shape = (size,) if isinstance(size, (int, np.integer)) else tuple(size)
    n = math.prod(shape)
    if not (sigma >= 0 and math.isfinite(float(sigma))):
        raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
    sigma2 = Fraction(sigma) ** 2
    if sigma2 == 0:
        return np.zeros(shape, np.int64)
    if sigma2 > _MAX_SCALE**2:
        raise ValueError(f"sigma {float(sigma):g} is too large for an integer sampler; "
                         "sample on a coarser grid (secure_gaussian_noise)")
    p, q = sigma2.numerator, sigma2.denominator
    root = math.isqrt(p // q)
    t = root if q == 1 and root * root == p else root + 1
    # gamma = (|Y| t q - p)^2 / (2 p q t^2) = (|Y| a - b)^2 / (2 a b t), a = tq/h, b = p/h
    h = math.gcd(t * q, p)
    a, b = t * q // h, p // h
    den = 2 * a * b * t
    out = np.empty(n, np.int64)
    todo = np.arange(n)
    while todo.size:
        y = _discrete_laplace(t, todo.size)
        magnitude = np.abs(y)
        if int(magnitude.max(initial=0)) * a + b < 2**31 and den < _INT64_SAFE:
            num = (magnitude * a - b) ** 2  # < 2**62: exact in int64
        else:
            num = (magnitude.astype(object) * a - b) ** 2  # Python integers: exact
        whole = num // den
        frac = num - whole * den
        if den < _INT64_SAFE:
            frac = frac.astype(np.int64)
        accept = _bernoulli_exp(np.asarray(whole).astype(np.int64), frac, den)
        out[todo[accept]] = y[accept]
        todo = todo[~accept]
    return out.reshape(shape)


def grid_step(sigma: float, grid_bits: int = GRID_BITS) -> float:
    """The grid of secure noise of standard deviation sigma: sigma / 2**grid_bits (exact)."""
    return math.ldexp(float(sigma), -grid_bits)


def rounding_slack(dimension: int, step: float) -> float:
    """How much rounding a d-vector to a grid of this step can add to its L2 norm."""
    return math.sqrt(dimension) * step / 2


def secure_gaussian_noise(sigma: float, shape: int | tuple[int, ...] = (),
                          grid_bits: int = GRID_BITS) -> np.ndarray:
    """Gaussian noise of standard deviation sigma on the grid g = sigma / 2**grid_bits.

    ``g * Z`` with ``Z ~ N_Z(0, 4**grid_bits)`` exactly, as float64 (each value is
    ``float(g * Z)``, the nearest float to a grid point). Adding it to floats is *not*
    the defence by itself: round the value to the same grid first and add in integers
    (:class:`smallfed.privacy.user_dp.GaussianAverage` and :func:`use_secure_noise` do).
    """
    if sigma == 0:
        return np.zeros(shape, np.float64)
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
    return grid_step(sigma, grid_bits) * discrete_gaussian(2**grid_bits, shape).astype(np.float64)


# --------------------------------------------------------------------------- sampling

def secure_uniform(size: int | tuple[int, ...] | None = None) -> np.ndarray | float:
    """Uniform floats in [0, 1) with 53 random bits each (every multiple of 2**-53 equally
    likely), from the OS's CSPRNG."""
    shape = () if size is None else ((size,) if isinstance(size, (int, np.integer)) else size)
    n = math.prod(shape)
    values = (_random_u64(n) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return float(values[0]) if size is None else values.reshape(shape)


def secure_poisson(n: int, rate: float) -> np.ndarray:
    """Poisson sampling: item i kept with probability ``rate``, independently, from OS
    entropy. A 53-bit uniform below the rate: probability ceil(rate * 2**53) / 2**53."""
    if not 0 <= rate <= 1:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    return secure_uniform(n) < rate


class SecureRandom:
    """The part of ``numpy.random.Generator`` the server's DP uses, from the OS's CSPRNG.

    ``random`` for Poisson sampling (``PartitionSampling``: ``random(n) < rate``) and
    ``normal`` for noise, on the grid of :func:`secure_gaussian_noise`. Never seeded: it
    has no state to seed, so two instances never repeat each other.
    """

    secure = True

    def random(self, size: int | tuple[int, ...] | None = None) -> np.ndarray | float:
        return secure_uniform(size)

    def normal(self, loc: float = 0.0, scale: float = 1.0,
               size: int | tuple[int, ...] | None = None) -> np.ndarray | float:
        noise = secure_gaussian_noise(float(scale), () if size is None else size)
        return float(loc + noise) if size is None else loc + noise

    def __repr__(self) -> str:
        return "SecureRandom(os.urandom)"


# --------------------------------------------------------------------------- DP-SGD (clients)

class SecurePoissonBatchSampler:
    """A DataLoader ``batch_sampler`` of Poisson batches drawn from OS entropy.

    Each of ``steps`` batches holds the indices ``secure_poisson`` keeps, so a batch can
    be empty: give the DataLoader Opacus's empty-batch collate
    (``opacus.data_loader.wrap_collate_with_empty(collate_fn=default_collate,
    sample_empty_shapes=..., dtypes=...)``, or a ``DPDataLoader``'s ``collate_fn``),
    which returns zero-length tensors of the right shapes for an empty batch.
    """

    def __init__(self, num_samples: int, sample_rate: float, steps: int) -> None:
        if num_samples <= 0 or steps < 0 or not 0 < sample_rate <= 1:
            raise ValueError("need num_samples > 0, steps >= 0 and 0 < sample_rate <= 1")
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.steps = steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield np.flatnonzero(secure_poisson(self.num_samples, self.sample_rate)).tolist()

    def __len__(self) -> int:
        return self.steps


def use_secure_noise(optimizer: Any, grid_bits: int = GRID_BITS) -> None:
    """Make an Opacus ``DPOptimizer`` draw its noise with :func:`discrete_gaussian`.

    Written here, not through Opacus's ``secure_mode``: that mode needs torchcsprng,
    which has no build for torch 2.13, and it still samples floats. This replaces the
    optimizer's ``add_noise`` (a bound method on this instance only) by a copy of Opacus
    1.6's ``add_noise`` whose noise is exact: each ``summed_grad`` is rounded to the grid
    ``g = sigma / 2**grid_bits`` (sigma = noise_multiplier * max_grad_norm), the discrete
    Gaussian is added in integers, and ``p.grad = g * (rint(summed_grad / g) + Z)``.

    Rounding a sum can move it by ``sqrt(d) * g`` relative to a neighbour's, so the
    per-sample clip (``max_grad_norm``) is lowered to ``C - sqrt(d) * g`` (a little
    less), while the noise keeps ``sigma = z * C``: neighbouring rounded sums differ by
    at most C in L2, the sensitivity the accountant assumes with noise multiplier z.
    Call it once, after ``make_private`` and before training; the noise multiplier must
    not change afterwards.
    """
    import torch
    from opacus.optimizers.optimizer import (
        DPOptimizer,
        _check_processed_flag,
        _mark_as_processed,
    )

    if type(optimizer) is not DPOptimizer:  # per-layer, adaptive and distributed clip otherwise
        raise TypeError(f"use_secure_noise needs opacus's DPOptimizer (flat clipping), "
                        f"not {type(optimizer).__name__}")
    if getattr(optimizer, "secure_noise_std", None) is not None:
        raise ValueError("use_secure_noise: this optimizer already draws secure noise")
    clip, z = float(optimizer.max_grad_norm), float(optimizer.noise_multiplier)
    sigma = z * clip
    if sigma == 0:
        optimizer.secure_noise_std = 0.0  # no noise, nothing random to replace
        return
    step = grid_step(sigma, grid_bits)
    dimension = sum(p.numel() for p in optimizer.params)
    lowered = (clip - 2 * rounding_slack(dimension, step)) * (1 - 1e-6)
    if lowered <= 0:
        raise ValueError(f"use_secure_noise: {dimension} parameters on a grid of {step:g} "
                         f"leave no room under the clip {clip:g}; raise grid_bits")
    optimizer.max_grad_norm = lowered
    optimizer.secure_noise_std = sigma
    optimizer.secure_noise_grid = step

    def add_noise(self: Any) -> None:
        if float(self.noise_multiplier) != z:
            raise RuntimeError("use_secure_noise: the noise multiplier changed after it was "
                               "applied; call it after setting the noise multiplier")
        params = list(self.params)
        noise = discrete_gaussian(2**grid_bits, sum(p.numel() for p in params))
        start = 0
        for p in params:
            _check_processed_flag(p.summed_grad)
            summed = p.summed_grad.detach().to("cpu", torch.float64).numpy()
            ints = np.rint(summed / step).astype(np.int64)
            ints += noise[start:start + ints.size].reshape(ints.shape)
            start += ints.size
            noisy = torch.from_numpy(step * ints.astype(np.float64))
            p.grad = noisy.to(device=p.summed_grad.device, dtype=p.summed_grad.dtype).view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = types.MethodType(add_noise, optimizer)
