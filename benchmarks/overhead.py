"""Framework overhead: a full smallfed simulation against a plain torch loop doing the same work.

The plain loop trains the same sampled clients (smallfed's seeded sampling rule), with
the same local training function, seeds and batches, averages like Flower's FedAvg
(float32, partition order) and evaluates centrally every round. Its accuracies must
equal the simulation's exactly, which proves the work is identical; the ratio of wall
times is then the cost of the framework. All runs happen in one process, one after
another, so they share the machine's state; data loading is included in every run.

    python benchmarks/overhead.py [--config simulations/mnist.toml] [--rounds 20]
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
    data_module._CACHE.clear()  # every run loads and splits the data itself
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="simulations/mnist.toml")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray backend")
    parser.add_argument("--out", default="benchmarks/results/overhead.json")
    args = parser.parse_args()
    cfg = load_config(args.config, []).replace(num_server_rounds=args.rounds, strategy="fedavg")

    plain_acc, plain_s = timed(plain_loop, cfg)
    rows = {"plain torch loop": (plain_acc, plain_s)}
    backends = ["inprocess"] if args.no_ray else ["inprocess", "ray"]
    for backend in backends:
        with TemporaryDirectory() as out:
            results, seconds = timed(
                lambda: simulate(cfg.replace(backend=backend), out, progress=False,
                                 overwrite=True))
        rows[f"smallfed simulate ({backend})"] = ([r["accuracy"] for r in results["rounds"]],
                                                  seconds)

    report = {"config": cfg.to_dict(), "runs": {}}
    print(f"{cfg.num_clients} clients, {cfg.clients_per_round} per round, "
          f"{cfg.num_server_rounds} rounds, {cfg.model} on {cfg.dataset}")
    print(f"{'run':32} {'wall s':>8} {'ratio':>6} {'final acc':>9} {'same accuracies':>15}")
    for name, (acc, seconds) in rows.items():
        same = acc == plain_acc
        ratio = seconds / plain_s
        report["runs"][name] = {"wall_time_s": round(seconds, 3), "ratio": round(ratio, 3),
                                "final_accuracy": acc[-1], "identical_to_plain": same}
        print(f"{name:32} {seconds:8.2f} {ratio:6.2f} {acc[-1]:9.4f} {str(same):>15}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
