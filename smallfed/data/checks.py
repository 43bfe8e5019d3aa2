"""A dataset is checked before the run: numpy arrays, float64 inputs or float labels
would otherwise fail mid-run, deep inside torch or Opacus, far from their cause.

Each problem is a :class:`~smallfed.config.ConfigError` naming the field and the fix.
Nothing is converted silently: the data a run trains on is the data its loader built.
"""

from __future__ import annotations

import torch

from smallfed.config import ConfigError
from smallfed.data.datasets import Dataset


def check_dataset(dataset: object, source: str) -> None:
    """ConfigError unless ``dataset`` is a Dataset that training and evaluation can use."""
    where = f"dataset {source!r}"
    if not isinstance(dataset, Dataset):
        raise ConfigError(f"{where}: returned a {_type(dataset)}, not smallfed.data.Dataset; "
                          "return Dataset(name, train_x, train_y, test_x, test_y, num_classes)")
    classes = dataset.num_classes
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
        raise ConfigError(f"{where}: num_classes is {classes!r}; it must be a whole number >= 2")
    for split in ("train", "test"):
        x, y = getattr(dataset, f"{split}_x"), getattr(dataset, f"{split}_y")
        problem = (_inputs_problem(f"{split}_x", x) or _labels_problem(f"{split}_y", y, classes)
                   or _sizes_problem(split, len(x), len(y)))
        if problem:
            raise ConfigError(f"{where}: {problem}")
    if dataset.train_x.shape[1:] != dataset.test_x.shape[1:]:
        raise ConfigError(
            f"{where}: train_x samples have shape {tuple(dataset.train_x.shape[1:])}, test_x "
            f"samples {tuple(dataset.test_x.shape[1:])}; both splits need the same features")
    if not dataset.pixel_std > 0:
        raise ConfigError(f"{where}: pixel_std is {dataset.pixel_std!r}; it must be > 0 "
                          "(export divides the inputs by it)")


def _inputs_problem(field: str, x: object) -> str | None:
    """Inputs: a float32 tensor, one sample per row, finite."""
    if not isinstance(x, torch.Tensor):
        fix = ("torch.from_numpy(x).float()" if type(x).__module__ == "numpy"
               else "torch.tensor(x, dtype=torch.float32)")
        return f"{field} is a {_type(x)}; use {fix}"
    if x.dtype != torch.float32:
        return f"{field} is a {x.dtype} tensor; use x.float() (models train in float32)"
    if x.dim() < 2:
        return (f"{field} has shape {tuple(x.shape)}; it needs one sample per row, (N, F) "
                "features or (N, C, H, W) images (one feature: x.unsqueeze(1))")
    if not torch.isfinite(x).all():
        return f"{field} holds NaN or infinity; fill or drop those values"
    return None


def _labels_problem(field: str, y: object, classes: int) -> str | None:
    """Labels: an int64 tensor of class indices in [0, classes)."""
    if not isinstance(y, torch.Tensor):
        fix = ("torch.from_numpy(y).long()" if type(y).__module__ == "numpy"
               else "torch.tensor(y, dtype=torch.long)")
        return f"{field} is a {_type(y)}; use {fix}"
    if y.dtype != torch.int64:
        return f"{field} is a {y.dtype} tensor; labels are class indices, use y.long()"
    if y.dim() != 1:
        return (f"{field} has shape {tuple(y.shape)}; it needs one class index per sample, "
                "shape (N,) (one-hot labels: y.argmax(1))")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
        return (f"{field} holds labels {int(y.min())}..{int(y.max())}, outside 0.."
                f"{classes - 1} (num_classes = {classes}); number the classes from 0, or "
                "raise num_classes")
    return None


def _sizes_problem(split: str, samples: int, labels: int) -> str | None:
    if samples != labels:
        return f"{split}_y has {labels} labels for the {samples} samples of {split}_x"
    if samples == 0:
        return f"{split}_x has no samples; each split needs at least one"
    return None


def _type(value: object) -> str:
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
