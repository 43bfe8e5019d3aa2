"""Sample-level DP on each client: Opacus DP-SGD with an accountant kept across rounds.

Each round is Opacus's DP-SGD (Poisson sampling of records, per-sample clipping to
``dp-clip``, Gaussian noise of ``dp-noise * dp-clip``). The privacy unit is one record
of one client, under the add/remove neighbouring relation Opacus's accountants
assume. The mechanism's parameters come from a public record count (see
:func:`train_private`), so the reply says nothing about the true count.

A client trains in many rounds, so its privacy loss adds up: a new engine each round
reports one round's epsilon, a known mistake in public examples. Here each round adds
(noise, sample rate, steps) to the device's ledger (:mod:`smallfed.privacy.ledger`),
and the accountant composes the whole ledger. Before training, the client works out
the epsilon it would reach after this round and declines if that passes its budget
or its own floor (:mod:`smallfed.privacy.floor`).

With compression: the codec mod encodes the model delta after DP-SGD has finished,
so top-k, quantisation and error feedback only post-process a DP output (and the
residual kept for error feedback is made of DP outputs too). The noise always comes
before any data-dependent sparsification, and the guarantee is unchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from smallfed.cohort import rendezvous
from smallfed.config import Config, ConfigError
from smallfed.privacy.subspace import combine
from smallfed.training import TrainResult, make_optimizer

# Opacus and scipy.stats are imported inside the functions that use them: they take
# 3 s, and a run without privacy never needs them. Importing it calls logging.basicConfig, which gives the root
# logger a handler; Flower's logger has its own, so every Flower line would print twice.
logging.getLogger("flwr").propagate = False

History = list[tuple[float, float, int]]  # (noise multiplier, sample rate, steps)


@dataclass(frozen=True)
class PrivateRound:
    """What a client's private training round did to its privacy budget."""

    result: TrainResult | None  # None when the client declined
    history: History
    epsilon: float
    noise_multiplier: float
    declined_reason: str = ""


def check_private_model(model: nn.Module) -> None:
    """Fail early on layers Opacus cannot train privately (BatchNorm, for one)."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        names = "; ".join(sorted({str(e) for e in errors}))
        raise ConfigError(
            f"model: cannot train under DP ({names}). Use GroupNorm instead of BatchNorm "
            "(cnn-tiny does), or Opacus's ModuleValidator.fix on your own model"
        )


def sample_rate(cfg: Config, num_examples: int) -> float:
    """Poisson sampling rate, as Opacus sets it: 1 / the number of batches of an epoch."""
    return 1 / max(1, math.ceil(num_examples / cfg.batch_size))


def steps_per_round(cfg: Config, num_examples: int) -> int:
    """Noisy steps a round takes, counted as Opacus's Poisson sampler draws them."""
    return int(1 / sample_rate(cfg, num_examples)) * cfg.local_epochs


def planned_rounds(cfg: Config) -> int:
    """Rounds a client plans its budget for: the ``dp-plan-quantile`` of its participations.

    The server samples ``clients-per-round`` of ``num-clients`` uniformly each round, so
    a client trains in Binomial(rounds, clients-per-round / num-clients) rounds. Planning
    for the median leaves half the clients without budget before the end; a higher
    quantile spreads each budget over more rounds at the price of more noise per round.
    """
    from scipy.stats import binom  # 1 s, like Opacus: only when DP is on

    rate = min(1.0, cfg.clients_per_round / cfg.num_clients)
    return max(1, int(binom.ppf(cfg.dp_plan_quantile, cfg.num_server_rounds, rate)))


def noise_for(cfg: Config, num_examples: int) -> float:
    """The noise multiplier: ``dp-noise``, or the one that spends ``dp-target-epsilon``
    over the planned rounds and local epochs of a client with ``num_examples`` records.
    """
    if cfg.dp_target_epsilon <= 0:
        return cfg.dp_noise
    return _noise_search(cfg.dp_target_epsilon, cfg.dp_delta, sample_rate(cfg, num_examples),
                         planned_rounds(cfg) * steps_per_round(cfg, num_examples),
                         cfg.dp_accountant)


