"""Accuracy against epsilon on MNIST for sample-level DP, with and without compression.

Each point is simulations/mnist.toml with overrides; points run ``--workers`` at a
time. For each: the final and best accuracy, the accuracy curve, the run's epsilon
(PRV, delta 1e-5), the Poisson sampling rate of a typical client (batch / its records),
the clients that declined because their budget was spent, and the upload compression
against dense fp32. Writes benchmarks/results/dp_mnist.json (or ``--out``).

    python benchmarks/dp_mnist.py [--rounds 30] [--workers 2] [--points LABEL ...]
        [--set KEY=VALUE ...] [--dp-set KEY=VALUE ...] [--central-set KEY=VALUE ...]
        [--fast-scatter] [--out FILE]

``--fast-scatter`` (model = scatter-linear only) trains its GroupNorm + Linear on
precomputed scattering features: the same model, per-sample gradients and mechanism
(the scattering is fixed), about 35x faster on CPU. The issue-16 runs and their
commands: BENCHMARKS.md, "Private and compressed"; results in benchmarks/results/dp16_*.

``--dp-set`` changes the private points only (DP-SGD wants other local training than
the non-private run, which keeps mnist.toml's tuned settings); ``--set`` changes every
point. Any configuration key passes through (model, subspace, codec, strategy,
server-momentum, dp-plan-quantile, ...); a point's own keys (its privacy, epsilon, split)
are applied last, except that ``--dp-set codec=...`` overrides the codec points'.

The ``central DP-SGD`` points are the anchor the federated runs are judged against:
plain Opacus DP-SGD (the project's ``train_private``, one client holding everything) on
the SAME pool of training images the 100-client split uses (every client's partition
concatenated, 8,000 images), with the same model and clip as the private points, at
the point's epsilon (delta 1e-5, the same accountant), evaluated on the same held-out
set. Its own batch size, epochs and learning rate come from ``--central-set``
(defaults: expected batch 256, 20 epochs, lr 1.0, momentum 0.5).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np

from smallfed.cli import load_config
from smallfed.config import Config, parse_override
from smallfed.data import federated_data

CODEC = "topk:0.01:global,sign,error_feedback"
# A shared random subspace of 4% of the coordinates, each value sent as 8 bits: about
# 1/0.04 * 4 = 100x fewer upload bytes than dense fp32, with no positions on the wire.
SUBSPACE_CODEC = {"subspace": 0.04, "codec": "quantize:8"}
SPLIT_800 = {"num-clients": 10, "clients-per-round": 10, "local-epochs": 1}
POINTS = {
    "non-private": {},
    "epsilon 8": {"privacy": "sample", "dp-target-epsilon": 8.0},
    "epsilon 3": {"privacy": "sample", "dp-target-epsilon": 3.0},
    "epsilon 1": {"privacy": "sample", "dp-target-epsilon": 1.0},
    "epsilon 8 + codec": {"privacy": "sample", "dp-target-epsilon": 8.0, "codec": CODEC},
    "epsilon 8 + subspace codec": {"privacy": "sample", "dp-target-epsilon": 8.0,
                                   **SUBSPACE_CODEC},
    "epsilon 3 + subspace codec": {"privacy": "sample", "dp-target-epsilon": 3.0,
                                   **SUBSPACE_CODEC},
    "non-private, 10 clients x 800": SPLIT_800,
    "epsilon 8, 10 clients x 800": {**SPLIT_800, "privacy": "sample",
                                    "dp-target-epsilon": 8.0},
    "epsilon 3, 10 clients x 800": {**SPLIT_800, "privacy": "sample",
                                    "dp-target-epsilon": 3.0},
    "central DP-SGD, epsilon 8": {"privacy": "sample", "dp-target-epsilon": 8.0,
                                  "central": True},
    "central DP-SGD, epsilon 3": {"privacy": "sample", "dp-target-epsilon": 3.0,
                                  "central": True},
}
# Split keys a point fixes: --dp-set does not override them (the point is the split).
POINT_FIXED = ("num-clients", "clients-per-round", "privacy", "dp-target-epsilon")
CENTRAL_DEFAULTS = {"batch-size": 256, "local-epochs": 20, "lr": 1.0, "momentum": 0.5}
NOISE_CACHE = Path("/tmp/dp16_noise_cache.json")
FEATURE_CACHE = Path("/tmp/dp16_scatter_features.pt")
# --fast-scatter: the scatter-linear model split at its fixed front end. The scattering
# has no parameters and no randomness, so training GroupNorm + Linear on precomputed
# scattering features is the same model, the same per-sample gradients and the same
# mechanism; only the 59M MACs per image are not recomputed every round.
FAST_DATASET = "dp_mnist:scattered_mnist"
FAST_MODEL = "dp_mnist:scatter_linear_head"


def scattered_mnist(data_dir: str = "../shared/data/mnist"):
    """MNIST as smallfed loads it from mnist.toml's data-dir, each image replaced by its
    scattering (81 x 7 x 7)."""
    import torch

    from smallfed.data.datasets import load_mnist
    from smallfed.models.scatter import Scattering2D

    dataset = load_mnist(data_dir)
    key = (len(dataset.train_y), len(dataset.test_y), float(dataset.train_x.sum()))
    if FEATURE_CACHE.exists():
        saved = torch.load(FEATURE_CACHE)
        if saved["key"] == key:
            return replace(dataset, name="scattered-mnist", train_x=saved["train"],
                           test_x=saved["test"])
    scattering = Scattering2D(tuple(dataset.train_x.shape[1:]))
    with torch.no_grad():
        train = torch.cat([scattering(b) for b in dataset.train_x.split(500)])
        test = torch.cat([scattering(b) for b in dataset.test_x.split(500)])
    tmp = FEATURE_CACHE.with_suffix(f".{time.time_ns()}.tmp")
    torch.save({"key": key, "train": train, "test": test}, tmp)
    tmp.replace(FEATURE_CACHE)
    return replace(dataset, name="scattered-mnist", train_x=train, test_x=test)


def scatter_linear_head(input_shape, num_classes):
    """scatter-linear without its fixed scattering: GroupNorm(27, 81), Flatten, Linear."""
    from torch import nn

    channels = input_shape[0]
    groups = channels // 3 if channels % 3 == 0 else 1
    return nn.Sequential(nn.GroupNorm(groups, channels), nn.Flatten(),
                         nn.Linear(math.prod(input_shape), num_classes))


def run(args: tuple[str, dict]) -> tuple[str, dict]:
    label, values = args
    values = dict(values)
    if values.pop("central", False):
        return label, run_central(Config.from_mapping(values))
    from smallfed.simulation import simulate

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
        "total_bytes_up": results["summary"]["total_bytes_up"],
        "model_params": results["summary"]["model_params"],
        "wall_time_s": results["summary"]["wall_time_s"],
        "accuracy_curve": [r["accuracy"] for r in rounds],
        "config": cfg.to_dict(),
    }


def run_central(cfg: Config) -> dict:
    """Central DP-SGD: one holder of the whole pool, ``local-epochs`` epochs of DP-SGD.

    The pool is every client's partition concatenated (the 8,000 images the federated
    split shares out); one call of ``train_private`` planned for one round of
    ``local-epochs`` epochs spends the target epsilon, accounted as in the federated runs.
    Evaluated after every epoch on the server's held-out set (epoch-wise evaluation is
    public post-processing; the budget covers all epochs).
    """
    import torch

    from smallfed.models import build_model
    from smallfed.privacy.local_dp import epsilon_of, noise_for, planned_step, train_private
    from smallfed.training import CLIENT_THREADS, evaluate, torch_threads

    data = federated_data(cfg)
    rows = np.concatenate(data.partitions)
    x, y = data.dataset.train_x[rows], data.dataset.train_y[rows]
    dataset = data.dataset
    epochs = cfg.local_epochs
    # One round of all epochs: planned_rounds = 1 (one client, sampled every round).
    whole = cfg.replace(num_clients=1, clients_per_round=1, num_server_rounds=1)
    model = build_model(cfg.model, dataset.input_shape, dataset.num_classes, cfg.seed)
    noise = noise_for(whole, len(y))
    # Epoch by epoch, with the noise of the whole plan: the same mechanism as one round
    # of `epochs` epochs, so the history composes to the planned epsilon.
    per_epoch = whole.replace(local_epochs=1)
    _, rate, steps = planned_step(per_epoch, len(y))
    history, curve = [], []
    start = time.time()
    with torch_threads(max(CLIENT_THREADS, torch.get_num_threads())):
        for epoch in range(epochs):
            # train_private plans from `per_epoch`'s cfg; force the whole plan's noise.
            model.train()
            outcome = _train_epoch(train_private, model, x, y, per_epoch, whole, epoch,
                                   history)
            history = outcome.history
            curve.append(evaluate(model, dataset.test_x, dataset.test_y)[1])
    return {
        "final_accuracy": curve[-1],
        "best_accuracy": max(curve),
        "epsilon": epsilon_of(whole, history),
        "delta": cfg.dp_delta,
        "pool_records": int(len(y)),
        "noise_multiplier": noise,
        "sample_rate": rate,
        "steps": steps * epochs,
        "epochs": epochs,
        "wall_time_s": round(time.time() - start, 1),
        "accuracy_curve": curve,
        "config": cfg.to_dict(),
    }


def _train_epoch(train_private, model, x, y, per_epoch: Config, whole: Config, epoch: int,
                 history: list):
    """One epoch of DP-SGD at the noise ``whole`` plans (all epochs at once)."""
    import smallfed.privacy.local_dp as local_dp

    planned = local_dp.noise_for(whole, len(y))
    original = local_dp.noise_for
    local_dp.noise_for = lambda cfg, n: planned  # the epoch's step: whole plan's noise
    try:
        outcome = train_private(model, x, y, per_epoch.replace(dp_budget=1e9), seed=
                                1000 + epoch, history=history)
    finally:
        local_dp.noise_for = original
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="simulations/mnist.toml")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--points", nargs="+", default=list(POINTS), choices=list(POINTS))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", dest="all_set")
    parser.add_argument("--dp-set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--central-set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--fast-scatter", action="store_true",
                        help="model = scatter-linear trained on precomputed scattering "
                             "features (same model and mechanism, much faster on CPU)")
    parser.add_argument("--out", default="benchmarks/results/dp_mnist.json")
    args = parser.parse_args()
    base = load_config(args.config, []).replace(num_server_rounds=args.rounds).to_dict()
    all_changes = dict(parse_override(item) for item in args.all_set)
    dp_changes = dict(parse_override(item) for item in args.dp_set)
    central_changes = {**CENTRAL_DEFAULTS,
                       **dict(parse_override(item) for item in args.central_set)}
    jobs = []
    for label in args.points:
        point = dict(POINTS[label])
        values = {**base, **all_changes}
        if "privacy" in point:
            values.update(dp_changes)
            if "codec" in dp_changes:
                point.pop("codec", None)
            if "subspace" in dp_changes:
                point.pop("subspace", None)
        if point.get("central"):
            values.update({k: v for k, v in central_changes.items() if k != "rounds"})
            # the central anchor uses neither the federation's codec nor its subspace
            values.update({"codec": "none", "subspace": 0.0})
        values.update({k: v for k, v in point.items()})
        if args.fast_scatter:
            if values["model"] != "scatter-linear":
                parser.error("--fast-scatter needs model = scatter-linear")
            values.update({"dataset": FAST_DATASET, "model": FAST_MODEL})
        jobs.append((label, values))
    with ProcessPoolExecutor(args.workers) as pool:
        rows = dict(pool.map(run, jobs))
    for label, row in rows.items():
        eps = "-" if row["epsilon"] is None else f"{row['epsilon']:.2f}"
        print(f"{label:32} acc {row['final_accuracy']:.4f} best {row['best_accuracy']:.4f} "
              f"eps {eps:>5} up {row.get('compression_ratio_up', 1.0):.1f}x "
              f"declined {row.get('clients_declined', 0)} {row['wall_time_s']:.0f}s")
    out = Path(args.out)
    out.write_text(json.dumps({"rounds": args.rounds, "fast_scatter": args.fast_scatter,
                               "set": all_changes,
                               "dp_set": dp_changes, "central_set": central_changes,
                               "points": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
