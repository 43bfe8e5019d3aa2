"""Bring your own: a tabular dataset and an MLP, through smallfed's Python API.

Run it with ``python examples/tabular.py``: 10 hospitals, each holding its own share
of scikit-learn's breast-cancer records, train one small MLP with FedAvg.
"""

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer
from torch import nn

import smallfed
from smallfed.data import Dataset


def breast_cancer() -> Dataset:
    """569 records of 30 features, 2 classes; standardised with the training pool's stats."""
    x, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    test, train = order[:114], order[114:]
    mean, std = x[train].mean(axis=0), x[train].std(axis=0)
    x = ((x - mean) / std).astype(np.float32)
    return Dataset(name="breast-cancer", num_classes=2,
                   train_x=torch.from_numpy(x[train]), train_y=torch.from_numpy(y[train]),
                   test_x=torch.from_numpy(x[test]), test_y=torch.from_numpy(y[test]))


def mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """One hidden layer of 16 for (features,) inputs."""
    return nn.Sequential(nn.Linear(input_shape[0], 16), nn.ReLU(), nn.Linear(16, num_classes))


def main(out: str = "runs/tabular", rounds: int = 10) -> dict:
    results = smallfed.simulate(
        out=out, dataset=breast_cancer, model=mlp, overwrite=True,
        num_server_rounds=rounds, num_clients=10, clients_per_round=5, partitioner="iid",
        local_epochs=2, batch_size=16, lr=0.05,
    )
    print(f"accuracy {results['summary']['final_accuracy']:.3f} after {rounds} rounds")
    return results


if __name__ == "__main__":
    main()
