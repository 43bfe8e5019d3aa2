"""Peak memory against population size: 100, 1,000 and 10,000 virtual clients.

Each size runs in a fresh process (spawned): 3 rounds of 10 clients of cnn-tiny on
the same 60,000 synthetic 28x28 images split IID, so the data's memory is equal at
every size and what grows is per-client overhead (node contexts, partition indices,
the server's partition map). MNIST's pool here has only 8,000 images, too few for
10,000 clients. Peak resident memory is ru_maxrss of the child. Writes
benchmarks/results/scale_memory.json.

    python benchmarks/scale_memory.py [--sizes 100 1000 10000]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np

IMAGES = 60_000


def synthetic():  # type: ignore[no-untyped-def]
    """60,000 random 28x28 images with 10 labels (a custom dataset, see smallfed.data)."""
    from smallfed.data.datasets import _from_arrays

    rng = np.random.default_rng(0)
    x = rng.random((IMAGES + 2000, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, IMAGES + 2000)
    return _from_arrays("synthetic", x[:IMAGES], y[:IMAGES], x[IMAGES:], y[IMAGES:], 10)


def run(size: int, queue: multiprocessing.Queue) -> None:
    from smallfed.config import Config
    from smallfed.simulation import simulate

    cfg = Config(dataset="scale_memory:synthetic", num_clients=size, clients_per_round=10,
                 num_server_rounds=3, partitioner="iid", local_epochs=1, batch_size=32,
                 seed=1)
    start = time.perf_counter()
    with TemporaryDirectory() as out:
        simulate(cfg, out, progress=False)
    queue.put({"clients": size, "peak_rss_mb": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 1024, "wall_time_s": time.perf_counter() - start})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    rows = []
    for size in args.sizes:
        queue = context.Queue()
        child = context.Process(target=run, args=(size, queue))
        child.start()
        rows.append(queue.get())
        child.join()
        print(f"{size:>6} clients: peak {rows[-1]['peak_rss_mb']:.0f} MB, "
              f"{rows[-1]['wall_time_s']:.1f} s")
    out = Path("benchmarks/results/scale_memory.json")
    out.write_text(json.dumps({"images": IMAGES, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
