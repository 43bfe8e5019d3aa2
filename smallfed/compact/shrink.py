"""Drop what structured pruning zeroed: a smaller dense model that computes the same.

Structured pruning (:func:`smallfed.compact.pruning.structured_masks`) zeroes whole
output channels with their bias and GroupNorm group, so those channels output exactly
zero. Here they are removed from their layer, and the matching inputs from the next
layer (after a Flatten, each channel's block of H x W inputs), so the exported model
is dense and small. Unstructured zeros stay where they are: ONNX stores dense tensors.

Works on ``nn.Sequential`` models built from Conv2d, Linear, GroupNorm, Flatten and
shape-keeping layers (activations, pooling, dropout), as the zoo's are; any other
model is exported as it is.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

KEEPS_CHANNELS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
                  nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Identity)


def can_shrink(model: nn.Module) -> bool:
    return isinstance(model, nn.Sequential) and all(
        isinstance(m, (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.Flatten, *KEEPS_CHANNELS))
        for m in model)


def shrink(model: nn.Module, input_shape: tuple[int, int, int]) -> nn.Module:
    """A copy of ``model`` without the output channels whose weights and bias are all zero."""
    if not can_shrink(model):
        return copy.deepcopy(model)
    shapes = _input_shapes(model, input_shape)
    keep: torch.Tensor | None = None  # kept channels (features) of the current activation
    layers: list[nn.Module] = []
    last = max(i for i, m in enumerate(model) if isinstance(m, (nn.Conv2d, nn.Linear)))
    for i, layer in enumerate(model):
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            weight = layer.weight.detach()
            if keep is not None:
                weight = weight[:, keep]
            rows = torch.arange(weight.shape[0])
            if i != last:  # the classifier keeps every class
                alive = weight.reshape(weight.shape[0], -1).ne(0).any(dim=1)
                if layer.bias is not None:
                    alive |= layer.bias.detach().ne(0)
                rows = alive.nonzero().flatten()
            layers.append(_resized(layer, weight[rows], rows))
            keep = None if len(rows) == weight.shape[0] else rows
        elif isinstance(layer, nn.GroupNorm) and keep is not None:
            size = layer.num_channels // layer.num_groups
            norm = nn.GroupNorm(len(keep) // size, len(keep), layer.eps, layer.affine)
            if layer.affine:
                norm.weight.data.copy_(layer.weight.detach()[keep])
                norm.bias.data.copy_(layer.bias.detach()[keep])
            layers.append(norm)
        elif isinstance(layer, nn.Flatten) and keep is not None:
            per_channel = int(torch.tensor(shapes[i][1:]).prod())
            keep = (keep[:, None] * per_channel + torch.arange(per_channel)).flatten()
            layers.append(copy.deepcopy(layer))
        else:
            layers.append(copy.deepcopy(layer))
    return nn.Sequential(*layers)


def _resized(layer: nn.Module, weight: torch.Tensor, rows: torch.Tensor) -> nn.Module:
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        new: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    else:
        new = nn.Conv2d(weight.shape[1], weight.shape[0], layer.kernel_size, layer.stride,
                        layer.padding, layer.dilation, layer.groups, bias, layer.padding_mode)
    new.weight.data.copy_(weight)
    if bias:
        new.bias.data.copy_(layer.bias.detach()[rows])
    return new


def _input_shapes(model: nn.Sequential, input_shape: tuple[int, int, int]
                  ) -> list[tuple[int, ...]]:
    """Each layer's input shape (without the batch dimension), from one dummy pass."""
    shapes: list[tuple[int, ...]] = []
    handles = [m.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape[1:])))
               for m in model]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    finally:
        for handle in handles:
            handle.remove()
    return shapes
