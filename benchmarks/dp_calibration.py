"""What calibrating the DP noise costs a sweep point: Opacus's search against smallfed's.

For the private points of a sweep (simulations/sweep-tradeoff.toml: 100 MNIST clients,
targets 8 and 3), each distinct client size gives one calibration key (sample rate,
steps of the planned rounds), as ``check_privacy_config`` enumerates them. Timed, with
the imports done before each clock starts:

(a) Opacus's ``get_noise_multiplier`` for every key of the first private point;
(b) smallfed's calibration with an empty disk cache, for the first point of each target;
(c) smallfed's calibration of another point of the same target in a new process that
    finds the cache (b) wrote: what the sweep's check and each later run pay.

Each of our noise multipliers is checked against Opacus's accountant (epsilon <= the
target) and against (a)'s.

    python benchmarks/dp_calibration.py [--sweep simulations/sweep-tradeoff.toml]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from smallfed.config import Config
from smallfed.data import federated_data
from smallfed.privacy import calibration
from smallfed.privacy.local_dp import planned_rounds, sample_rate, steps_per_round
from smallfed.sweep import Point, load_sweep

warnings.filterwarnings("ignore")
Key = tuple[float, float, float, int, str]  # target, delta, sample rate, steps, accountant


def point_keys(cfg: Config) -> list[Key]:
    """The calibration keys of a point: one per distinct client size (check_privacy_config's
    enumeration), merged where sizes share a sample rate and step count."""
    sizes = sorted({len(p) for p in federated_data(cfg).partitions})
    return sorted({(cfg.dp_target_epsilon, cfg.dp_delta, sample_rate(cfg, n),
                    planned_rounds(cfg) * steps_per_round(cfg, n), cfg.dp_accountant)
                   for n in sizes})


def calibrate(keys: list[Key]) -> tuple[float, list[float]]:
    """(seconds, noise multipliers) of smallfed's calibration of ``keys``."""
    start = time.perf_counter()
    noises = [calibration.noise_multiplier(*key) for key in keys]
    return time.perf_counter() - start, noises


def opacus(keys: list[Key]) -> tuple[float, list[float]]:
    """(seconds, noise multipliers) of Opacus's search for ``keys``."""
    start = time.perf_counter()
    noises = [get_noise_multiplier(target_epsilon=t, target_delta=d, sample_rate=q, steps=n,
                                   accountant=a) for t, d, q, n, a in keys]
    return time.perf_counter() - start, noises


def accountant_epsilon(noise: float, key: Key) -> float:
    _, delta, rate, steps, mechanism = key
    accountant = create_accountant(mechanism=mechanism)
    accountant.history = [(noise, rate, steps)]
    return float(accountant.get_epsilon(delta=delta))


def in_new_process(keys: list[Key]) -> dict:
    """(c): a fresh interpreter (empty memory cache) calibrates ``keys`` from the disk."""
    code = ("import json, sys, time\n"
            "from smallfed.privacy import calibration\n"
            "keys = [tuple(k) for k in json.loads(sys.argv[1])]\n"
            "start = time.perf_counter()\n"
            "noises = [calibration.noise_multiplier(*k) for k in keys]\n"
            "seconds = time.perf_counter() - start\n"
            "print(json.dumps({'seconds': seconds, 'noises': noises,\n"
            "                  'opacus_imported': 'opacus' in sys.modules}))\n")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(keys)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.splitlines()[-1])


def measure(target: float, points: list[Point], keys: dict[str, list[Key]]) -> dict:
    """(b) and (c) for the points of one target, and the accountant's epsilons."""
    cold_s, noises = calibrate(keys[points[0].name])
    warm = in_new_process(keys[points[1].name])
    assert warm["noises"] == noises, "the warm cache served other values"
    epsilons = [accountant_epsilon(z, k) for z, k in zip(noises, keys[points[0].name])]
    return {
        "target_epsilon": target, "points": len(points),
        "keys_per_point": len(keys[points[0].name]),
        "cold_first_point_s": round(cold_s, 3),
        "warm_point_new_process_s": round(warm["seconds"], 4),
        "warm_imports_opacus": warm["opacus_imported"],
        "noise_multipliers": noises,
        "epsilons": epsilons,
        "max_epsilon_over_target": max(epsilons) / target,
        "min_epsilon_over_target": min(epsilons) / target,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default="simulations/sweep-tradeoff.toml")
    parser.add_argument("--out", default="benchmarks/results/dp_calibration.json")
    args = parser.parse_args()
    private = [p for p in load_sweep(args.sweep).points if p.config.dp_target_epsilon > 0]
    by_target: dict[float, list[Point]] = {}
    for point in private:
        by_target.setdefault(point.config.dp_target_epsilon, []).append(point)
    keys = {p.name: point_keys(p.config) for p in private}
    first = private[0]
    opacus_s, opacus_noises = opacus(keys[first.name])
    with tempfile.TemporaryDirectory(prefix="smallfed-calibration-") as folder:
        os.environ["SMALLFED_CACHE_DIR"] = folder  # empty; the subprocesses inherit it
        targets = [measure(target, points, keys) for target, points in by_target.items()]
    ours = targets[0]["noise_multipliers"]
    report = {
        "sweep": args.sweep, "private_points": len(private),
        "first_point": first.name,
        "opacus_first_point_s": round(opacus_s, 3),
        "opacus_noise_multipliers": opacus_noises,
        "max_relative_difference_to_opacus": max(
            abs(a / b - 1) for a, b in zip(ours, opacus_noises)),
        "targets": targets,
        "tolerance": calibration.TOLERANCE,
        "load_average_1min": os.getloadavg()[0], "cpus": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
