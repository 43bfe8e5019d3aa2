"""Split the client pool into partitions with flwr-datasets' partitioners.

The partitioners work on a ``datasets.Dataset``; we hand them one with only the
labels and each row's index into the pool, so a partition comes back as an index
array and the images are never copied per client.

``datasets`` and ``flwr_datasets`` (with pandas and pyarrow, about 160 MB resident)
are imported only when a split is made: a device's ClientApp imports this package
but trains on its own ``data.npz`` and never splits anything.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch

from smallfed.config import Config, ConfigError

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner


def make_partitioner(cfg: Config) -> Partitioner:
    """The flwr-datasets partitioner the configuration names, seeded by ``seed``."""
    from flwr_datasets.partitioner import (  # pylint: disable=import-outside-toplevel
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
        ShardPartitioner,
    )

    n = cfg.num_clients
    if cfg.partitioner == "iid":
        return IidPartitioner(num_partitions=n)
    if cfg.partitioner == "dirichlet":
        return DirichletPartitioner(
            num_partitions=n, partition_by="label", alpha=cfg.alpha,
            min_partition_size=cfg.min_partition_size, self_balancing=False, seed=cfg.seed,
        )
    if cfg.partitioner == "pathological":
        return PathologicalPartitioner(
            num_partitions=n, partition_by="label",
            num_classes_per_partition=cfg.classes_per_client, seed=cfg.seed,
        )
    return ShardPartitioner(
        num_partitions=n, partition_by="label",
        num_shards_per_partition=cfg.shards_per_client, seed=cfg.seed,
    )


def partition_indices(labels: torch.Tensor, cfg: Config) -> list[np.ndarray]:
    """Index arrays into the pool, one per client, in partition-id order."""
    from datasets import Dataset as HFDataset  # pylint: disable=import-outside-toplevel

    table = HFDataset.from_dict(
        {"label": labels.numpy(), "row": np.arange(len(labels), dtype=np.int64)}
    )
    partitioner = make_partitioner(cfg)
    partitioner.dataset = table
    try:
        with warnings.catch_warnings():
            # The Dirichlet partitioner warns on every resampling attempt; a split that
            # never succeeds becomes one ConfigError below, which says what to change.
            warnings.filterwarnings("ignore", message="The specified min_partition_size")
            warnings.filterwarnings("ignore", category=FutureWarning, module="pyarrow")
            parts = [
                np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64)
                for i in range(cfg.num_clients)
            ]
    except ValueError as err:
        raise ConfigError(
            f"partitioner: {cfg.partitioner} cannot split {len(labels)} samples into "
            f"{cfg.num_clients} clients with this configuration ({err}); lower "
            "num-clients, min-partition-size or classes-per-client, or raise alpha"
        ) from err
    # The iid/dirichlet/shard partitioners always use the whole pool; pathological may
    # leave classes unassigned, which is the point of it. Empty clients cannot train.
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ConfigError(
            f"partitioner: {cfg.partitioner} left {len(empty)} of {cfg.num_clients} clients "
            "without data; lower num-clients or use another partitioner"
        )
    return parts
