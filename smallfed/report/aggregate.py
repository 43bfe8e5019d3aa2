"""A sweep's seeds pooled per configuration: the mean and its 95% Student-t interval,
so that a plot shows what repeats across seeds rather than one lucky seed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from scipy.special import stdtrit  # the t quantile, without scipy.stats' slow import

LEVEL = 0.95  # the confidence level of every interval in a report
Row = dict[str, str]  # one row of sweep.csv


@dataclass(frozen=True)
class Stat:
    """A mean over ``n`` seeds and the half-width of its confidence interval (None
    with a single seed: one value gives no spread to estimate)."""

    n: int
    mean: float
    half: float | None

    def text(self, spec: str) -> str:
        """``mean ± half`` formatted with ``spec``; a lone seed says it has no interval."""
        if self.half is None:
            return f"{self.mean:{spec}} (1 seed, no CI)"
        return f"{self.mean:{spec}} ± {self.half:{spec}}"


def mean_ci(values: Sequence[float]) -> Stat:
    """Mean and 95% half-width ``t(0.975, n-1) * s / sqrt(n)``, ``s`` the sample
    standard deviation: Student t, as a few seeds do not make a normal estimate."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to average")
    mean = math.fsum(values) / n
    if n == 1:
        return Stat(1, mean, None)
    s = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return Stat(n, mean, float(stdtrit(n - 1, (1 + LEVEL) / 2)) * s / math.sqrt(n))


def value(row: Row, column: str) -> float | None:
    """A cell as a number; None where it is empty or absent (a failed point, a cost
    that does not apply, a column an older sweep.csv lacks)."""
    cell = row.get(column)
    if cell in (None, "", "None", "nan"):
        return None
    return float(cell)


@dataclass
class Configuration:
    """A point of the grid without its seed: the seeds that finished (a final
    accuracy) and those that did not."""

    name: str  # the point's name without ",seed=..."
    label: str  # short, for legends: the options that vary, "dense / eps-8" or "privacy=eps-8"
    rows: list[Row] = field(default_factory=list)
    failed: list[Row] = field(default_factory=list)


def stat(rows: Sequence[Row], column: str) -> Stat:
    """``column``'s mean and interval over ``rows``, which all have it."""
    return mean_ci([float(r[column]) for r in rows])


def configuration_name(point: str) -> str:
    return point.rsplit(",seed=", 1)[0]


def configurations(rows: Sequence[Row], axes: Sequence[str]) -> list[Configuration]:
    """Rows grouped by configuration, in sweep.csv's order. Labels name the options of
    the ``axes`` whose option changes between configurations (all of them if none do)."""
    groups: dict[str, Configuration] = {}
    for row in rows:
        name = configuration_name(row["point"])
        group = groups.setdefault(name, Configuration(name, name))
        (group.rows if value(row, "final_accuracy") is not None else group.failed).append(row)
    options = {g.name: [(g.rows or g.failed)[0].get(a, "") for a in axes] for g in groups.values()}
    varying = [i for i in range(len(axes)) if len({o[i] for o in options.values()}) > 1]
    for group in groups.values():
        picked = [options[group.name][i] for i in (varying or range(len(axes)))]
        if len(varying) == 1:  # one option alone, "none", would not say of what
            group.label = f"{axes[varying[0]]}={picked[0]}"
        elif all(picked):
            group.label = " / ".join(picked)
    return list(groups.values())


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, accuracy) points no other point beats, cheapest first: a
    point is on the front when no other is at least as accurate for no more cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front: list[int] = []
    best = float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front
