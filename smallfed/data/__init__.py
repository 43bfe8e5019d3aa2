"""Datasets and their split across clients."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from smallfed.config import Config, ConfigError
from smallfed.data.checks import check_dataset
from smallfed.data.datasets import (
    DATASETS,
    MNIST_POOL_FRACTION,
    MNIST_SPLIT_SEED,
    Dataset,
    DatasetLoader,
    check_dataset_name,
    load_custom,
    load_hub,
    register_dataset,
)
from smallfed.data.partition import make_partitioner, partition_indices

__all__ = [
    "DATASETS",
    "MNIST_POOL_FRACTION",
    "MNIST_SPLIT_SEED",
    "Dataset",
    "DatasetLoader",
    "FederatedData",
    "check_data_config",
    "check_dataset",
    "check_dataset_name",
    "federated_data",
    "load_dataset",
    "make_partitioner",
    "partition_indices",
    "register_dataset",
    "write_device_data",
]


@dataclass(frozen=True)
class FederatedData:
    """A dataset and its partition of the pool, one index array per client."""

    dataset: Dataset
    partitions: list[np.ndarray]

    def client(self, partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) of one client."""
        if not 0 <= partition_id < len(self.partitions):
            raise ValueError(
                f"partition-id {partition_id} is outside 0..{len(self.partitions) - 1}: the "
                f"federation has more nodes than num-clients ({len(self.partitions)}); start "
                "as many SuperNodes as num-clients, or raise num-clients"
            )
        rows = self.partitions[partition_id]
        return self.dataset.train_x[rows], self.dataset.train_y[rows]


def load_dataset(cfg: Config) -> Dataset:
    """The dataset the configuration names (see the ``dataset`` key), checked for use."""
    name = cfg.dataset
    check_dataset_name(name)
    if name in DATASETS:
        dataset = DATASETS[name](cfg)
    elif name.startswith("hf:"):
        dataset = load_hub(name[3:], cfg.seed, cfg.test_fraction)
    else:
        dataset = load_custom(name)
    check_dataset(dataset, name)
    return dataset


_DATA_KEYS = ("dataset", "data-dir", "test-fraction", "seed", "num-clients", "partitioner",
              "alpha", "min-partition-size", "classes-per-client", "shards-per-client")
_CACHE: dict[tuple, FederatedData] = {}
_CACHE_LOCK = threading.Lock()  # the cohort engine's ClientApp calls run on threads


def federated_data(cfg: Config) -> FederatedData:
    """The dataset and its partitions, built once per process and per data configuration.

    Every client of a simulation in this process shares the one copy.
    """
    values = cfg.to_dict()
    key = tuple(values[k] for k in _DATA_KEYS)
    with _CACHE_LOCK:
        if key not in _CACHE:
            if len(_CACHE) >= 4:
                _CACHE.pop(next(iter(_CACHE)))
            dataset = load_dataset(cfg)
            _CACHE[key] = FederatedData(dataset, partition_indices(dataset.train_y, cfg))
        return _CACHE[key]


def check_data_config(cfg: Config) -> FederatedData:
    """Load and split the data before a run starts, turning every problem into a ConfigError."""
    if cfg.dataset == "mnist" and not Path(cfg.data_dir).is_dir():
        raise ConfigError(
            f"data-dir: {cfg.data_dir!r} is not a folder; point it at the MNIST IDX files, "
            "for example ../shared/data/mnist"
        )
    try:
        dataset = load_dataset(cfg)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from err
    pool = len(dataset.train_y)
    if cfg.num_clients > pool:
        raise ConfigError(
            f"num-clients: {cfg.num_clients} is more than the {pool} training samples of "
            f"dataset {cfg.dataset!r}; use at most {pool}"
        )
    return federated_data(cfg)


def write_device_data(cfg: Config, partition_id: int, folder: str | Path) -> Path:
    """Write one partition as ``data.npz`` (x, y) for a device's ``data-dir`` node config."""
    x, y = federated_data(cfg).client(partition_id)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "data.npz", x=x.numpy(), y=y.numpy())
    return out / "data.npz"