def _noise_search(target: float, delta: float, rate: float, steps: int, accountant: str
                  ) -> float:
    """The noise calibrated on what it depends on (:mod:`smallfed.privacy.calibration`,
    cached in memory and on disk): clients of different sizes often share a sample rate
    and step count (with batch 64, every client of 65-128 records), and the sweep's
    check, the run and each client process would otherwise search again.
    """
    from smallfed.privacy.calibration import noise_multiplier

    return noise_multiplier(target, delta, rate, steps, accountant)


def planned_step(cfg: Config, records: int) -> tuple[float, float, int]:
    """What one round releases, for a client planned for ``records`` public records:
    (noise multiplier, Poisson sample rate, noisy steps), the entry it adds to its history.

    """
    return noise_for(cfg, records), sample_rate(cfg, records), steps_per_round(cfg, records)


def budget(cfg: Config) -> float:
    """Epsilon a client may reach: ``dp-budget``, else the target; inf when neither is set."""
    return cfg.dp_budget or cfg.dp_target_epsilon or math.inf


def epsilon_of(cfg: Config, history: History) -> float:
    """Total epsilon at ``dp-delta`` of the rounds in ``history`` (composed by the accountant)."""
    if not history:
        return 0.0
    merged: dict[tuple[float, float], int] = {}
    for noise, rate, steps in history:  # same mechanism twice = one run of the summed steps
        merged[(noise, rate)] = merged.get((noise, rate), 0) + steps
    return _epsilon(cfg.dp_accountant, cfg.dp_delta, tuple(sorted(
        (noise, rate, steps) for (noise, rate), steps in merged.items())))


