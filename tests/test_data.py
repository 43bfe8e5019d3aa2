"""Datasets load from local files, are checked, and split into disjoint, seeded partitions."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from smallfed.config import Config, ConfigError
from smallfed.data import (
    DATASETS,
    Dataset,
    check_data_config,
    check_dataset,
    check_dataset_name,
    federated_data,
    load_dataset,
    partition_indices,
    register_dataset,
    write_device_data,
)
from smallfed.data import partition
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
    again = partition._split(labels, cfg)  # pylint: disable=protected-access  # uncached
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    if partitioner == "pathological":
        assert all(len(np.unique(labels[p])) <= 3 for p in parts)
    if partitioner == "iid":
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_a_split_is_made_once_and_then_read_from_the_disk_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMALLFED_CACHE_DIR", str(tmp_path))
    cfg = Config(num_clients=10, partitioner="dirichlet")
    labels = load_dataset(cfg).train_y
    splits: list[int] = []
    real_split = partition._split  # pylint: disable=protected-access

    def counted(labels: torch.Tensor, cfg: Config) -> list[np.ndarray]:
        splits.append(cfg.seed)
        return real_split(labels, cfg)

    monkeypatch.setattr(partition, "_split", counted)
    first = partition_indices(labels, cfg)
    (entry,) = (tmp_path / "splits").iterdir()
    assert [np.array_equal(a, b) for a, b in zip(first, partition_indices(labels, cfg))] == [
        True] * 10
    assert splits == [cfg.seed]  # the second came from the file
    partition_indices(labels, replace(cfg, seed=7))  # another key, another entry
    partition_indices(labels[:-1], cfg)  # other labels too
    assert splits == [cfg.seed, 7, cfg.seed] and len(list((tmp_path / "splits").iterdir())) == 3
    entry.write_bytes(entry.read_bytes()[:100])  # a broken entry is split again
    assert all(np.array_equal(a, b) for a, b in zip(first, partition_indices(labels, cfg)))
    assert len(splits) == 4


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


# --- a user's dataset is checked before the run ---------------------------------------
def tabular() -> Dataset:
    """Bring-your-own tabular data (used by name below): 13 features, 3 classes."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(60, 13))).float()
    y = torch.arange(60) % 3
    return Dataset("tabular", x[:48], y[:48], x[48:], y[48:], num_classes=3)


def numpy_inputs() -> Dataset:
    good = tabular()
    return replace(good, train_x=good.train_x.numpy())


def test_tabular_data_loads_splits_and_writes_device_files(tmp_path: Path) -> None:
    cfg = Config(dataset="tests.test_data:tabular", model="mlp", num_clients=4,
                 clients_per_round=4, partitioner="iid")
    data = check_data_config(cfg)
    assert data.dataset.input_shape == (13,)
    x, y = data.client(2)
    assert x.shape[1:] == (13,) and len(x) == len(y) > 0
    with np.load(write_device_data(cfg, 2, tmp_path)) as npz:
        assert npz["x"].shape == (len(x), 13)


def test_a_bad_user_dataset_fails_before_the_run_with_the_fix() -> None:
    cfg = Config(dataset="tests.test_data:numpy_inputs", model="mlp", num_clients=4,
                 clients_per_round=4)
    with pytest.raises(ConfigError, match=r"^dataset 'tests.test_data:numpy_inputs': train_x "
                                          r"is a numpy.ndarray; use torch.from_numpy\(x\).float\(\)$"):
        check_data_config(cfg)


def _broken(**change: object) -> Dataset:
    return replace(tabular(), **change)  # type: ignore[arg-type]


GOOD = tabular()


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ({"x": 1}, "returned a dict, not smallfed.data.Dataset"),
        (_broken(train_x=GOOD.train_x.numpy()),
         "train_x is a numpy.ndarray; use torch.from_numpy(x).float()"),
        (_broken(train_x=GOOD.train_x.tolist()),
         "train_x is a list; use torch.tensor(x, dtype=torch.float32)"),
        (_broken(test_x=GOOD.test_x.double()), "test_x is a torch.float64 tensor; use x.float()"),
        (_broken(train_x=GOOD.train_x[:, 0]), "train_x has shape (48,); it needs one sample per row"),
        (_broken(train_x=GOOD.train_x.clone().fill_(float("nan"))), "train_x holds NaN or infinity"),
        (_broken(train_y=GOOD.train_y.numpy()),
         "train_y is a numpy.ndarray; use torch.from_numpy(y).long()"),
        (_broken(train_y=GOOD.train_y.float()),
         "train_y is a torch.float32 tensor; labels are class indices, use y.long()"),
        (_broken(test_y=torch.nn.functional.one_hot(GOOD.test_y)),
         "test_y has shape (12, 3); it needs one class index per sample, shape (N,) "
         "(one-hot labels: y.argmax(1))"),
        (_broken(train_y=GOOD.train_y + 1),
         "train_y holds labels 1..3, outside 0..2 (num_classes = 3); number the classes from 0"),
        (_broken(test_y=GOOD.test_y - 1), "test_y holds labels -1..1, outside 0..2"),
        (_broken(train_y=GOOD.train_y[:-1]), "train_y has 47 labels for the 48 samples of train_x"),
        (_broken(test_x=GOOD.test_x[:0], test_y=GOOD.test_y[:0]),
         "test_x has no samples; each split needs at least one"),
        (_broken(num_classes=1), "num_classes is 1; it must be a whole number >= 2"),
        (_broken(test_x=GOOD.test_x[:, :5]),
         "train_x samples have shape (13,), test_x samples (5,); both splits need the same"),
        (_broken(pixel_std=0.0), "pixel_std is 0.0; it must be > 0"),
    ],
)
def test_dataset_problems_name_the_field_and_the_fix(dataset: object, message: str) -> None:
    with pytest.raises(ConfigError, match=r"^dataset 'mine': ") as err:
        check_dataset(dataset, "mine")
    assert message in str(err.value)


def test_registered_datasets_and_unknown_names() -> None:
    assert {"digits", "mnist"} <= set(DATASETS)
    check_dataset_name("digits")
    check_dataset_name("hf:ylecun/mnist")
    check_dataset_name("pkg.mod:function")
    with pytest.raises(ConfigError, match="dataset: 'digitz' is not known; use digits, mnist"):
        check_dataset_name("digitz")
    with pytest.raises(ValueError, match="without ':'"):
        register_dataset("a:b")
