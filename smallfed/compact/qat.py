"""Quantization-aware training in the last rounds: clients train through int8 rounding.

During a QAT round every Conv and Linear layer computes with fake-quantized values,
in the scheme the int8 export uses (onnxruntime's static QDQ quantization): weights
symmetric int8 per output channel, the layer's input asymmetric uint8 per tensor.
Gradients pass the rounding straight through (torch's fake-quantize ops), so the
float weights, which are what clients send and the server averages, learn to sit
where rounding hurts least. The model stays a plain float model between rounds.

Why not a library: torchao's eager QAT fake-quantizes Linear and Embedding layers
only, not Conv2d, and its PT2E flow trains an exported graph whose state dict is not
the model's; ``torch.ao.quantization`` is deprecated. The ops used here are torch's
own (``torch.fake_quantize_per_channel_affine``, ``..._per_tensor_affine``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize

from smallfed.config import Config

QUANTIZED = (nn.Conv2d, nn.Linear)


def is_qat_round(cfg: Config, server_round: int) -> bool:
    return cfg.qat_rounds > 0 and server_round > cfg.num_server_rounds - cfg.qat_rounds


class FakeQuantWeight(nn.Module):
    """Symmetric int8 per output channel: scale = max|w| / 127, zero point 0."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        absmax = weight.detach().abs().reshape(weight.shape[0], -1).amax(dim=1)
        scale = (absmax / 127).clamp_min(1e-8)
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -127, 127)


def fake_quant_input(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
    """Asymmetric uint8 per tensor over the batch's range (0 always representable)."""
    x = args[0]
    low = x.detach().min().clamp(max=0.0)
    high = x.detach().max().clamp(min=0.0)
    scale = ((high - low) / 255).clamp_min(1e-8)
    zero = torch.round(-low / scale).clamp(0, 255).to(torch.int32)
    return (torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zero.reshape(()), 0, 255),)


@contextmanager
def fake_quantized(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Train ``model`` through int8 rounding; afterwards it is the plain float model."""
    if not enabled:
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, QUANTIZED)]
    handles = [m.register_forward_pre_hook(fake_quant_input) for m in layers]
    for layer in layers:
        parametrize.register_parametrization(layer, "weight", FakeQuantWeight())
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer in layers:  # keep the float weights that were trained
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
