"""Shared fixtures: small, fast, seeded configurations on scikit-learn's digits."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from smallfed.config import Config


@pytest.fixture
def tiny_cfg() -> Config:
    """4 clients, 2 rounds, all clients every round: a run of a few seconds."""
    return Config(num_server_rounds=2, num_clients=4, clients_per_round=4, seed=7,
                  local_epochs=2, batch_size=16)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an unsigned-byte IDX file (gzipped if the name ends in .gz)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as fh:
        fh.write(raw)


@pytest.fixture
def fake_mnist(tmp_path: Path) -> Path:
    """A folder with only the MNIST test files, as ../shared/data/mnist has: 500 images."""
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (500, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(500) % 10)
    return tmp_path


@pytest.fixture(scope="session", autouse=True)
def smallfed_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """smallfed's disk cache (DP noise calibrations, data splits: smallfed.cache) goes
    to a folder of this session, never the user's ~/.cache; the processes the tests
    start inherit it. A
    SMALLFED_CACHE_DIR already set is kept (a CI can share one across runs)."""
    import os  # pylint: disable=import-outside-toplevel

    if not os.environ.get("SMALLFED_CACHE_DIR"):
        os.environ["SMALLFED_CACHE_DIR"] = str(tmp_path_factory.mktemp("smallfed-cache"))
