"""The trade-off workbench: a grid of runs (codec x privacy x pruning x devices x seeds).

A sweep file names a base run configuration, the seeds, and axes of named options;
every combination is one point, a complete simulation in its own folder::

    base = "simulations/mnist.toml"
    seeds = [42, 43]
    out = "runs/sweep-tradeoff"
    workers = 2                    # points at once (default: the machine's cores)
    [set]                          # changes to the base for every point
    num-server-rounds = 30
    [axes.codec]
    dense = {}
    topk-4bit = {codec = "topk:0.01,quantize:4,error_feedback"}
    [axes.privacy]
    none = {}
    eps-8 = {privacy = "sample", dp-target-epsilon = 8.0}

Every point's configuration is checked before any runs. A point whose folder holds
the results of all its rounds (with the same configuration) is not run again, so a
stopped sweep restarts where it stopped; Ctrl-C stops the running points and drops
the queued ones. ``sweep.csv`` has one row per finished point, rewritten as
each point ends.
"""

from __future__ import annotations

import csv
import itertools
import json
import multiprocessing
import os
import signal
import tomllib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from smallfed.config import Config, ConfigError

SWEEP_FIELDS = ("point", "seed", "final_accuracy", "best_accuracy", "total_bytes_up",
                "compression_ratio_up", "epsilon", "sim_time_s", "sim_time_to_target_s",
                "wall_time_s")


@dataclass(frozen=True)
class Point:
    """One run of the grid: its name, its axis options, and its configuration."""

    name: str
    options: dict[str, str]  # axis -> option name
    seed: int
    config: Config


@dataclass(frozen=True)
class Sweep:
    out: Path
    workers: int
    axes: tuple[str, ...]
    points: tuple[Point, ...]


def load_sweep(path: str | Path) -> Sweep:
    """The grid of a sweep file, every point checked; ConfigError naming what is wrong."""
    path = Path(path)
    try:
        spec = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"sweep file {str(path)!r}: {err}") from err
    unknown = set(spec) - {"base", "seeds", "out", "workers", "set", "axes"}
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown entries {sorted(unknown)}")
    base_file = spec.get("base")
    base: dict[str, Any] = {}
    if base_file:
        try:
            base = tomllib.loads(Path(base_file).read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"sweep base {base_file!r}: {err}") from err
    base.update(spec.get("set", {}))
    axes: dict[str, dict[str, dict[str, Any]]] = spec.get("axes", {})
    if not isinstance(axes, dict) or not axes or any(
            not isinstance(o, dict) or not o or not all(isinstance(c, dict) for c in o.values())
            for o in axes.values()):
        raise ConfigError(f"sweep file {path}: give at least one [axes.NAME] table whose "
                          "options are tables, e.g. topk = {codec = \"topk:0.01\"}")
    seeds = spec.get("seeds", [base.get("seed", 42)])
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(x, int) for x in seeds)):
        raise ConfigError(f"sweep file {path}: seeds must be a list of distinct integers")
    workers = spec.get("workers", os.cpu_count() or 1)
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"sweep file {path}: workers must be a whole number >= 1")
    points = []
    for combo in itertools.product(*(list(options.items()) for options in axes.values())):
        for seed in seeds:
            values = dict(base)
            for _, changes in combo:
                values.update(changes)
            values["seed"] = seed
            options = {axis: option for axis, (option, _) in zip(axes, combo)}
            name = ",".join(f"{a}={o}" for a, o in options.items()) + f",seed={seed}"
            try:
                cfg = Config.from_mapping(values)
            except ConfigError as err:
                raise ConfigError(f"sweep point {name}: {err}") from err
            points.append(Point(name, options, seed, cfg))
    return Sweep(Path(spec.get("out", f"runs/sweep-{path.stem}")), workers,
                 tuple(axes), tuple(points))


def point_dir(sweep: Sweep, point: Point) -> Path:
    return sweep.out / "points" / point.name.replace(",", "__").replace("=", "-")


def finished(sweep: Sweep, point: Point) -> dict[str, Any] | None:
    """The point's results if it has run all its rounds with this very configuration,
    else None (results.json is written after every round, so a stopped run has one)."""
    results_file = point_dir(sweep, point) / "results.json"
    if not results_file.is_file():
        return None
    try:  # a key added to smallfed since the point ran reads as its default
        results = json.loads(results_file.read_text())
        same = Config.from_mapping(results.get("config", {})) == point.config
        done = results["rounds"][-1]["round"] == point.config.num_server_rounds
    except (ValueError, LookupError, ConfigError):  # cut short while written: run it again
        return None
    return results if same and done else None


def _ignore_ctrl_c() -> None:
    """In each worker: Ctrl-C reaches the whole process group, and the sweep process
    alone decides what stops (a worker's own KeyboardInterrupt prints a traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_point(args: tuple[Config, str]) -> dict[str, Any]:
    from smallfed.simulation import simulate  # in the worker process

    cfg, out = args
    # The folder holds no finished run of this point (see finished): start it afresh.
    return simulate(cfg, out, progress=False, overwrite=True)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Drop the queued points and end the running ones now; a plain shutdown would
    wait for the running points to finish. A stopped point runs again next time."""
    workers = list(pool._processes.values())  # pylint: disable=protected-access
    pool.shutdown(wait=False, cancel_futures=True)
    for worker in workers:  # Python 3.14 has pool.terminate_workers()
        worker.terminate()
    for worker in workers:  # gone, and their out-dir locks free, before the sweep returns
        worker.join()


def run_sweep(sweep: Sweep, progress: bool = True) -> Path:
    """Run the points not yet finished, up to ``workers`` at once; write sweep.csv."""
    results = {p.name: finished(sweep, p) for p in sweep.points}
    todo = [p for p in sweep.points if results[p.name] is None]
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), disable=not progress)
    with bar:
        task = bar.add_task("sweep points", total=len(sweep.points),
                            completed=len(sweep.points) - len(todo))
        # spawn, not fork: a forked child of a process that ran torch can deadlock.
        with ProcessPoolExecutor(min(sweep.workers, max(1, len(todo))),
                                 mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_ignore_ctrl_c) as pool:
            jobs = {pool.submit(_run_point, (p.config, str(point_dir(sweep, p)))): p
                    for p in todo}
            failed = []
            try:
                for job in as_completed(jobs):
                    point = jobs[job]
                    try:
                        results[point.name] = job.result()
                    except Exception as err:  # pylint: disable=broad-exception-caught
                        failed.append(f"{point.name}: {type(err).__name__}: {err}")
                        bar.update(task, advance=1, description=f"FAILED {point.name}")
                        continue
                    write_table(sweep, results)  # the table so far: readable early
                    bar.update(task, advance=1, description=f"done {point.name}")
            except KeyboardInterrupt:
                _stop(pool)
                raise
    table = write_table(sweep, results)
    if failed:  # the others ran and are in the table; rerunning retries only these
        raise RuntimeError("sweep points failed:\n" + "\n".join(failed))
    return table


def write_table(sweep: Sweep, results: dict[str, dict[str, Any] | None]) -> Path:
    sweep.out.mkdir(parents=True, exist_ok=True)
    table = sweep.out / "sweep.csv"
    with open(table, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*sweep.axes, *SWEEP_FIELDS])
        writer.writeheader()
        for point in sweep.points:
            if results.get(point.name) is None:
                continue  # not run yet
            summary = results[point.name]["summary"]  # type: ignore[index]
            writer.writerow({**point.options, "point": point.name, "seed": point.seed,
                             **{k: summary.get(k) for k in SWEEP_FIELDS[2:]}})
    return table
