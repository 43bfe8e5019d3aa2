"""Federated against centralized accuracy on MNIST (simulations/mnist.toml).

For each model: the federated run's accuracy per round and the rounds it needs to
reach the target, and its centralized twin, the same model trained with Adam on the
pooled 8,000 client images (the union of every client's data) and tested on the same
2,000 held-out images. Writes benchmarks/results/mnist_accuracy.{json,png}.

    python benchmarks/mnist_accuracy.py [--models cnn-tiny cnn-seed] [--rounds 100]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from smallfed.cli import load_config  # noqa: E402
from smallfed.config import Config  # noqa: E402
from smallfed.data import federated_data  # noqa: E402
from smallfed.models import build_model  # noqa: E402
from smallfed.simulation import simulate  # noqa: E402
from smallfed.training import evaluate, train  # noqa: E402

RESULTS = Path("benchmarks/results")


def centralized(cfg: Config, epochs: int) -> list[float]:
    """Test accuracy after each epoch of Adam (lr 1e-3, batch 32) on the pooled data."""
    ds = federated_data(cfg).dataset
    model = build_model(cfg.model, ds.input_shape, ds.num_classes, cfg.seed)
    central = cfg.replace(optimizer="adam", lr=1e-3, batch_size=32, local_epochs=1)
    gen = torch.Generator().manual_seed(cfg.seed)
    accuracies = []
    for _ in range(epochs):
        train(model, ds.train_x, ds.train_y, central, gen)
        accuracies.append(evaluate(model, ds.test_x, ds.test_y)[1])
    return accuracies


def rounds_to(accuracies: list[float], target: float) -> int | None:
    return next((i for i, a in enumerate(accuracies) if a >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="simulations/mnist.toml")
    parser.add_argument("--models", nargs="+", default=["cnn-tiny", "cnn-seed"])
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.97)
    args = parser.parse_args()
    base = load_config(args.config, [])
    if args.rounds:
        base = base.replace(num_server_rounds=args.rounds)
    RESULTS.mkdir(parents=True, exist_ok=True)
    report: dict = {"config": base.to_dict(), "target": args.target, "models": {}}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in args.models:
        cfg = base.replace(model=name)
        run = simulate(cfg, RESULTS / f"mnist-{name}", progress=True, overwrite=True)
        fed = [r["accuracy"] for r in run["rounds"]]
        cen = centralized(cfg, args.epochs)
        report["models"][name] = {
            "federated_accuracy": fed,
            "federated_final": fed[-1],
            "federated_best": max(fed),
            "rounds_to_target": rounds_to(fed, args.target),
            "centralized_accuracy_per_epoch": cen,
            "centralized_final": cen[-1],
            "gap_final_points": round(100 * (cen[-1] - fed[-1]), 2),
            "model_params": run["summary"]["model_params"],
            "wall_time_s": run["summary"]["wall_time_s"],
        }
        line = ax.plot(range(len(fed)), fed, label=f"{name} federated")[0]
        ax.axhline(cen[-1], ls="--", color=line.get_color(), label=f"{name} centralized")
        print(name, json.dumps({k: v for k, v in report["models"][name].items()
                                if not isinstance(v, list)}))
    ax.axhline(args.target, color="grey", lw=0.8)
    ax.set(xlabel="round", ylabel="held-out accuracy", ylim=(0.8, 1.0),
           title=f"MNIST, {base.num_clients} clients, Dirichlet({base.alpha}), "
                 f"{base.clients_per_round} per round")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(RESULTS / "mnist_accuracy.png", dpi=120)
    (RESULTS / "mnist_accuracy.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
