"""Datasets load from local files and split into disjoint, seeded partitions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from smallfed.config import Config
from smallfed.data import federated_data, load_dataset, partition_indices, write_device_data
from smallfed.data.datasets import load_mnist
from tests.conftest import write_idx


def test_digits_pool_and_held_out_set() -> None:
    ds = load_dataset(Config())
    assert ds.input_shape == (1, 8, 8)
    assert len(ds.train_y) + len(ds.test_y) == 1797
    assert len(ds.test_y) == round(1797 * 0.2)
    assert abs(float(ds.train_x.mean())) < 1e-4  # normalised with the pool's statistics
    again = load_dataset(Config())
    assert torch.equal(ds.test_y, again.test_y)


def test_mnist_test_files_only_split_80_20(fake_mnist: Path) -> None:
    ds = load_mnist(fake_mnist)
    assert (len(ds.train_y), len(ds.test_y)) == (400, 100)
    assert ds.input_shape == (1, 28, 28)
    assert torch.equal(load_mnist(fake_mnist).test_y, ds.test_y)  # fixed split seed


def test_mnist_with_training_files(fake_mnist: Path) -> None:
    rng = np.random.default_rng(1)
    write_idx(fake_mnist / "train-images-idx3-ubyte", rng.integers(0, 256, (300, 28, 28)))
    write_idx(fake_mnist / "train-labels-idx1-ubyte", np.arange(300) % 10)
    ds = load_mnist(fake_mnist)
    assert (len(ds.train_y), len(ds.test_y)) == (300, 500)


def test_truncated_idx_file_is_refused(tmp_path: Path) -> None:
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((5, 28, 28)))
    raw = (tmp_path / "t10k-images-idx3-ubyte").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(raw[:-10])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(5))
    with pytest.raises(ValueError, match="header says"):
        load_mnist(tmp_path)


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "pathological", "shard"])
def test_partitions_are_disjoint_and_seeded(partitioner: str) -> None:
    cfg = Config(num_clients=10, partitioner=partitioner, classes_per_client=3)
    labels = load_dataset(cfg).train_y
    parts = partition_indices(labels, cfg)
    assert len(parts) == 10 and all(len(p) > 0 for p in parts)
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)  # no sample in two clients
    again = partition_indices(labels, cfg)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    if partitioner == "pathological":
        assert all(len(np.unique(labels[p])) <= 3 for p in parts)
    if partitioner == "iid":
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_dirichlet_is_non_iid_and_alpha_matters() -> None:
    def label_skew(alpha: float) -> float:
        cfg = Config(num_clients=10, alpha=alpha)
        labels = load_dataset(cfg).train_y.numpy()
        parts = partition_indices(torch.from_numpy(labels), cfg)
        shares = [np.bincount(labels[p], minlength=10) / len(p) for p in parts]
        return float(np.mean([s.max() for s in shares]))

    assert label_skew(0.1) > label_skew(100.0) + 0.2


def test_client_partition_and_device_file(tmp_path: Path) -> None:
    cfg = Config(num_clients=5, clients_per_round=5)
    x, y = federated_data(cfg).client(3)
    path = write_device_data(cfg, 3, tmp_path)
    with np.load(path) as npz:
        assert np.array_equal(npz["x"], x.numpy()) and np.array_equal(npz["y"], y.numpy())
    with pytest.raises(ValueError, match="partition-id 5 is outside 0..4"):
        federated_data(cfg).client(5)
