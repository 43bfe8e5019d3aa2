"""The noise multiplier that spends a target epsilon: found in a few accountant calls,
cached on disk.

Opacus's ``get_noise_multiplier`` doubles, then bisects on sigma until epsilon is
within 0.01 of the target: about a dozen calls of the accountant, and a PRV call costs
0.5-1 s (most of it the RDP curve Opacus computes twice to size the PRV's domain). A
target-epsilon run calibrates once per distinct client size, and the same
calibration runs again in each process: the sweep's check of every point, then each
point's run, then each client process. Here:

- the search is a safeguarded secant on (log sigma, log epsilon), nearly a straight
  line, that goes through cheap stand-ins of the accountant before the accountant
  itself: RDP at a few integer orders (a few ms), then (PRV) the PRV on a coarser grid
  (about 50 ms; epsilon 1e-5 to 1e-4 high at 3 to 15, up to 1e-3 near 1), and last the
  accountant, computed as Opacus does, usually once (0.1-0.4 s). About 0.5 s per
  client size, against 5-8 s for Opacus's search;
- the result is kept in memory and in a small JSON file per key under
  ``<cache>/dp-noise/`` (``smallfed.cache``), so no process searches for the same key
  twice. The key holds the inputs (exact float reprs), the accountant,
  this algorithm's version and Opacus's, so a new accountant never serves old values.

Tolerance: the noise multiplier returned gives, under Opacus's accountant, an epsilon
``eps`` with ``target * (1 - TOLERANCE) <= eps <= target`` (TOLERANCE = 1e-3; Opacus's
search stops within 0.01 below the target). Near the target epsilon falls about as fast
as 1/sigma or faster, so sigma is also within about 1e-3 of the smallest one that
reaches the target.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from smallfed.cache import entry_path, write_atomic

TOLERANCE = 1e-3
MAX_SIGMA = 1e6  # as Opacus's search: a target that needs more is out of reach
ALGORITHM = "secant-1"  # change it when the search or the accountants' use changes
# RDP orders of the stand-ins: Opacus's integer ones, fewer (epsilon a little higher,
# so a PRV domain they size is a little wider), 6 times faster
STAND_IN_ORDERS = (2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 20, 24, 32, 48, 63)
_MAX_EVALUATIONS = 60  # per stage; the secant needs 3 or 4, bisection up to about 50


@lru_cache(maxsize=4096)
def noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                     accountant: str) -> float:
    """The smallest noise multiplier (to TOLERANCE) whose epsilon at ``delta`` after
    ``steps`` Poisson-sampled Gaussian steps at ``sample_rate`` is at most
    ``target_epsilon`` under Opacus's ``accountant`` ("rdp" or "prv").

    Raises ValueError when no noise multiplier up to MAX_SIGMA reaches the target.
    """
    target, delta, rate, steps = (float(target_epsilon), float(delta), float(sample_rate),
                                  int(steps))
    if accountant not in ("rdp", "prv"):
        raise ValueError(f"accountant {accountant!r}: use 'rdp' or 'prv'")
    if not (target > 0 and 0 < delta < 1 and 0 < rate <= 1 and steps >= 1):
        raise ValueError(f"target epsilon {target} at delta {delta}, sample rate {rate}, "
                         f"{steps} steps: need epsilon > 0, 0 < delta < 1, 0 < rate <= 1 "
                         "and steps >= 1")
    key = cache_key(target, delta, rate, steps, accountant)
    path = entry_path("dp-noise", key, ".json")
    cached = _read(path, key)
    if cached is not None:
        return cached
    sigma, eps = search(target, delta, rate, steps, accountant)
    entry = {"key": key, "noise_multiplier": sigma, "epsilon": eps}
    write_atomic(path, json.dumps(entry).encode(), "DP noise calibrations")
    return sigma


def cache_key(target: float, delta: float, rate: float, steps: int, accountant: str) -> str:
    """What the result depends on, the floats as exact reprs."""
    return (f"{ALGORITHM}|opacus {metadata.version('opacus')}|{accountant}|"
            f"target={target!r}|delta={delta!r}|rate={rate!r}|steps={steps}")


def _read(path: Path, key: str) -> float | None:
    """The cached noise multiplier, or None for a missing, unreadable or foreign entry."""
    try:
        entry = json.loads(path.read_text())
        sigma = entry["noise_multiplier"]
        if entry["key"] == key and isinstance(sigma, float) and 0 < sigma <= MAX_SIGMA:
            return sigma
    except (OSError, ValueError, TypeError, KeyError):
        pass
    return None


# --- the search --------------------------------------------------------------------------

Epsilon = Callable[[float], float]  # noise multiplier -> epsilon


def search(target: float, delta: float, rate: float, steps: int, accountant: str
           ) -> tuple[float, float]:
    """(noise multiplier, its epsilon under Opacus's accountant), no cache.

    Stages, each from where the last stopped: RDP at a few integer orders, to 2%; (PRV)
    the PRV on a 10 times coarser grid, to the middle of the window (it is a little
    high, so the accountant lands in the window); the accountant, usually once."""
    from opacus.accountants import RDPAccountant  # 2 s: only when a target is set

    orders = RDPAccountant.DEFAULT_ALPHAS
    stages: list[tuple[Epsilon, float, float]] = [
        (lambda s: rdp_epsilon(s, rate, steps, delta, STAND_IN_ORDERS), 0.98, 1.0)]
    if accountant == "prv":
        stages.append((lambda s: prv_epsilon(s, rate, steps, delta, STAND_IN_ORDERS, 10),
                       1 - 0.9 * TOLERANCE, 1 - 0.1 * TOLERANCE))
        exact: Epsilon = lambda s: prv_epsilon(s, rate, steps, delta, orders)
    else:
        exact = lambda s: rdp_epsilon(s, rate, steps, delta, orders)
    x, slope = 0.0, -1.5  # sigma 1; epsilon falls a little faster than 1/sigma
    with warnings.catch_warnings():  # "optimal order is the largest alpha", for stand-ins
        warnings.simplefilter("ignore")
        for epsilon, low, high in stages:
            x, slope, _ = _solve(epsilon, target, x, slope, low, high, stand_in=True)
        x, _, eps = _solve(exact, target, x, slope, 1 - TOLERANCE, 1.0)
    return math.exp(x), eps


def _solve(epsilon: Epsilon, target: float, x: float, slope: float, low: float, high: float,
           *, stand_in: bool = False) -> tuple[float, float, float]:
    """(x, slope, epsilon) with ``low <= epsilon(e^x) / target <= high``: a secant on
    y = log(epsilon / target), falling in x = log sigma, kept inside the bracket found
    so far (bisection when a step leaves it, or every third step). From ``x`` with a
    guessed ``slope``. Returns the smallest x seen below the window if the bracket
    closes on a jump of epsilon over the window. Past MAX_SIGMA, a ``stand_in`` (whose
    epsilon may not fall as low as the accountant's) hands over where it stopped; the
    accountant raises ValueError."""
    aim = math.log((low + high) / 2)
    above: tuple[float, float] | None = None  # (x, y): too little noise
    below: tuple[float, float, float] | None = None  # (x, y, eps): enough noise
    last: tuple[float, float] | None = None
    steps_since_bisection = 0
    for _ in range(_MAX_EVALUATIONS):
        eps = epsilon(math.exp(x))
        if low * target <= eps <= high * target:
            return x, slope, eps
        y = math.log(eps / target) if eps > 0 else -math.inf
        if eps > high * target:
            above = (x, y) if above is None or x > above[0] else above
        elif below is None or x < below[0]:
            below = (x, y, eps)
        if last is not None and x != last[0] and math.isfinite(y + last[1]):
            secant = (y - last[1]) / (x - last[0])
            slope = secant if secant < 0 else slope
        last = (x, y)
        if above and below:
            if below[0] - above[0] < 1e-12:
                break
            step = x + (aim - y) / slope if math.isfinite(y) else math.nan
            steps_since_bisection += 1
            if not above[0] < step < below[0] or steps_since_bisection >= 3:
                step, steps_since_bisection = (above[0] + below[0]) / 2, 0
            x = step
        else:  # no bracket yet: a Newton step, at least 1% of sigma, at most e^(|x|+1)
            newton = (aim - y) / slope if math.isfinite(y) else math.inf
            step = min(max(abs(newton), 0.01), abs(x) + 1)
            if above:  # more noise, up to MAX_SIGMA
                x = min(x + step, math.log(MAX_SIGMA))
                if x == above[0] and stand_in:
                    return x, slope, eps
                if x == above[0]:
                    raise ValueError(
                        f"target epsilon {target} cannot be reached: a noise multiplier "
                        f"of {MAX_SIGMA:g} still gives {eps:.4g}")
            else:  # less noise
                x -= step
    if below is not None:
        return below[0], slope, below[2]
    if stand_in:
        return x, slope, eps
    raise ValueError(f"target epsilon {target}: the noise search did not converge")


def rdp_epsilon(sigma: float, rate: float, steps: int, delta: float,
                orders: Sequence[float]) -> float:
    """Epsilon of ``steps`` steps under RDP at ``orders``: with Opacus's default orders,
    the number its RDPAccountant (and :func:`smallfed.privacy.local_dp.epsilon_of`) gives."""
    from opacus.accountants.analysis import rdp

    curve = rdp.compute_rdp(q=rate, noise_multiplier=sigma, steps=1, orders=orders)
    eps, _ = rdp.get_privacy_spent(orders=orders, rdp=steps * curve, delta=delta)
    return float(eps)


def prv_epsilon(sigma: float, rate: float, steps: int, delta: float,
                orders: Sequence[float], coarser: float = 1.0) -> float:
    """Opacus's PRVAccountant.get_epsilon for one (sigma, rate, steps), with the RDP
    curve that sizes the domain computed once, not twice, and at ``orders``: with
    Opacus's default orders, the same steps on the same numbers, so the same epsilon
    (tests/test_calibration.py checks it). With fewer orders (a wider domain) and a grid
    ``coarser`` times coarser, a stand-in: an epsilon a little higher, for far less time."""
    import numpy as np
    from opacus.accountants.analysis import rdp
    from opacus.accountants.analysis.prv import (
        Domain,
        PoissonSubsampledGaussianPRV,
        TruncatedPrivacyRandomVariable,
        compose_heterogeneous,
        discretize,
    )

    eps_error, delta_error = 0.01, delta / 1000  # PRVAccountant.get_epsilon's defaults
    curve = rdp.compute_rdp(q=rate, noise_multiplier=sigma, steps=1, orders=orders)
    # compute_safe_domain_size: the RDP epsilon of all steps, and of one step
    size, _ = rdp.get_privacy_spent(orders=orders, rdp=curve * steps, delta=delta_error / 4)
    one, _ = rdp.get_privacy_spent(orders=orders, rdp=curve, delta=delta_error / (8 * steps))
    half_width = max(max(float(size), float(one)), eps_error) + 3
    mesh = coarser * eps_error / np.sqrt(steps * np.log(12 / delta_error) / 2)
    domain = Domain.create_aligned(-half_width, half_width, mesh)
    prv = TruncatedPrivacyRandomVariable(PoissonSubsampledGaussianPRV(rate, sigma),
                                         domain.t_min, domain.t_max)
    composed = compose_heterogeneous(dprvs=[discretize(prv, domain)],
                                     num_self_compositions=[steps])
    _, _, eps_upper = composed.compute_epsilon(delta, delta_error, eps_error)
    return float(eps_upper)
