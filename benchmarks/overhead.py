"""Framework overhead and the cohort engine: smallfed simulations against a plain torch loop.

The plain loop trains the same sampled clients (smallfed's seeded sampling rule), with
the same local training function, seeds and batches, one client after another, averages
like Flower's FedAvg (float32, partition order) and evaluates centrally every round.
The sequential simulation's accuracies must equal it exactly, which proves the work is
identical; the ratio of wall times is then the cost of the framework. For that the
runs fix ``update-clip`` far above any update: the server's default bound (factor x
the median norm, BoundUpdates) scales the odd honest update on this skewed split
(from round 7 on seed 42), which the plain loop does not do; its norms are still
computed, so its cost is still timed. The cohort
engine (``cohort-size``, every client of a round in one batch) is timed on all the
machine's threads and on one, and its final accuracy is compared with the sequential
path's. ``--dp`` adds sample-level DP-SGD (a fixed noise multiplier, so no
calibration is timed) to the same runs. All runs happen in one process, one after
another, so they share the machine's state; data loading is included in every run
(the MNIST files, and the split from smallfed's disk cache, made once before any run
is timed so that the first run does not pay for it alone).
``--seeds`` repeats the sequential and cohort runs (without DP) with more seeds, for
accuracy only: one seed's final accuracy moves by a few tenths of a point with any
change of float rounding, so the cohort is compared with the sequential path on the
mean over seeds (with a 95% Student-t interval of the paired differences).
``--accuracy-only`` runs just that comparison, on the config's seed and ``--seeds``.

    python benchmarks/overhead.py [--config simulations/mnist.toml] [--rounds 20] [--dp]
                                  [--seeds 43 44] [--accuracy-only]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import torch

from smallfed import data as data_module
from smallfed.cli import load_config
from smallfed.config import Config
from smallfed.data import federated_data
from smallfed.models import build_model
from smallfed.simulation import simulate
from smallfed.training import CLIENT_THREADS, client_generator, evaluate, torch_threads, train

UNBOUNDED = 1e30  # update-clip: no update is ever scaled (see the docstring)
DP = {"privacy": "sample", "dp-noise": 1.0, "dp-clip": 1.0, "fraction-evaluate": 0.0,
      "dp-reproducible": True}  # the same noise on both paths: comparable accuracies


def plain_loop(cfg: Config) -> list[float]:
    """FedAvg in plain torch: the accuracy after each round (round 0 first)."""
    fed = federated_data(cfg)
    ds = fed.dataset
    model = build_model(cfg.model, ds.input_shape, ds.num_classes, cfg.seed)
    global_state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    accuracies = [evaluate(model, ds.test_x, ds.test_y)[1]]
    for server_round in range(1, cfg.num_server_rounds + 1):
        rng = np.random.default_rng([cfg.seed, server_round, 0])
        chosen = sorted(rng.choice(cfg.num_clients, size=cfg.clients_per_round, replace=False))
        states, weights = [], []
        for pid in chosen:
            model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in global_state.items()})
            x, y = fed.client(int(pid))
            with torch_threads(CLIENT_THREADS):
                result = train(model, x, y, cfg, client_generator(cfg.seed, server_round, int(pid)))
            states.append({k: v.detach().numpy().copy() for k, v in model.state_dict().items()})
            weights.append(result.num_examples)
        total = sum(weights)
        averaged: dict[str, np.ndarray] = {}
        for state, weight in zip(states, weights):
            for key, value in state.items():
                share = value * (weight / total)
                averaged[key] = share if key not in averaged else averaged[key] + share
        global_state = averaged
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in global_state.items()})
        accuracies.append(evaluate(model, ds.test_x, ds.test_y)[1])
    return accuracies


def timed(fn, *args):  # type: ignore[no-untyped-def]
    data_module._CACHE.clear()  # every run loads the data and reads its split itself
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="simulations/mnist.toml")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray backend")
    parser.add_argument("--dp", action="store_true", help="also time DP-SGD runs")
    parser.add_argument("--seeds", type=int, nargs="*", default=[],
                        help="more seeds for the cohort-vs-sequential accuracy comparison")
    parser.add_argument("--accuracy-only", action="store_true",
                        help="only the cohort-vs-sequential accuracy over the seeds")
    parser.add_argument("--out", default="benchmarks/results/overhead.json")
    args = parser.parse_args()
    cfg = load_config(args.config, []).replace(num_server_rounds=args.rounds, strategy="fedavg",
                                               cohort_size=0, update_clip=UNBOUNDED)
    cohort = cfg.replace(cohort_size=cfg.clients_per_round)

    def run(config: Config, threads: int | None = None) -> tuple[list[float], float]:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads or previous)
        try:
            with TemporaryDirectory() as out:
                results, seconds = timed(
                    lambda: simulate(config, out, progress=False, overwrite=True))
        finally:
            torch.set_num_threads(previous)
        return [r["accuracy"] for r in results["rounds"]], seconds

    if args.accuracy_only:
        _save(args.out, {"config": cfg.to_dict(), "accuracy_over_seeds": _over_seeds(
            cfg, cohort, {}, [cfg.seed, *args.seeds], run)})
        return
    federated_data(cfg)  # the split into smallfed's disk cache, untimed (see the docstring)
    rows = {"plain torch loop": timed(plain_loop, cfg)}
    rows["smallfed simulate (inprocess)"] = run(cfg)
    if not args.no_ray:
        rows["smallfed simulate (ray)"] = run(cfg.replace(backend="ray"))
    rows[f"cohort ({torch.get_num_threads()} threads)"] = run(cohort)
    rows["cohort (1 thread)"] = run(cohort, threads=1)
    if args.dp:
        rows["DP-SGD inprocess"] = run(cfg.replace(**_keys(DP)))
        rows[f"DP-SGD cohort ({torch.get_num_threads()} threads)"] = run(
            cohort.replace(**_keys(DP)))

    plain_acc, plain_s = rows["plain torch loop"]
    sequential_acc = rows["smallfed simulate (inprocess)"][0]
    report = {"config": cfg.to_dict(), "runs": {}}
    print(f"{cfg.num_clients} clients, {cfg.clients_per_round} per round, "
          f"{cfg.num_server_rounds} rounds, {cfg.model} on {cfg.dataset}")
    print(f"{'run':32} {'wall s':>8} {'ratio':>6} {'final acc':>9} {'vs sequential':>13} "
          f"{'same as plain':>13}")
    for name, (acc, seconds) in rows.items():
        reference = sequential_acc if not name.startswith("DP") else rows["DP-SGD inprocess"][0]
        same, delta = acc == plain_acc, 100 * (acc[-1] - reference[-1])
        ratio = seconds / plain_s
        report["runs"][name] = {"wall_time_s": round(seconds, 3), "ratio": round(ratio, 3),
                                "final_accuracy": acc[-1], "identical_to_plain": same,
                                "points_vs_sequential": round(delta, 2)}
        print(f"{name:32} {seconds:8.2f} {ratio:6.2f} {acc[-1]:9.4f} {delta:+13.2f} "
              f"{str(same):>13}")
    if args.dp:
        dp_ratio = rows[f"DP-SGD cohort ({torch.get_num_threads()} threads)"][1] / rows[
            f"cohort ({torch.get_num_threads()} threads)"][1]
        report["dp_cohort_over_cohort"] = round(dp_ratio, 3)
        print(f"DP-SGD cohort / cohort without DP: {dp_ratio:.2f}x")
    if set(args.seeds) - {cfg.seed}:
        known = {cfg.seed: (sequential_acc[-1],
                            rows[f"cohort ({torch.get_num_threads()} threads)"][0][-1])}
        report["accuracy_over_seeds"] = _over_seeds(
            cfg, cohort, known, [cfg.seed, *args.seeds], run)
    _save(args.out, report)


def _save(out: str, report: dict) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")


def _over_seeds(cfg: Config, cohort: Config, known: dict, seeds: list[int], run) -> dict:  # type: ignore[no-untyped-def]
    """Final accuracy of the sequential path and the cohort per seed (those in
    ``known`` already run), and the mean paired difference (cohort - sequential,
    points) with its 95% interval."""
    from scipy import stats  # pylint: disable=import-outside-toplevel

    final = dict(known)
    for seed in seeds:
        if seed in final:  # already run, or given twice
            continue
        final[seed] = (run(cfg.replace(seed=seed))[0][-1], run(cohort.replace(seed=seed))[0][-1])
    deltas = np.array([100 * (c - s) for s, c in final.values()])
    half = float(stats.t.ppf(0.975, len(deltas) - 1) * deltas.std(ddof=1) / np.sqrt(len(deltas)))
    summary = {"seeds": list(final), "sequential": [s for s, _ in final.values()],
               "cohort": [c for _, c in final.values()],
               "mean_points_vs_sequential": round(float(deltas.mean()), 3),
               "ci95_half_width": round(half, 3)}
    print(f"cohort vs sequential over seeds {list(final)}: {deltas.mean():+.2f} ± {half:.2f} points "
          f"(per seed {', '.join(f'{d:+.2f}' for d in deltas)})")
    return summary


def _keys(hyphenated: dict) -> dict:
    return {k.replace("-", "_"): v for k, v in hyphenated.items()}


if __name__ == "__main__":
    main()
