"""One forward pass for G copies of a model, each with its own parameters.

The clients of a round train the same architecture on their own weights. Rather than
G small forward passes (where per-call overhead and small convolutions dominate on a
CPU), the cohort runs one: activations are laid out ``(batch, G, ...)``, a convolution
becomes a grouped convolution with G groups, GroupNorm keeps its per-sample, per-group
statistics with G times the groups, a linear layer becomes a batched matrix product,
and parameter-free per-sample layers (activations, pooling, flatten, the fixed
scattering) see ``batch * G`` samples. No operation mixes two copies, so the gradient
of the summed losses with respect to the stacked parameters is every copy's own
gradient.

This measured faster than ``torch.func.vmap`` over ``functional_call`` on these
machines (cnn-tiny, 10 clients, batch 8, one thread: 3.8 s against 5.9 s for 750
client-steps; one client after another took 8.3 s): vmap has no batching rule for
GroupNorm's backward and decomposes it into elementwise kernels.

Only ``nn.Sequential`` models of the layers below can be stacked; :func:`refusal`
says why another cannot, and the cohort trains it one client after another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from smallfed.models.scatter import Scattering2D

# Layers without parameters that treat every sample on its own: they run on the
# (batch * G) samples as they are. Dropout is not here: its randomness would differ
# from the sequential path's.
PER_SAMPLE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU,
              nn.Hardtanh, nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
              nn.Flatten, Scattering2D)

Params = dict[str, torch.Tensor]  # parameter name -> (G, *shape)


@dataclass
class Tape:
    """The per-sample pass's layout and what its linear layers record.

    The pass runs on S samples packed one after another, client-major (no padding:
    Poisson batches differ in size, and padding each to the largest cost a quarter of
    the convolutions' work). ``slots`` places each in a padded (G, width) grid, where
    the linear layers run: one weight per client. Each records (prefix, input (G, width,
    in), output (G, width, out)), zero at padding."""

    slots: torch.Tensor  # (S,) positions in the flattened (G * width) grid
    clients: int
    width: int
    linear: list[tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def grid(self, packed: torch.Tensor) -> torch.Tensor:
        """``packed`` (S, ...) placed in the flattened (G * width, ...) grid, zero at padding."""
        return packed.new_zeros(self.clients * self.width, *packed.shape[1:]).index_copy_(
            0, self.slots, packed)

Layer = Callable[..., torch.Tensor]


def _leaves(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    if isinstance(model, nn.Sequential):
        return [leaf for name, child in model.named_children()
                for leaf in _leaves(child, f"{prefix}{name}.")]
    return [(prefix, model)]


def refusal(model: nn.Module) -> str:
    """Why ``model`` cannot be stacked, or ''."""
    if not isinstance(model, nn.Sequential):
        return f"{type(model).__name__} is not an nn.Sequential"
    leaves = _leaves(model)
    if len({id(layer) for _, layer in leaves}) < len(leaves):
        return "a layer is used twice"
    for name, layer in leaves:
        # Exact types: a subclass may have its own forward, which the stacked form ignores.
        if type(layer) is nn.Conv2d and layer.padding_mode == "zeros":
            continue
        if type(layer) in (nn.GroupNorm, nn.Linear) or (
                type(layer) in PER_SAMPLE and not any(True for _ in layer.parameters())):
            continue
        return f"layer {name.rstrip('.')} ({type(layer).__name__}) has no stacked form"
    return ""


def _conv(prefix: str, conv: nn.Conv2d) -> Layer:
    if conv.in_channels == 1 and conv.groups == 1 and not isinstance(conv.padding, str):
        return _conv_one_channel(prefix, conv)

    def run(params: Params, h: torch.Tensor, _tape: Tape | None = None) -> torch.Tensor:
        b, g = h.shape[:2]
        weight = params[prefix + "weight"]
        bias = params.get(prefix + "bias")
        out = F.conv2d(h.reshape(b, -1, *h.shape[3:]), weight.reshape(-1, *weight.shape[2:]),
                       None if bias is None else bias.reshape(-1), conv.stride, conv.padding,
                       conv.dilation, conv.groups * g)
        return out.reshape(b, g, -1, *out.shape[2:])
    return run


def _conv_one_channel(prefix: str, conv: nn.Conv2d) -> Layer:
    """A convolution of one input channel (a first layer on grey images) as a matrix
    product over unfolded patches. Why: oneDNN's grouped convolution handles groups of
    one input channel poorly: for 5 clients' batches of 8 MNIST images on one thread,
    forward and weight gradient, the grouped form took 8.2 ms and this one 4.1 ms.
    With more input channels the grouped form wins (3 channels: 9.3 ms against this
    form's 14.4 ms)."""
    def run(params: Params, h: torch.Tensor, _tape: Tape | None = None) -> torch.Tensor:
        b, g, _, height, width = h.shape
        weight = params[prefix + "weight"]  # (g, out, 1, kh, kw)
        bias = params.get(prefix + "bias")
        cols = F.unfold(h.reshape(b * g, 1, height, width), conv.kernel_size, conv.dilation,
                        conv.padding, conv.stride)  # (b * g, kh * kw, positions)
        # (b, g, out, positions) straight away: the layout the next layer takes, no copy
        out = torch.matmul(weight.reshape(1, g, weight.shape[1], -1),
                           cols.view(b, g, *cols.shape[1:]))
        if bias is not None:
            out += bias.view(1, g, -1, 1)  # in place: the product's backward never reads it
        rows, columns = (
            (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
            for size, pad, dilation, kernel, stride in zip(
                (height, width), conv.padding, conv.dilation, conv.kernel_size, conv.stride))
        return out.view(b, g, conv.out_channels, rows, columns)
    return run


def _group_norm(prefix: str, norm: nn.GroupNorm) -> Layer:
    def run(params: Params, h: torch.Tensor, _tape: Tape | None = None) -> torch.Tensor:
        b, g = h.shape[:2]
        weight, bias = params.get(prefix + "weight"), params.get(prefix + "bias")
        out = F.group_norm(h.reshape(b, -1, *h.shape[3:]), norm.num_groups * g,
                           None if weight is None else weight.reshape(-1),
                           None if bias is None else bias.reshape(-1), norm.eps)
        return out.reshape(h.shape)
    return run


class _Linear(torch.autograd.Function):
    """G linear layers, ``rows`` (G, n, in) by ``weight`` (G, out, in), as a batched
    product whose weight gradient comes out contiguous. Why: autograd's gradient of
    ``bmm(rows, weight.transpose(1, 2))`` is the transpose of a (G, in, out) product,
    and every SGD update then reads it across strides: with cnn-tiny's 1568 x 64 layer
    for 5 clients, forward, backward and a momentum step took 4.9 ms against 1.9 ms
    here (one thread), with the same bits."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor,  # type: ignore[override]
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(rows, weight)
        ctx.with_bias = bias is not None
        if bias is None:
            return torch.bmm(rows, weight.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), rows, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor  # type: ignore[override]
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        rows, weight = ctx.saved_tensors
        return (torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None,
                torch.bmm(grad.transpose(1, 2), rows) if ctx.needs_input_grad[1] else None,
                grad.sum(1) if ctx.with_bias and ctx.needs_input_grad[2] else None)


def _linear(prefix: str) -> Layer:
    def run(params: Params, h: torch.Tensor, tape: Tape | None = None) -> torch.Tensor:
        weight, bias = params[prefix + "weight"], params.get(prefix + "bias")
        if tape is None:  # (G, n, in): n samples for each of G weights
            return _Linear.apply(h.transpose(0, 1), weight, bias).transpose(0, 1)
        # Per sample: h (1, S, in) holds the packed samples, placed in the padded grid
        # for the G clients' own weights; the weight's gradient is taken at the output.
        rows = tape.grid(h[0]).view(tape.clients, tape.width, -1)
        out = (torch.bmm(rows, weight.transpose(1, 2)) if bias is None else
               torch.baddbmm(bias.unsqueeze(1), rows, weight.transpose(1, 2)))
        tape.linear.append((prefix, rows, out))
        return out.reshape(-1, out.shape[-1])[tape.slots].unsqueeze(0)
    return run


class _MaxPool(torch.autograd.Function):
    """``F.max_pool2d`` with its forward through the channels-last kernel and its
    backward through the contiguous one. Why: on these CPUs the contiguous forward is
    slow (3.4 ms for 40 x 16 x 28 x 28 on one thread) and the channels-last one fast,
    conversions included (1.5 ms), while the channels-last backward loses that again.
    Both kernels pick the same element of every window (the first maximum, or a NaN),
    and an index names a position within a plane whatever the layout, so values and
    gradients are bit for bit those of ``F.max_pool2d``. Images only: (N, C, H, W)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pool: nn.MaxPool2d) -> torch.Tensor:  # type: ignore[override]
        out, indices = torch.ops.aten.max_pool2d_with_indices(
            x.contiguous(memory_format=torch.channels_last), *_pool_args(pool))
        ctx.save_for_backward(x, indices.contiguous())
        ctx.pool = pool
        return out.contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        x, indices = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(
            grad.contiguous(), x, *_pool_args(ctx.pool), indices), None


def _pool_args(pool: nn.MaxPool2d) -> tuple:
    pair = torch.nn.modules.utils._pair  # pylint: disable=protected-access
    stride = pool.stride if pool.stride is not None else pool.kernel_size
    return (pair(pool.kernel_size), pair(stride), pair(pool.padding), pair(pool.dilation),
            pool.ceil_mode)


def _max_pool(pool: nn.MaxPool2d, relu_before: bool) -> Layer:
    """Max pooling, and the ReLU before it when there is one, applied after it: the
    two commute (gradients bit for bit: where the window's maximum is not positive the
    ReLU's gradient is zero either way; values up to the sign of a zero, as the CPU's
    ReLU keeps -0.0), and the ReLU then sees a quarter of the elements."""
    def run(_params: Params, h: torch.Tensor, _tape: Tape | None = None) -> torch.Tensor:
        b, g = h.shape[:2]
        flat = h.reshape(b * g, *h.shape[2:])
        # (N, H, W) without channels: torch's own pooling (the channels-last path needs C)
        out = _MaxPool.apply(flat, pool) if flat.dim() == 4 else pool(flat)
        if relu_before:
            out = torch.relu(out)
        return out.reshape(b, g, *out.shape[1:])
    return run


def _per_sample(layer: nn.Module) -> Layer:
    def run(_params: Params, h: torch.Tensor, _tape: Tape | None = None) -> torch.Tensor:
        b, g = h.shape[:2]
        out = layer(h.reshape(b * g, *h.shape[2:]))
        return out.reshape(b, g, *out.shape[1:])
    return run


def _poolable(layer: nn.Module | None) -> bool:
    return type(layer) is nn.MaxPool2d and not layer.return_indices


class StackedModel:
    """``model``'s architecture run over G stacked parameter copies at once."""

    def __init__(self, model: nn.Module) -> None:
        reason = refusal(model)
        if reason:
            raise ValueError(f"cannot stack {type(model).__name__}: {reason}")
        self.layers: list[Layer] = []
        self.linear: set[str] = set()  # names of the linear layers' parameters
        leaves = _leaves(model)
        for i, (prefix, layer) in enumerate(leaves):
            following = leaves[i + 1][1] if i + 1 < len(leaves) else None
            if type(layer) is nn.ReLU and _poolable(following):
                continue  # applied after the pooling that follows (see _max_pool)
            if _poolable(layer):
                self.layers.append(_max_pool(layer, i > 0 and type(leaves[i - 1][1]) is nn.ReLU))
            elif isinstance(layer, nn.Conv2d):
                self.layers.append(_conv(prefix, layer))
            elif isinstance(layer, nn.GroupNorm):
                self.layers.append(_group_norm(prefix, layer))
            elif isinstance(layer, nn.Linear):
                self.layers.append(_linear(prefix))
                self.linear |= {prefix + n for n, _ in layer.named_parameters()}
            else:
                self.layers.append(_per_sample(layer))

    def __call__(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, G, classes)`` of inputs ``x`` ``(batch, G, *input_shape)``,
        copy ``i`` of the parameters on column ``i``."""
        for layer in self.layers:
            x = layer(params, x)
        return x

    def per_sample(self, params: Params, x: torch.Tensor, tape: Tape) -> torch.Tensor:
        """Logits ``(1, S, classes)`` of ``x`` ``(1, S, *input_shape)``: the samples of G
        clients packed client-major (``tape`` says where each belongs), each its own group.

        For per-sample gradients (DP-SGD): the parameters of convolutions and norms
        come one copy per sample (so autograd gives each sample's gradient; they are
        small), a linear layer's one per client, with its input and output recorded on
        ``tape.linear`` (its per-sample gradient is an outer product of the two, never
        built when only its norm and the clipped sum are needed).
        """
        for layer in self.layers:
            x = layer(params, x, tape)
        return x
