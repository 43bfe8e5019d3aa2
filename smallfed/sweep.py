"""The trade-off workbench: a grid of runs (codec x privacy x pruning x devices x seeds).

A sweep file names a base run configuration, the seeds, and axes of named options;
every combination is one point, a complete simulation in its own folder::

    base = "simulations/mnist.toml"
    seeds = [42, 43]
    out = "runs/sweep-tradeoff"
    workers = 2                    # points at once (default: the machine's cores)
    ray-address = "10.0.0.5:6379"  # optional: run the points on this Ray cluster
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

With ``ray-address`` (or ``smallfed sweep --ray-address``, which wins) every point is
a Ray task on that cluster instead of a local process. The task runs its point into a
temporary folder of its node (nodes share no file system) and returns the folder's
files, which this process writes into the point's folder under ``out`` where a local
run would have put them, with ``node.json`` naming the node; so resuming,
``sweep.csv`` and ``smallfed report`` work the same.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import tomllib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn,
                           TimeElapsedColumn)

from smallfed.config import RUNNING_KEYS, Config, ConfigError

SWEEP_FIELDS = ("point", "seed", "final_accuracy", "best_accuracy", "total_bytes_up",
                "compression_ratio_up", "epsilon", "sim_time_s", "sim_time_to_target_s",
                "wall_time_s")
# Last, so that readers by position find the columns they knew: the Ray node a point
# ran on (hostname, Ray node id); empty for a point run locally.
NODE_FIELDS = ("node", "node_id")
# After them: the wire estimate (issue 19; empty for results from before it).
WIRE_FIELDS = ("total_bytes_up_wire_est", "compression_ratio_up_wire_est")
NODE_FILE = "node.json"  # in a point's folder: the Ray node it ran on

Results = dict[str, dict[str, Any] | None]  # point name -> results.json, None: not run


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
    workers: int | None  # None: not given (local: the machine's cores; cluster: no cap)
    axes: tuple[str, ...]
    points: tuple[Point, ...]
    ray_address: str = ""  # host:port of a Ray cluster's head; "": local processes


def load_sweep(path: str | Path, ray_address: str | None = None) -> Sweep:
    """The grid of a sweep file, every point checked; ConfigError naming what is wrong.

    ``ray_address`` (``--ray-address``), when given, replaces the file's ``ray-address``.
    """
    path = Path(path)
    try:
        spec = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"sweep file {str(path)!r}: {err}") from err
    unknown = set(spec) - {"base", "seeds", "out", "workers", "ray-address", "set", "axes"}
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
    workers = spec.get("workers")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"sweep file {path}: workers must be a whole number >= 1")
    if ray_address is None:
        ray_address = spec.get("ray-address", "")
    if not isinstance(ray_address, str):
        raise ConfigError(f"sweep file {path}: ray-address must be the host:port of a Ray "
                          "cluster's head as a string, e.g. ray-address = \"10.0.0.5:6379\"")
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
            if ray_address and cfg.backend == "ray":
                raise ConfigError(
                    f"sweep point {name}: backend = 'ray' starts a Ray engine of its own, "
                    "which cannot run inside the Ray task that runs the point on the "
                    "cluster; set backend = 'inprocess' (each point is one task already)")
            points.append(Point(name, options, seed, cfg))
    return Sweep(Path(spec.get("out", f"runs/sweep-{path.stem}")), workers,
                 tuple(axes), tuple(points), ray_address)


def point_dir(sweep: Sweep, point: Point) -> Path:
    return sweep.out / "points" / point.name.replace(",", "__").replace("=", "-")


def portable(cfg: Config) -> Config:
    """``cfg`` with a relative data-dir made absolute against this process's folder: a
    Ray worker runs in another (and the data must be at that path on every node)."""
    if not cfg.data_dir:
        return cfg
    return cfg.replace(data_dir=os.path.abspath(cfg.data_dir))


def _what(cfg: Config) -> dict[str, Any]:
    """What a run computes: its configuration without where and how it ran."""
    return {k: v for k, v in cfg.to_dict().items() if k not in RUNNING_KEYS}


def finished(sweep: Sweep, point: Point) -> dict[str, Any] | None:
    """The point's results if it has run all its rounds with this very configuration,
    else None (results.json is written after every round, so a stopped run has one).
    A data-dir is the same relative or absolute: a cluster's points record it absolute."""
    results_file = point_dir(sweep, point) / "results.json"
    if not results_file.is_file():
        return None
    try:  # a key added to smallfed since the point ran reads as its default
        results = json.loads(results_file.read_text())
        ran = Config.from_mapping(results.get("config", {}))
        same = _what(portable(ran)) == _what(portable(point.config))
        done = results["rounds"][-1]["round"] == point.config.num_server_rounds
    except (ValueError, LookupError, ConfigError):  # cut short while written: run it again
        return None
    return results if same and done else None


