"""Accuracy against epsilon on MNIST for sample-level DP, with and without the codec.

Each point is simulations/mnist.toml with overrides; points run two at a time. For
each: the final and best accuracy, the run's epsilon (PRV, delta 1e-5), the Poisson
sampling rate of a typical client (batch / its records), and the clients that
declined because their budget was spent. Writes benchmarks/results/dp_mnist.json.

    python benchmarks/dp_mnist.py [--rounds 30] [--workers 2] [--points LABEL ...]
        [--dp-set KEY=VALUE ...] [--out FILE]

``--dp-set`` changes the private points only (DP-SGD wants other local training than
the non-private run, which keeps mnist.toml's tuned settings).
"""

from __future__ import annotations

import argparse
import json
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from tempfile import TemporaryDirectory

from smallfed.cli import load_config
from smallfed.config import Config, parse_override
from smallfed.data import federated_data
from smallfed.simulation import simulate

CODEC = "topk:0.01:global,sign,error_feedback"
POINTS = {
    "non-private": {},
    "epsilon 8": {"privacy": "sample", "dp-target-epsilon": 8.0},
    "epsilon 3": {"privacy": "sample", "dp-target-epsilon": 3.0},
    "epsilon 1": {"privacy": "sample", "dp-target-epsilon": 1.0},
    "epsilon 8 + codec": {"privacy": "sample", "dp-target-epsilon": 8.0, "codec": CODEC},
    "non-private, 10 clients x 800": {"num-clients": 10, "clients-per-round": 10,
                                      "local-epochs": 1},
    "epsilon 8, 10 clients x 800": {"num-clients": 10, "clients-per-round": 10,
                                    "local-epochs": 1, "privacy": "sample",
                                    "dp-target-epsilon": 8.0},
}


def run(args: tuple[str, dict]) -> tuple[str, dict]:
    label, values = args
    cfg = Config.from_mapping(values)
    with TemporaryDirectory() as out:
        results = simulate(cfg, out, progress=False)
    sizes = [len(p) for p in federated_data(cfg).partitions]
    median = statistics.median(sizes)
    rounds = results["rounds"]
    return label, {
        "final_accuracy": results["summary"]["final_accuracy"],
        "best_accuracy": results["summary"]["best_accuracy"],
        "epsilon": results["summary"]["epsilon"],
        "delta": results["summary"]["delta"],
        "median_client_records": median,
        "sample_rate_median_client": min(1.0, cfg.batch_size / median),
        "clients_declined": sum(r["clients_declined"] for r in rounds),
        "compression_ratio_up": results["summary"]["compression_ratio_up"],
        "wall_time_s": results["summary"]["wall_time_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="simulations/mnist.toml")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--points", nargs="+", default=list(POINTS), choices=list(POINTS))
    parser.add_argument("--dp-set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="benchmarks/results/dp_mnist.json")
    args = parser.parse_args()
    base = load_config(args.config, []).replace(num_server_rounds=args.rounds).to_dict()
    dp_changes = dict(parse_override(item) for item in args.dp_set)
    jobs = [(label, {**base, **POINTS[label],
                     **(dp_changes if "privacy" in POINTS[label] else {})})
            for label in args.points]
    with ProcessPoolExecutor(args.workers) as pool:
        rows = dict(pool.map(run, jobs))
    for label, row in rows.items():
        eps = "-" if row["epsilon"] is None else f"{row['epsilon']:.2f}"
        print(f"{label:32} acc {row['final_accuracy']:.4f} best {row['best_accuracy']:.4f} "
              f"eps {eps:>5} q {row['sample_rate_median_client']:.3f} "
              f"declined {row['clients_declined']} {row['wall_time_s']:.0f}s")
    out = Path(args.out)
    out.write_text(json.dumps({"rounds": args.rounds, "dp_set": dp_changes, "points": rows},
                              indent=2) + "\n")


if __name__ == "__main__":
    main()