@lru_cache(maxsize=4096)
def _epsilon(mechanism: str, delta: float,
             history: tuple[tuple[float, float, int], ...]) -> float:
    """The accountant's epsilon, cached: clients of one size share their histories."""
    from opacus.accountants import RDPAccountant, create_accountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    if mechanism == "rdp":
        # Opacus's RDPAccountant recomputes the RDP curve of every (noise, rate) on each
        # call, a quarter of a small client's round; RDP composes by addition, so the
        # per-step curve is cached and scaled by the steps. Same numbers, same code.
        rdp = sum(steps * _rdp_per_step(noise, rate) for noise, rate, steps in history)
        eps, _ = rdp_analysis.get_privacy_spent(
            orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return float(eps)
    accountant = create_accountant(mechanism=mechanism)
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


@lru_cache(maxsize=1024)
def _rdp_per_step(noise: float, rate: float) -> np.ndarray:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    return rdp_analysis.compute_rdp(
        q=rate, noise_multiplier=noise, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)


def train_private(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Config, seed: int,
    history: History, masks: dict[str, np.ndarray] | None = None, *, records: int | None = None,
    subspace: dict[str, np.ndarray] | None = None,
) -> PrivateRound:
    """One round of DP-SGD planned for ``records`` public records, or a refusal if it
    would pass the budget.

    The mechanism (sample rate, steps, the batch size the noisy sum is divided by, the
    noise) is fixed by ``records``, a count the server already knows (the size of the
    partition its split assigned) or the device declared (``dp-records``), never by
    ``len(y)`` (the default, for callers outside a federation): adding or removing one record changes nothing but which records Poisson
    sampling can draw, which is the add/remove neighbouring relation the accountant
    assumes. Opacus's ``make_private`` derives all of them from the data loader's length,
    so the mechanism is assembled here from Opacus's own parts instead.

    With pruning ``masks``, the per-sample gradients of pruned weights are zeroed before
    clipping: they would be thrown away anyway, and counting them in each sample's norm
    would clip the useful part harder for the same noise. With a shared ``subspace``
    (:mod:`smallfed.privacy.subspace`) the per-sample gradients are projected onto it
    before clipping as well, and the noised gradient outside it is zeroed before each
    step, so the model moves only inside the subspace.
    """
    records = len(y) if records is None else records
    step = planned_step(cfg, records)
    noise, rate, _ = step
    new_history = [*history, step]
    after = epsilon_of(cfg, new_history)
    if after > budget(cfg):
        before = epsilon_of(cfg, history)
        reason = (f"training this round would raise epsilon from {before:.3f} to "
                  f"{after:.3f}, past the budget of {budget(cfg):.3f}")
        return PrivateRound(None, history, before, noise, reason)
    check_private_model(model)  # on the device too: the server's check is the server's
    params = dict(model.named_parameters())
    kept = combine(masks or {}, subspace or {})
    pruned = [(params[k], torch.from_numpy(m)) for k, m in kept.items() if k in params]
    outside = [(params[k], torch.from_numpy(m)) for k, m in (subspace or {}).items()
               if k in params]
    def sequential() -> TrainResult:
        return _dp_sgd(model, x, y, cfg, seed, step, records, pruned, outside)

    cohort = rendezvous.current()
    if cohort is None:
        result = sequential()
    else:
        from smallfed.cohort.trainer import DpPlan, Job

        # Seeded as Opacus's global generator is in _dp_sgd: the same batches and noise.
        job = Job(model, x, y, cfg, torch.Generator().manual_seed(seed), masks=dict(masks or {}),
                  dp=DpPlan(noise, rate, int(records * rate), records),
                  subspace=dict(subspace or {}))
        result = cohort.train(job, sequential)
    return PrivateRound(result, new_history, after, noise)


def _dp_sgd(  # pylint: disable=too-many-arguments
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Config, seed: int,
    step: tuple[float, float, int], records: int, pruned: list[tuple[nn.Parameter, torch.Tensor]],
    outside: list[tuple[nn.Parameter, torch.Tensor]],
) -> TrainResult:
    """Opacus's DP-SGD for one round of :func:`train_private`'s mechanism ``step``."""
    from opacus.data_loader import DPDataLoader
    from opacus.grad_sample.utils import prepare_module
    from opacus.optimizers import DPOptimizer

    from smallfed.privacy.secure import use_secure_noise

    noise, rate, _ = step
    # Poisson sampling and noise draw from one generator of the client's own, never
    # torch's global one, which other code (model building) seeds with public seeds.
    generator = torch.Generator().manual_seed(seed)
    module = prepare_module(model, grad_sample_mode="hooks")
    try:
        private_loader = DPDataLoader(TensorDataset(x, y), sample_rate=rate,
                                      generator=generator)
        optimizer = DPOptimizer(
            make_optimizer(model, cfg), noise_multiplier=noise, max_grad_norm=cfg.dp_clip,
            expected_batch_size=int(records * rate), generator=generator)
        if cfg.dp_secure_rng:
            private_loader = secure_loader(private_loader)
            use_secure_noise(optimizer)
        if outside:
            optimizer.step_hook = lambda _: project_grads(outside)
        module.train()
        total, steps = 0.0, 0
        for _ in range(cfg.local_epochs):
            with physical_batches(private_loader, optimizer, cfg.dp_physical_batch) as batches:
                for xb, yb in batches:
                    optimizer.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(module(xb), yb)
                    loss.backward()
                    for param, keep in pruned:
                        if param.grad_sample is not None:
                            param.grad_sample.mul_(keep)
                    optimizer.step()  # a noisy step only at a logical batch's end
                    total += float(loss.detach()) if len(yb) else 0.0
                    steps += 1
    finally:
        module.remove_hooks()
    return TrainResult(total / max(steps, 1), records, steps)


@contextmanager
def physical_batches(loader: DataLoader, optimizer: Any, most: int) -> Iterator[DataLoader]:
    """``loader``'s logical batches, split by Opacus's BatchMemoryManager into physical
    ones of at most ``most`` samples (0: as they come). The optimizer accumulates the
    clipped per-sample gradients and adds noise once per logical batch, so the
    mechanism and the accounting are unchanged."""
    if not most:
        yield loader
        return
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=most,
                            optimizer=optimizer) as split:  # type: ignore[arg-type]
        yield split


def project_grads(kept: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    """Zero each noised gradient outside the subspace (after the noise: post-processing)."""
    for param, keep in kept:
        if param.grad is not None:
            param.grad.mul_(keep)


def secure_loader(loader: DataLoader) -> DataLoader:
    """``loader`` (a DPDataLoader) with its Poisson batches drawn from the OS's CSPRNG:
    the same rate, steps and empty-batch collate, another source of randomness."""
    from smallfed.privacy.secure import SecurePoissonBatchSampler

    sampler = SecurePoissonBatchSampler(len(loader.dataset), loader.sample_rate, len(loader))
    return DataLoader(loader.dataset, batch_sampler=sampler, collate_fn=loader.collate_fn)
