"""Weight sharing: k shared values per layer, fine-tuned by clients, kept shared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from smallfed.compact.sharing import cluster, codebook_bytes, shared_names, shared_training
from smallfed.config import Config, ConfigError
from smallfed.flower.checkpoint import load
from smallfed.models import build_model
from smallfed.report.results import RoundRecord
from smallfed.simulation import simulate

# A lossy codec and server momentum try to split the clusters; they must not.
RUN = Config(num_server_rounds=4, num_clients=4, clients_per_round=4, seed=2, local_epochs=1,
             batch_size=16, share_weights=4, share_rounds=2, strategy="fedavgm",
             server_momentum=0.5, codec="topk:0.2,quantize:4,error_feedback")


def test_shared_weights_stay_shared_through_federated_fine_tuning(tmp_path: Path) -> None:
    names = shared_names(build_model("cnn-tiny", (1, 8, 8), 10, 0))
    after: dict[int, dict[str, np.ndarray]] = {}

    def keep(record: RoundRecord, _: int) -> None:
        after[record.round] = load(tmp_path).global_arrays

    results = simulate(RUN, tmp_path, progress=False, on_round=keep)
    assert all(len(np.unique(after[2][n])) > 4 for n in names)  # not shared before
    for round_ in (3, 4):
        assert all(len(np.unique(after[round_][n])) <= 4 for n in names)
    moved = [not np.array_equal(np.unique(after[3][n]), np.unique(after[4][n])) for n in names]
    assert all(moved)  # the shared values themselves were fine-tuned
    assert results["rounds"][-1]["accuracy"] > 0.5  # it still learns


def test_a_shared_value_takes_the_summed_gradient_of_its_weights() -> None:
    layer = torch.nn.Linear(6, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -1.0, 0.5, 0.5, -1.0, 2.0]]))
    x = torch.arange(1.0, 7.0)
    with shared_training(layer, ["weight"]):
        layer(x).sum().backward()
    # d out / d w_i = x_i; clusters {0.5: 1, 3, 4}, {-1: 2, 5}, {2: 6}
    assert layer.weight.grad.tolist() == [[8.0, 7.0, 8.0, 8.0, 7.0, 6.0]]


def test_clustering_keeps_zeros_and_counts_codebook_bytes() -> None:
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(20, 30)).astype(np.float32)
    weight[:5] = 0  # pruned rows
    shared = cluster({"w": weight}, ["w"], 8)["w"]
    assert (shared[:5] == 0).all() and len(np.unique(shared[5:])) == 8
    assert codebook_bytes({"w": shared}, ["w"]) == 9 * 4 + (600 * 4 + 7) // 8  # 9 values, 4 bits


def test_sharing_is_refused_where_it_cannot_work() -> None:
    with pytest.raises(ConfigError, match="share-weights: the shared values are fine-tuned"):
        Config(share_weights=16, privacy="sample")
    with pytest.raises(ConfigError, match="2..256 values"):
        Config(num_server_rounds=3, share_weights=16, share_rounds=5)
