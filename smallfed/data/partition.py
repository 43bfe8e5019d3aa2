"""Split the client pool into partitions with flwr-datasets' partitioners.

The partitioners work on a ``datasets.Dataset``; we hand them one with only the
labels and each row's index into the pool, so a partition comes back as an index
array and the images are never copied per client.

``datasets`` and ``flwr_datasets`` (with pandas and pyarrow, about 160 MB resident)
are imported only when a split is made: a device's ClientApp imports this package
but trains on its own ``data.npz`` and never splits anything.

A split is kept in smallfed's cache on disk (``smallfed.cache``, ``splits/``), keyed by
the labels, the partitioner's settings and the two libraries' versions: the import
(3.7 s here) and the split (1.3 s for 100 Dirichlet clients on 8,000 labels, one
``load_partition`` each) are otherwise paid again by every run, sweep point and
process. A split that fails is not kept: its error is raised every time.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from smallfed.cache import entry_path, write_atomic
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


SPLIT_FORMAT = "split-1"  # change it when the split or its file changes


def partition_indices(labels: torch.Tensor, cfg: Config) -> list[np.ndarray]:
    """Index arrays into the pool, one per client, in partition-id order (cached on disk)."""
    key = split_key(labels, cfg)
    path = entry_path("splits", key, ".npz")
    parts = _read(path, key, len(labels), cfg.num_clients)
    if parts is None:
        parts = _split(labels, cfg)
        _write(path, key, parts)
    return parts


def split_key(labels: torch.Tensor, cfg: Config) -> str:
    """What a split depends on: the labels, the partitioner's settings and the libraries
    that draw it (numpy's generators may change between releases). Change SPLIT_FORMAT
    when make_partitioner passes other arguments."""
    digest = hashlib.sha256(labels.numpy().astype(np.int64).tobytes()).hexdigest()
    versions = "|".join(f"{name} {metadata.version(name)}"
                        for name in ("flwr-datasets", "datasets", "numpy", "pyarrow"))
    return (f"{SPLIT_FORMAT}|{versions}|{cfg.partitioner}|"
            f"clients={cfg.num_clients}|alpha={cfg.alpha!r}|min={cfg.min_partition_size}|"
            f"classes={cfg.classes_per_client}|shards={cfg.shards_per_client}|"
            f"seed={cfg.seed}|labels={digest}")


def _read(path: Path, key: str, pool: int, clients: int) -> list[np.ndarray] | None:
    """The cached split, or None for a missing, unreadable, foreign or broken entry."""
    try:
        with np.load(path, allow_pickle=False) as entry:
            if str(entry["key"]) != key:
                return None
            offsets, rows = entry["offsets"], entry["rows"]
    except Exception:  # pylint: disable=broad-exception-caught  # any broken file: split again
        return None
    if (offsets.shape != (clients + 1,) or offsets.dtype.kind != "i" or rows.ndim != 1
            or rows.dtype != np.int64 or offsets[0] != 0 or offsets[-1] != len(rows)
            or (np.diff(offsets) <= 0).any()
            or (len(rows) and (rows.min() < 0 or rows.max() >= pool))):
        return None
    return [rows[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def _write(path: Path, key: str, parts: list[np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, key=np.array(key), rows=np.concatenate(parts),
             offsets=np.cumsum([0, *map(len, parts)]))
    write_atomic(path, buffer.getvalue(), "data splits")


def _split(labels: torch.Tensor, cfg: Config) -> list[np.ndarray]:
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
