"""Datasets as plain tensors: a client training pool and a server-side held-out test set.

Inputs are kept as one float tensor per split, images (N, C, H, W) or tabular
features (N, F), already normalised, so a client's partition is an index array
into the pool: no per-client copies are held.

The ``dataset`` key names a loader registered with :func:`register_dataset`, a
Hugging Face dataset (``hf:<name>``) or your own ``package.module:function``.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from smallfed.config import Config, ConfigError
from smallfed.plugins import load_object

# The real MNIST training set is not on these machines, only its 10,000-image test
# set. From it we draw a client pool of 80% (8,000) and a held-out test set of 20%
# (2,000) with this fixed seed, so every benchmark sees the same split.
MNIST_SPLIT_SEED = 2024
MNIST_POOL_FRACTION = 0.8


@dataclass(frozen=True)
class Dataset:
    """A federated dataset: the pool the clients split, and the server's test set."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    # How pixels in [0, 1] became the model's inputs: (pixel - mean) / std. Export
    # builds this into the model, so a device feeds it plain pixel intensities.
    pixel_mean: float = 0.0
    pixel_std: float = 1.0

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape: (C, H, W) for images, (F,) for tabular features."""
        return tuple(self.train_x.shape[1:])


DatasetLoader = Callable[[Config], Dataset]
DATASETS: dict[str, DatasetLoader] = {}


def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
    """Make ``loader(cfg) -> Dataset`` the value ``name`` of the ``dataset`` key."""
    if not name or ":" in name:
        raise ValueError(f"dataset name {name!r}: must be non-empty and without ':' "
                         "(which marks hf:<name> and package.module:function)")

    def add(loader: DatasetLoader) -> DatasetLoader:
        DATASETS[name] = loader
        return loader

    return add


def check_dataset_name(name: str) -> None:
    """ConfigError unless ``name`` is registered, ``hf:<name>`` or ``package.module:function``."""
    if name not in DATASETS and ":" not in name:
        raise ConfigError(f"dataset: {name!r} is not known; use {', '.join(DATASETS)}, "
                          "hf:<name> or package.module:function")


@register_dataset("digits")
def digits(cfg: Config) -> Dataset:
    return load_digits(cfg.test_fraction, cfg.seed)


@register_dataset("mnist")
def mnist(cfg: Config) -> Dataset:
    return load_mnist(cfg.data_dir)


def load_digits(test_fraction: float, seed: int) -> Dataset:
    """scikit-learn's 1,797 8x8 digits (ships with the package): the default dataset."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = bunch.images.astype(np.float32) / 16.0
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return _from_arrays("digits", x[train], y[train], x[test], y[test], 10)


def load_mnist(data_dir: str | Path) -> Dataset:
    """MNIST from local IDX files (``.gz`` or raw).

    With the 60,000-image training files present, they are the client pool and the
    10,000 test images the held-out set. With only the test files (as in
    ``../shared/data/mnist``), the 10,000 are split into a pool of 8,000 and a
    held-out set of 2,000 (``MNIST_POOL_FRACTION``) by a permutation seeded with
    ``MNIST_SPLIT_SEED``.
    """
    folder = Path(data_dir)
    test_x = _read_idx(_find(folder, "t10k-images-idx3-ubyte"))
    test_y = _read_idx(_find(folder, "t10k-labels-idx1-ubyte"))
    train_images = _find(folder, "train-images-idx3-ubyte", required=False)
    if train_images is not None:
        train_x = _read_idx(train_images)
        train_y = _read_idx(_find(folder, "train-labels-idx1-ubyte"))
    else:
        order = np.random.default_rng(MNIST_SPLIT_SEED).permutation(len(test_y))
        cut = int(round(len(order) * MNIST_POOL_FRACTION))
        pool, held = order[:cut], order[cut:]
        train_x, train_y = test_x[pool], test_y[pool]
        test_x, test_y = test_x[held], test_y[held]

    def scale(images: np.ndarray) -> np.ndarray:
        return images.astype(np.float32) / 255.0

    return _from_arrays(
        "mnist", scale(train_x), train_y.astype(np.int64), scale(test_x),
        test_y.astype(np.int64), 10,
    )


def load_hub(name: str, seed: int, test_fraction: float) -> Dataset:
    """A Hugging Face image-classification dataset through flwr-datasets (needs the internet).

    Expects ``image`` and ``label`` columns; uses the dataset's ``test`` split when it
    has one, else holds out ``test_fraction`` of ``train``.
    """
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import IidPartitioner

    fds = FederatedDataset(dataset=name, partitioners={"train": IidPartitioner(1)})
    train = fds.load_split("train").with_format("numpy")
    try:
        test = fds.load_split("test").with_format("numpy")
    except ValueError:
        split = fds.load_split("train").train_test_split(test_size=test_fraction, seed=seed)
        train, test = split["train"].with_format("numpy"), split["test"].with_format("numpy")
    tx, ty = np.asarray(train["image"]), np.asarray(train["label"])
    vx, vy = np.asarray(test["image"]), np.asarray(test["label"])
    scale = 255.0 if tx.dtype == np.uint8 else 1.0
    num_classes = int(max(ty.max(), vy.max())) + 1
    return _from_arrays(name, tx / scale, ty, vx / scale, vy, num_classes)


def load_custom(target: str) -> Dataset:
    """``package.module:function`` returning a :class:`Dataset` (bring your own data).

    The function takes no arguments; register a loader to receive the Config.
    """
    factory = load_object(target, "dataset")
    if not callable(factory):
        raise ConfigError(f"dataset: {target!r} is not callable ({type(factory).__name__}); "
                          "name a function returning smallfed.data.Dataset")
    return factory()


def _from_arrays(
    name: str, tx: np.ndarray, ty: np.ndarray, vx: np.ndarray, vy: np.ndarray, classes: int
) -> Dataset:
    """Normalise with the pool's own mean and std, and add a channel axis if missing.

    ``tx`` and ``vx`` hold pixel intensities in [0, 1].
    """
    tx, vx = tx.astype(np.float32), vx.astype(np.float32)
    if tx.ndim == 3:
        tx, vx = tx[:, None], vx[:, None]
    mean, std = float(tx.mean()), float(tx.std()) or 1.0
    return Dataset(
        name=name,
        train_x=torch.from_numpy((tx - mean) / std),
        train_y=torch.from_numpy(ty.astype(np.int64)),
        test_x=torch.from_numpy((vx - mean) / std),
        test_y=torch.from_numpy(vy.astype(np.int64)),
        num_classes=classes,
        pixel_mean=mean,
        pixel_std=std,
    )


def _find(folder: Path, stem: str, required: bool = True) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    if required:
        raise FileNotFoundError(
            f"data-dir: {str(folder)!r} has no {stem} or {stem}.gz; "
            "point data-dir at the folder of the MNIST IDX files"
        )
    return None


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format: magic, dimension sizes, then uint8 data)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: holds {data.size} values, header says {shape}")
    return data.reshape(shape)
