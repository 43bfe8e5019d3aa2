"""Secure aggregation with distributed DP: accuracy, bytes and cost against central DP.

Three parts, each written to ``benchmarks/results/secure_mnist.json`` (merged):

* ``population``: ``simulations/secure.toml`` (1,000 digits clients, a Poisson sample of
  100 a round, 16 bits a coordinate) against the same file with
  ``secure-aggregation = false`` (central DP-FedAvg at the same epsilon), over seeds;
  the secure runs at each ``secagg-max-dropout`` (each client's noise share assumes
  only ``1 - max-dropout`` of the cohort survives: the price of tolerating dropouts).
* ``subspace``: MNIST's cnn-tiny (1,000 clients of 8 images, 100 a round) with the
  shared subspace at 1% of the coordinates: upload bytes against dense fp32, SecAgg's own
  traffic counted.
* ``cost``: a cohort of 100 MNIST clients (cnn-tiny, one epoch over 80 images each),
  one round plain and one secure with a third of the cohort dropping after its masked
  upload: what SecAgg adds to the round's time, against the training it protects.

    python benchmarks/secure_mnist.py --parts population,subspace,cost --seeds 3 \
        --max-dropouts 0.3333333333333333,0.05
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smallfed.config import Config  # noqa: E402
from smallfed.simulation import simulate  # noqa: E402

MNIST = ROOT.parent / "shared" / "data" / "mnist"
OUT = ROOT / "benchmarks" / "results" / "secure_mnist.json"


def row(results: dict, **extra: object) -> dict:
    """What a run's results.json says that this benchmark compares."""
    s, rounds = results["summary"], results["rounds"]
    secagg = s.get("secure_aggregation") or {}
    updates = sum(r["clients"] for r in rounds)
    up = s["total_bytes_up"]
    return {
        **extra, "final_accuracy": s["final_accuracy"], "epsilon": s["epsilon"],
        "epsilon_against_server": (s.get("privacy") or {}).get("epsilon_against_server"),
        "updates": updates, "bytes_up_per_update": up / updates if updates else None,
        "secagg_bytes_up": secagg.get("total_bytes_up", 0),
        "dense_bytes_per_update": s["dense_bytes_up"] / updates if updates else None,
        "upload_ratio_vs_dense": s["dense_bytes_up"] / up if up else None,
        "bits": secagg.get("bits"), "coordinates": secagg.get("coordinates"),
        "wall_time_s": s["wall_time_s"],
    }


def population(seeds: int, max_dropouts: list[float], progress: Progress) -> list[dict]:
    """secure.toml at each secagg-max-dropout, and central DP-FedAvg, over seeds."""
    base = Config.from_toml(ROOT / "simulations" / "secure.toml")
    runs = [(dropout, seed) for seed in range(seeds) for dropout in [*max_dropouts, None]]
    task = progress.add_task("secure.toml vs central", total=len(runs))
    rows = []
    for dropout, seed in runs:
        secure = dropout is not None
        cfg = base.replace(secure_aggregation=secure, seed=42 + seed,
                           secagg_max_dropout=dropout if secure else base.secagg_max_dropout)
        with tempfile.TemporaryDirectory() as tmp:
            results = simulate(cfg, tmp, progress=False)
        rows.append(row(results, part="population", secure=secure, seed=cfg.seed,
                        max_dropout=dropout))
        progress.advance(task)
    return rows


def mnist_population(**changes: object) -> Config:
    """1,000 MNIST clients of 8 images (the 10,000 test images, 20% held out), 100 a round."""
    return Config(dataset="mnist", data_dir=str(MNIST), test_fraction=0.2, num_clients=1000,
                  clients_per_round=100, partitioner="iid", model="cnn-tiny",
                  local_epochs=5, batch_size=8, lr=0.05, momentum=0.0, seed=42,
                  **changes)  # type: ignore[arg-type]


def subspace(progress: Progress) -> list[dict]:
    cfg = mnist_population(num_server_rounds=30, privacy="user", dp_noise=1.0, dp_clip=0.5,
                           secure_aggregation=True, subspace=0.01, secagg_bits=12)
    task = progress.add_task("MNIST, 1% subspace, secure", total=1)
    with tempfile.TemporaryDirectory() as tmp:
        results = simulate(cfg, tmp, progress=False)
    progress.advance(task)
    return [row(results, part="subspace", secure=True, subspace=0.01)]


