"""Weight sharing (Deep Compression, Han et al. 2016): k shared values per layer.

In the last ``share-rounds`` rounds the server clusters each Conv/Linear weight
tensor of the global model to ``share-weights`` values (1-D k-means, the codec's
``cluster`` stage) and from then on the model is an index per weight plus a codebook
per layer. Clients fine-tune the shared values: the gradient of a shared value is the
sum of the gradients of the weights that share it (a hook on each weight's gradient),
so every weight of a cluster takes the same step and the cluster stays one value.
Nothing else needs sending: equal values are the index map, which server and client
read off the weights (``np.unique``). After aggregation the server sets each cluster
to the mean of its aggregated values, so a lossy codec, DP noise or server momentum
cannot split a cluster: a layer never holds more than k distinct values (plus zero,
where pruning left zeros: pruned weights stay zero and out of the clusters).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from smallfed.codec.stages import kmeans_1d
from smallfed.compact.pruning import prunable
from smallfed.config import Config

KMEANS_ITERATIONS = 20


def is_share_round(cfg: Config, server_round: int) -> bool:
    return cfg.share_weights > 0 and server_round > cfg.num_server_rounds - cfg.share_rounds


def shared_names(model: nn.Module) -> list[str]:
    """The weights that are shared: every Conv and Linear weight (as pruning's)."""
    return [name for name, _ in prunable(model)]


def cluster(arrays: Mapping[str, np.ndarray], names: list[str], k: int) -> dict[str, np.ndarray]:
    """``arrays`` with each named tensor's nonzero values replaced by the nearest of k
    shared values. Exact zeros (pruned weights) stay zero and are not counted in k."""
    out = dict(arrays)
    for name in names:
        values = arrays[name]
        live = values != 0
        if len(np.unique(values[live])) <= k:  # already shared (a later round)
            continue
        codebook, index = kmeans_1d(values[live].astype(np.float32), k, KMEANS_ITERATIONS)
        shared = np.zeros_like(values)
        shared[live] = codebook[index]
        out[name] = shared
    return out


def snap(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
         names: list[str]) -> dict[str, np.ndarray]:
    """``arrays`` with each cluster of ``reference`` (equal values) set to its mean."""
    out = dict(arrays)
    for name in names:
        _, index = np.unique(reference[name], return_inverse=True)
        index = index.ravel()
        values = arrays[name].ravel().astype(np.float64)
        means = np.bincount(index, weights=values) / np.bincount(index)
        out[name] = means[index].reshape(arrays[name].shape).astype(arrays[name].dtype)
    return out


@contextmanager
def shared_training(model: nn.Module, names: list[str]) -> Iterator[None]:
    """Train the shared values: each weight's gradient becomes its cluster's summed one."""
    params = dict(model.named_parameters())
    handles = []
    for name in names:
        _, inverse = np.unique(params[name].detach().numpy(), return_inverse=True)
        index = torch.from_numpy(inverse.ravel())
        clusters = int(index.max()) + 1

        def summed(grad: torch.Tensor, index: torch.Tensor = index,
                   clusters: int = clusters) -> torch.Tensor:
            total = torch.zeros(clusters, dtype=grad.dtype).index_add_(0, index, grad.reshape(-1))
            return total[index].reshape(grad.shape)

        handles.append(params[name].register_hook(summed))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def codebook_bytes(arrays: Mapping[str, np.ndarray], names: list[str]) -> int:
    """Bytes of the shared layers stored as packed indices plus float32 codebooks (zero,
    where pruning left one, is one more index)."""
    total = 0
    for name in names:
        k = len(np.unique(arrays[name]))
        bits = max(1, int(np.ceil(np.log2(max(k, 2)))))
        total += 4 * k + (arrays[name].size * bits + 7) // 8
    return total


class ServerSharing:
    """The server's side: cluster the global model, and keep the aggregate shared."""

    def __init__(self, cfg: Config, model: nn.Module) -> None:
        self.cfg = cfg
        self.names = shared_names(model)
        self.reference: dict[str, np.ndarray] | None = None  # this round's shared model

    def prepare(self, server_round: int, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The global model this round trains: clustered in the share rounds."""
        self.reference = None
        if not is_share_round(self.cfg, server_round):
            return arrays
        self.reference = cluster(arrays, self.names, self.cfg.share_weights)
        return self.reference

    def project(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The aggregate with each of this round's clusters set to its mean."""
        return arrays if self.reference is None else snap(arrays, self.reference, self.names)
