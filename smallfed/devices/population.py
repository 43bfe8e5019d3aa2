"""Which device each client is, and what training the model costs it.

In simulation a client's profile follows from its partition id and the run's seed
(the ``devices`` mix); on a real device its node config names it (``device``).
"""

from __future__ import annotations

import math

import numpy as np
from torch import nn

from smallfed.config import Config
from smallfed.devices.profiles import PROFILES, DeviceProfile, parse_mix
from smallfed.models import activation_count, macs

# Training one sample costs a forward pass (2 FLOPs a multiply-accumulate) and a
# backward pass of about twice that: 6 FLOPs a MAC (Kaplan et al. 2020, "Scaling
# Laws", the C = 6N rule per token).
FLOPS_PER_MAC_TRAINED = 6


def profile_of(cfg: Config, partition_id: int) -> DeviceProfile | None:
    """The device a simulated client is: drawn from the mix by (seed, partition id)."""
    mix = parse_mix(cfg.devices)
    if not mix:
        return None
    rng = np.random.default_rng([cfg.seed, max(partition_id, 0), 17])
    names = sorted(mix)
    return PROFILES[names[rng.choice(len(names), p=[mix[n] for n in names])]]


def training_flops_per_sample(model: nn.Module, input_shape: tuple[int, int, int]) -> float:
    return FLOPS_PER_MAC_TRAINED * macs(model, input_shape)


def training_memory_bytes(model: nn.Module, input_shape: tuple[int, int, int],
                          cfg: Config) -> int:
    """fp32 bytes training needs: weights, gradients, optimizer state, and the
    activations of one batch kept for the backward pass (inputs included).

    DP-SGD (``privacy = "sample"``) also holds one gradient per sample of the batch
    (Opacus's ``grad_sample``); its Poisson-sampled batches are counted at their
    expected size plus three standard deviations, which they rarely pass; with
    ``dp-physical-batch`` Opacus's BatchMemoryManager never holds more than that many.
    """
    params = sum(p.numel() for p in model.parameters())
    optimizer = 2 if cfg.optimizer == "adam" else (1 if cfg.momentum > 0 else 0)
    batch = cfg.batch_size
    if cfg.privacy == "sample":
        batch = math.ceil(batch + 3 * math.sqrt(batch))
        if cfg.dp_physical_batch:
            batch = min(batch, cfg.dp_physical_batch)
    activations = (activation_count(model, input_shape) + int(np.prod(input_shape))) * batch
    per_sample = params * batch if cfg.privacy == "sample" else 0
    return 4 * (params * (2 + optimizer) + activations + per_sample)