def _start_worker(threads: int) -> None:
    """In each worker: Ctrl-C reaches the whole process group, and the sweep process
    alone decides what stops (a worker's own KeyboardInterrupt prints a traceback).
    Its share of the cores as torch threads: workers that each take every core wait
    on each other's OpenMP threads (a cohort ran 3x slower so)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch  # pylint: disable=import-outside-toplevel

    torch.set_num_threads(threads)


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
    """Run the points not yet finished, up to ``workers`` at once, as local processes or
    as Ray tasks on the cluster at ``ray_address``; write sweep.csv."""
    results: Results = {p.name: finished(sweep, p) for p in sweep.points}
    todo = [p for p in sweep.points if results[p.name] is None]
    if sweep.ray_address and todo:
        from smallfed.simulation import check_ray_address

        check_ray_address(sweep.ray_address)  # at once, before the progress bar
    for point in todo:  # it runs again, maybe elsewhere
        (point_dir(sweep, point) / NODE_FILE).unlink(missing_ok=True)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), disable=not progress)
    with bar:
        task = bar.add_task("sweep points", total=len(sweep.points),
                            completed=len(sweep.points) - len(todo))
        run = _run_on_cluster if sweep.ray_address else _run_locally
        failed = run(sweep, todo, results, bar, task)
    table = write_table(sweep, results)
    if failed:  # the others ran and are in the table; rerunning retries only these
        raise RuntimeError("sweep points failed:\n" + "\n".join(failed))
    return table


def _run_locally(sweep: Sweep, todo: list[Point], results: Results, bar: Progress,
                 task: TaskID) -> list[str]:
    """Each point in a process of this machine; the failed points, one line each."""
    # spawn, not fork: a forked child of a process that ran torch can deadlock.
    cores = os.cpu_count() or 1
    workers = min(sweep.workers or cores, max(1, len(todo)))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_start_worker,
                             initargs=(max(1, cores // workers),)) as pool:
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
    return failed


def _run_on_node(values: dict[str, Any]) -> tuple[dict[str, bytes], dict[str, str]]:
    """A Ray task: the point in a temporary folder of its node (nodes share no file
    system); the folder's files by relative path, and where it ran."""
    import ray

    from smallfed.simulation import simulate

    cfg = Config.from_mapping(values)  # which imports the plugins on this node too
    with tempfile.TemporaryDirectory(prefix="smallfed-point-") as tmp:
        simulate(cfg, tmp, progress=False)
        files = {p.relative_to(tmp).as_posix(): p.read_bytes()
                 for p in Path(tmp).rglob("*") if p.is_file() and p.name != ".lock"}
    node = {"node": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address()}
    return files, node


def _store(sweep: Sweep, point: Point, files: dict[str, bytes], node: dict[str, str]
           ) -> dict[str, Any]:
    """Write a point's files from its node where a local run would have; its results.
    results.json last: until it is whole the point does not count as finished."""
    from smallfed.flower.checkpoint import out_dir_lock
    from smallfed.flower.server import refuse_finished

    folder = point_dir(sweep, point)
    with out_dir_lock(folder):
        refuse_finished(folder, overwrite=True)  # the files of an earlier, stopped run
        (folder / NODE_FILE).write_text(json.dumps(node, indent=1) + "\n")
        for name in sorted(files, key=lambda n: n == "results.json"):
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(files[name])
    return json.loads(files["results.json"])


