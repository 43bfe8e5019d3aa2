"""What DP-SGD costs in time: one client's local training with Opacus against without.

Same model, data, epochs and batches, one thread, alternating runs in one process.
The accountant is excluded (fixed ``dp-noise``, RDP); its cost is printed apart.

    python benchmarks/dp_cost.py [--config simulations/mnist.toml] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

from smallfed.cli import load_config
from smallfed.data import federated_data
from smallfed.models import build_model
from smallfed.privacy.local_dp import epsilon_of, train_private
from smallfed.training import CLIENT_THREADS, client_generator, torch_threads, train

warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="simulations/mnist.toml")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--partition", type=int, default=0)
    args = parser.parse_args()
    cfg = load_config(args.config, []).replace(privacy="sample", dp_noise=1.0,
                                               dp_accountant="rdp")
    fed = federated_data(cfg)
    x, y = fed.client(args.partition)
    shape, classes = fed.dataset.input_shape, fed.dataset.num_classes
    plain, private = [], []
    with torch_threads(CLIENT_THREADS):
        for r in range(args.repeats + 1):  # the first pair warms up lazy imports
            start = time.perf_counter()
            train(build_model(cfg.model, shape, classes, r), x, y, cfg,
                  client_generator(cfg.seed, r, 0))
            plain_s = time.perf_counter() - start
            start = time.perf_counter()
            outcome = train_private(build_model(cfg.model, shape, classes, r), x, y, cfg, r, [])
            private_s = time.perf_counter() - start
            if r:
                plain.append(plain_s)
                private.append(private_s)
    start = time.perf_counter()
    epsilon_of(cfg.replace(dp_accountant="prv"), outcome.history * 10)
    prv_s = time.perf_counter() - start
    report = {
        "model": cfg.model, "examples": len(y), "local_epochs": cfg.local_epochs,
        "batch_size": cfg.batch_size, "plain_s": min(plain), "opacus_s": min(private),
        "ratio": min(private) / min(plain), "prv_epsilon_s_10_rounds": prv_s,
    }
    print(json.dumps(report, indent=2))
    out = Path("benchmarks/results/dp_cost.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
