"""One round of 1,000 cnn-tiny MNIST clients: sequential on the CPU against the cohort
engine on the CPU and, when torch sees one, on a GPU.

Training only (no Flower around it), so the ratio is the engine's: every client trains
one round of ``simulations/mnist.toml``'s local training on its partition of a
1,000-client split, first one after another on one thread (the sequential path), then
all as cohorts of ``--cohort`` clients. The GPU run is warmed up once first (CUDA
context, kernels); its models are checked against the CPU's.

    python benchmarks/cohort_scale.py [--clients 1000] [--cohort 1000]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from smallfed.cli import load_config
from smallfed.cohort.trainer import Job, train_cohort
from smallfed.data import federated_data
from smallfed.models import build_model
from smallfed.training import CLIENT_THREADS, client_generator, torch_threads, train


def cohorts(device: torch.device, data: list, cfg, base, size: int) -> tuple[list, float]:
    models = [copy.deepcopy(base) for _ in data]
    start = time.perf_counter()
    for first in range(0, len(data), size):
        outcomes = train_cohort([Job(models[i], *data[i], cfg, client_generator(cfg.seed, 1, i))
                                 for i in range(first, min(first + size, len(data)))],
                                device, print)
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if failed:  # out of memory, say: a benchmark must not time a fallback
            raise failed[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return models, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="simulations/mnist.toml")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--cohort", type=int, default=1000)
    parser.add_argument("--out", default="benchmarks/results/cohort_scale.json")
    args = parser.parse_args()
    cfg = load_config(args.config, [f"num-clients={args.clients}",
                                    f"clients-per-round={args.clients}", "partitioner=iid"])
    fed = federated_data(cfg)
    data = [fed.client(i) for i in range(args.clients)]
    base = build_model(cfg.model, fed.dataset.input_shape, fed.dataset.num_classes, cfg.seed)

    start = time.perf_counter()
    sequential = [copy.deepcopy(base) for _ in data]
    with torch_threads(CLIENT_THREADS):
        for i, (model, (x, y)) in enumerate(zip(sequential, data)):
            train(model, x, y, cfg, client_generator(cfg.seed, 1, i))
    rows = {"sequential CPU, 1 thread": time.perf_counter() - start}
    _, rows[f"cohort CPU, {torch.get_num_threads()} threads"] = cohorts(
        torch.device("cpu"), data, cfg, base, args.cohort)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if gpu:
        cohorts(torch.device("cuda"), data[:args.cohort], cfg, base, args.cohort)  # warm-up
        models, rows[f"cohort GPU ({gpu})"] = cohorts(torch.device("cuda"), data, cfg, base,
                                                      args.cohort)
        worst = max(float((p - q).abs().max()) for a, b in zip(sequential, models)
                    for p, q in zip(a.parameters(), b.parameters()))
        print(f"largest parameter difference GPU vs sequential CPU: {worst:.2e}")
    baseline = rows["sequential CPU, 1 thread"]
    print(f"{args.clients} clients, {cfg.model}, {cfg.local_epochs} local epochs, batch "
          f"{cfg.batch_size}, about {sum(len(y) for _, y in data) // args.clients} samples each")
    for name, seconds in rows.items():
        print(f"{name:40} {seconds:8.2f} s  {baseline / seconds:6.1f}x")
    if not gpu:
        print("no GPU here: the GPU target was not measured")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(
        {"clients": args.clients, "cohort": args.cohort, "gpu": gpu,
         "seconds": {k: round(v, 3) for k, v in rows.items()},
         "speedup": {k: round(baseline / v, 2) for k, v in rows.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