def _run_on_cluster(sweep: Sweep, todo: list[Point], results: Results, bar: Progress,
                    task: TaskID) -> list[str]:
    """Each point a Ray task on the cluster; the failed points, one line each.

    Without ``workers`` every point is submitted at once, and Ray starts each where its
    client-cpus CPUs and client-gpus GPUs are free: only the cluster knows its size
    (and nodes it adds). With ``workers``, at most that many run at a time.
    """
    import ray

    if not todo:
        return []
    # The workers import smallfed and the plugins from the same paths as this process.
    pythonpath = os.pathsep.join([*sys.path, os.getcwd()])
    ray.init(address=sweep.ray_address, logging_level=logging.ERROR, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    remote = ray.remote(_run_on_node)
    limit = sweep.workers or len(todo)
    queue, failed = list(todo), []
    running: dict[ray.ObjectRef, Point] = {}
    try:
        _refuse_unplaceable(sweep, todo)
        while queue or running:
            while queue and len(running) < limit:
                point = queue.pop(0)
                running[remote.options(
                    name=point.name, num_cpus=point.config.client_cpus,
                    num_gpus=point.config.client_gpus,
                ).remote(portable(point.config).to_dict())] = point
            # With a timeout, so that Python sees a Ctrl-C while it waits.
            for ref in ray.wait(list(running), num_returns=1, timeout=1.0)[0]:
                point = running.pop(ref)
                try:
                    files, node = ray.get(ref)
                except ray.exceptions.RayError as err:
                    cause = err.cause if isinstance(err, ray.exceptions.RayTaskError) else err
                    failed.append(f"{point.name}: {type(cause).__name__}: {cause}")
                    bar.update(task, advance=1, description=f"FAILED {point.name}")
                    continue
                results[point.name] = _store(sweep, point, files, node)
                write_table(sweep, results)  # the table so far: readable early
                bar.update(task, advance=1, description=f"done {point.name}")
    except KeyboardInterrupt:  # end the running tasks' workers; the queued never started
        for ref in running:
            ray.cancel(ref, force=True)
        if running:  # cancelled: their workers are gone once these resolve
            ray.wait(list(running), num_returns=len(running), timeout=30)
        raise
    finally:
        ray.shutdown()  # this process leaves the cluster, which runs on
    return failed


def _refuse_unplaceable(sweep: Sweep, todo: list[Point]) -> None:
    """ConfigError for a point that no node of the cluster has the CPUs and GPUs for:
    Ray would keep its task waiting for such a node, without a word."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    for point in todo:
        cfg = point.config
        if not any(r.get("CPU", 0) >= cfg.client_cpus and r.get("GPU", 0) >= cfg.client_gpus
                   for r in nodes):
            cpus, gpus = (max((r.get(k, 0) for r in nodes), default=0) for k in ("CPU", "GPU"))
            raise ConfigError(
                f"sweep point {point.name}: client-cpus {cfg.client_cpus:g} and client-gpus "
                f"{cfg.client_gpus:g} (what its task reserves) fit on no node of the Ray "
                f"cluster at {sweep.ray_address} (at most {cpus:g} CPUs and {gpus:g} GPUs a "
                "node); lower them, or add a node that has them")


def ran_on(sweep: Sweep, point: Point) -> dict[str, str]:
    """The Ray node a point ran on (its node.json); empty for a point run locally."""
    try:
        return json.loads((point_dir(sweep, point) / NODE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def write_table(sweep: Sweep, results: Results) -> Path:
    sweep.out.mkdir(parents=True, exist_ok=True)
    table = sweep.out / "sweep.csv"
    with open(table, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*sweep.axes, *SWEEP_FIELDS, *NODE_FIELDS,
                                                *WIRE_FIELDS])
        writer.writeheader()
        for point in sweep.points:
            if results.get(point.name) is None:
                continue  # not run yet
            summary = results[point.name]["summary"]  # type: ignore[index]
            node = ran_on(sweep, point)
            writer.writerow({**point.options, "point": point.name, "seed": point.seed,
                             **{k: summary.get(k) for k in SWEEP_FIELDS[2:]},
                             **{k: node.get(k, "") for k in NODE_FIELDS},
                             **{k: summary.get(k) for k in WIRE_FIELDS}})
    return table