def cost(progress: Progress) -> list[dict]:
    """One round of 100 clients, plain then secure with 33 dropping after the upload."""
    from flwr.app import Message

    from smallfed.flower.client import build_client_app
    from smallfed.flower.inprocess import InProcessGrid
    from smallfed.flower.server import build_server_app

    cfg = Config(dataset="mnist", data_dir=str(MNIST), test_fraction=0.2, num_clients=100,
                 clients_per_round=100, model="cnn-tiny", local_epochs=1, batch_size=16,
                 lr=0.05, momentum=0.0, seed=42, num_server_rounds=1, update_clip=1.0,
                 fraction_evaluate=0.0)
    task = progress.add_task("a round of 100: plain, secure", total=2)
    rows = []
    for secure in (False, True):
        run_cfg = cfg.replace(secure_aggregation=secure)
        gone: list[int] = []

        def on_reply(reply: Message) -> None:
            if secure and reply.metadata.message_type == "train" and len(gone) < 33:
                gone.append(reply.metadata.src_node_id)
                grid.disconnect(reply.metadata.src_node_id)  # after its masked upload

        grid = InProcessGrid(build_client_app(run_cfg), run_cfg.num_clients,
                             run_config=run_cfg.to_dict(), on_reply=on_reply)
        with tempfile.TemporaryDirectory() as tmp:
            build_server_app(run_cfg, tmp)(grid, grid.server_context())
            results = json.loads((Path(tmp) / "results.json").read_text())
        rows.append(row(results, part="cost", secure=secure, dropped_after_upload=len(gone),
                        round_time_s=results["rounds"][-1]["wall_time_s"]))
        progress.advance(task)
    plain, secure_row = rows
    secure_row["secagg_cost_s"] = secure_row["round_time_s"] - plain["round_time_s"]
    secure_row["secagg_cost_vs_training"] = secure_row["secagg_cost_s"] / plain["round_time_s"]
    return rows


def summarize(rows: list[dict], console: Console) -> None:
    table = Table(title="Secure aggregation (benchmarks/results/secure_mnist.json)")
    for name in ("part", "secure", "seed", "final_accuracy", "epsilon", "bits",
                 "bytes_up_per_update", "upload_ratio_vs_dense", "round_time_s"):
        table.add_column(name)
    for r in rows:
        table.add_row(*[f"{r.get(k):.4g}" if isinstance(r.get(k), float) else str(r.get(k, ""))
                        for k in ("part", "secure", "seed", "final_accuracy", "epsilon", "bits",
                                  "bytes_up_per_update", "upload_ratio_vs_dense",
                                  "round_time_s")])
    console.print(table)
    for dropout in sorted({r.get("max_dropout") for r in rows if r["part"] == "population"},
                          key=lambda d: -1 if d is None else d):
        accs = [r["final_accuracy"] for r in rows
                if r["part"] == "population" and r.get("max_dropout") == dropout]
        name = "central" if dropout is None else f"secure, max-dropout {dropout:.3g}"
        console.print(f"population, {name}: final accuracy {statistics.mean(accs):.4f} "
                      f"(min {min(accs):.4f}, max {max(accs):.4f}) over {len(accs)} seeds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="population,subspace,cost")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-dropouts", default="0.3333333333333333,0.05",
                        help="population: the secure runs' secagg-max-dropout values")
    args = parser.parse_args()
    parts = args.parts.split(",")
    saved = json.loads(OUT.read_text()) if OUT.is_file() else {}
    console = Console()
    started = time.perf_counter()
    with Progress(console=console) as progress:
        for part in parts:
            dropouts = [float(d) for d in args.max_dropouts.split(",")]
            fn = {"population": lambda: population(args.seeds, dropouts, progress),
                  "subspace": lambda: subspace(progress), "cost": lambda: cost(progress)}[part]
            saved[part] = fn()
            OUT.parent.mkdir(parents=True, exist_ok=True)
            OUT.write_text(json.dumps(saved, indent=2) + "\n")
    summarize([r for part in saved.values() for r in part], console)
    console.print(f"{time.perf_counter() - started:.0f} s; results in {OUT}")


if __name__ == "__main__":
    main()
