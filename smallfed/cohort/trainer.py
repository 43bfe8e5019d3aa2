"""A round's clients trained as one batched computation, step for step as they would
train one after another.

Every client keeps what makes its training its own: its data, its row order (drawn
from its own generator exactly as :func:`smallfed.training.train` draws it), its number
of steps, its pruning masks and FedProx anchor, its momentum buffer, and under DP-SGD
its Poisson batches and Gaussian noise (drawn from a generator seeded as Opacus's
global one is in :func:`smallfed.privacy.local_dp.train_private`, in the same order).
What they share is the arithmetic: one stacked forward and backward pass
(:mod:`smallfed.cohort.stacked`) per step for all clients of a stack still training
(on a CPU, a round's clients form one stack per thread, :func:`lanes_of`). Clients
are sorted by their number of steps, so those still training are always a prefix of
the stack and each step works on views, not copies.

The SGD update is written out here rather than taken from ``torch.optim.SGD``: a
client that has finished must not move while the others go on, and torch's
optimizers have one step for every element. The arithmetic is torch's (``d = g +
wd * p``; ``buf = momentum * buf + d``; ``p -= lr * buf``). Results agree with the
sequential path to float tolerance, not bit for bit: grouped convolutions sum in
another order (tests/test_cohort.py states the tolerance).
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from torch.nn.utils import parametrize

from smallfed.cohort import stacked
from smallfed.cohort.rendezvous import threads
from smallfed.cohort.stacked import Params, StackedModel, Tape
from smallfed.config import Config
from smallfed.privacy.subspace import combine
from smallfed.training import TrainResult


@dataclass
class Job:
    """One client's training in a cohort; its ``model`` is trained in place."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    cfg: Config
    generator: torch.Generator  # the client's data-order (or DP) randomness
    proximal_mu: float = 0.0
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # pruning: 1 keeps a weight
    dp: "DpPlan | None" = None
    # DP-SGD in a shared subspace (train_private): each sample's gradient kept inside it
    # before clipping, the noised gradient zeroed outside it; the weights are not masked
    subspace: dict[str, np.ndarray] = field(default_factory=dict)
    alone: Callable[[], TrainResult] | None = None  # the sequential path, if a batch fails


@dataclass(frozen=True)
class DpPlan:
    """DP-SGD's mechanism for one client, as :func:`train_private` assembles it."""

    noise_multiplier: float
    sample_rate: float
    expected_batch_size: int
    records: int  # the public record count the mechanism is planned for


def refusal(job: Job) -> str:
    """Why ``job`` cannot train in the batch, or ''."""
    cfg = job.cfg
    if cfg.optimizer != "sgd":
        return f"optimizer {cfg.optimizer} keeps a step count per client, the batch one for all"
    if any(parametrize.is_parametrized(m) for m in job.model.modules()):
        return "QAT's fake quantization is not batched"
    if any(p._backward_hooks for p in job.model.parameters()):  # pylint: disable=protected-access
        return "weight sharing's gradient hooks are not batched"
    if not all(p.requires_grad for p in job.model.parameters()):
        return "frozen parameters are not batched"
    if reason := stacked.refusal(job.model):
        return f"model {cfg.model}: {reason}"
    if job.dp is not None and cfg.dp_secure_rng:
        return "dp-secure-rng draws from the OS, the batch from each client's seeded generator"
    if job.dp is not None and cfg.dp_physical_batch:
        return "dp-physical-batch splits batches the cohort does not split"
    if job.dp is not None and not len(job.y):
        return "a DP client without records fails on its own path, with Opacus's reason"
    return ""


def group_key(job: Job) -> tuple:
    """Jobs with equal keys share one stacked computation."""
    cfg = job.cfg
    return (repr(job.model), tuple(job.x.shape[1:]), job.dp is not None, cfg.batch_size,
            cfg.local_epochs, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.dp_clip)


def train_cohort(jobs: list[Job], device: torch.device, say: Callable[[str], None],
                 lanes: int = 1) -> list[TrainResult | BaseException]:
    """Train every job, each group of alike jobs as stacked computations.

    On a CPU a group is split into up to ``lanes`` stacks (:func:`lanes_of`) that
    train at once, ``lanes`` at a time, each on its own thread with torch's thread
    count divided among them (one intra-op thread each when ``lanes`` is the count).
    Why: a stacked step costs a fixed part plus a part per client, and torch's small
    kernels use a second intra-op thread poorly (a step of 10 clients: 1.5x faster on
    2 threads than on 1), while two stacks on their own threads run 2x as many steps.
    With more lanes than clients every client is its own stack, which is the
    sequential path in parallel. Which clients share a stack depends only on their
    order and number of steps, so a run is reproducible on one machine; on one with
    another thread count a client may share its stack with others, and its float
    rounding differs. (The thread count is per thread with torch's OpenMP backend,
    the one of its CPU wheels; with a process-wide backend the stacks share it.)

    A stack that fails (out of memory, say) writes back nothing; ``say`` tells why
    and its jobs train one after another on their own paths, on this thread after
    every stack has finished (their sequential paths use torch's global state), from
    the generator states they had before the stack drew from them, so one failure
    fails only the clients that fail alone too (their exception is their outcome).
    """
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        groups[group_key(job)].append(i)
    split = lanes if device.type == "cpu" else 1
    stacks = [stack for members in groups.values()
              for stack in lanes_of(members, [_Group.steps_of(jobs[i]) for i in members],
                                    split)]
    workers = min(split, len(stacks))
    count = torch.get_num_threads()
    per_stack = max(1, count // max(1, workers))
    drawn = [job.generator.get_state() for job in jobs]

    def train(members: list[int]) -> list[TrainResult] | Exception:
        # Set, not restored here: in a pool thread a restore could copy a sibling's
        # count into the process-wide default torch keeps. The caller restores its own.
        torch.set_num_threads(per_stack)
        try:
            return _Group([jobs[i] for i in members], device).train()
        except Exception as err:  # pylint: disable=broad-exception-caught
            return err

    try:
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                trained = list(pool.map(train, stacks))
        else:
            trained = [train(members) for members in stacks]
    finally:
        torch.set_num_threads(count)
    outcomes: list[TrainResult | BaseException | None] = [None] * len(jobs)
    for members, results in zip(stacks, trained):
        if isinstance(results, Exception):
            say(f"a batch failed ({type(results).__name__}: {results}); its clients train "
                "one after another")
            for i in members:
                jobs[i].generator.set_state(drawn[i])
            results = [_alone(jobs[i], results) for i in members]
        for i, outcome in zip(members, results):
            outcomes[i] = outcome
    return outcomes  # type: ignore[return-value]


def lanes_of(members: list[int], steps: list[int], lanes: int) -> list[list[int]]:
    """``members`` split into at most ``lanes`` stacks of about equal cost.

    A stack's cost is modelled as its longest client's steps (the fixed part of every
    step) plus all its clients' steps (the part per client), the two about equal for
    cnn-tiny on a CPU. Clients go, longest first, to the cheapest stack so far (ties
    to the first): deterministic, and the longest clients end up in different stacks.
    """
    if lanes <= 1 or len(members) <= 1:
        return [members] if members else []
    order = sorted(range(len(members)), key=lambda i: -steps[i])
    stacks: list[list[int]] = [[] for _ in range(min(lanes, len(members)))]
    longest, total = [0] * len(stacks), [0] * len(stacks)
    for i in order:
        lane = min(range(len(stacks)), key=lambda s: (max(longest[s], steps[i]) + total[s]
                                                      + steps[i], s))
        stacks[lane].append(members[i])
        longest[lane], total[lane] = max(longest[lane], steps[i]), total[lane] + steps[i]
    return [sorted(stack) for stack in stacks if stack]


def _alone(job: Job, err: Exception) -> TrainResult | BaseException:
    if job.alone is None:
        return err
    try:
        with threads(1):
            return job.alone()
    except Exception as own:  # pylint: disable=broad-exception-caught
        return own


class _Group:
    """Alike jobs, stacked: parameters ``(G, ...)`` in descending order of steps."""

    def __init__(self, jobs: list[Job], device: torch.device) -> None:
        self.cfg = jobs[0].cfg
        self.device = device
        plans = [self.steps_of(job) for job in jobs]
        self.order = sorted(range(len(jobs)), key=lambda i: -plans[i])
        self.jobs = [jobs[i] for i in self.order]
        self.steps = [plans[i] for i in self.order]  # descending: those training are a prefix
        # A copy, moved: fixed layers (the scattering's filters) run on the device too.
        self.stacked = StackedModel(copy.deepcopy(jobs[0].model).to(device))
        own = [dict(j.model.named_parameters()) for j in self.jobs]
        self.params: Params = {
            n: torch.stack([params[n].detach() for params in own]).to(device)
            for n, _ in jobs[0].model.named_parameters()}
        self.momentum = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.keep = self._stacked(lambda job: job.masks)  # enforced on the weights
        # kept in each sample's gradient before clipping, and outside it after the noise
        self.clip_keep = self._stacked(lambda job: combine(job.masks, job.subspace)) \
            if any(job.subspace for job in self.jobs) else self.keep
        self.project = self._stacked(lambda job: job.subspace)
        mus = [job.proximal_mu for job in self.jobs]
        self.mu = torch.tensor(mus, device=device) if any(mus) else None
        self.anchor = {n: p.clone() for n, p in self.params.items()} if self.mu is not None \
            else {}
        self.offsets = np.cumsum([0] + [len(job.y) for job in self.jobs])
        self.x = torch.cat([job.x for job in self.jobs]).to(device)
        self.y = torch.cat([job.y for job in self.jobs]).to(device)

    @staticmethod
    def steps_of(job: Job) -> int:
        """The number of local steps ``job`` takes."""
        if job.dp is not None:  # Opacus's Poisson sampler: int(1 / q) batches an epoch
            return int(1 / job.dp.sample_rate) * job.cfg.local_epochs
        return math.ceil(len(job.y) / job.cfg.batch_size) * job.cfg.local_epochs

    def _stacked(self, masks_of: Callable[[Job], dict[str, np.ndarray]]) -> Params:
        """Per name, 1 where each client's mask keeps the coordinate (1 without a mask)."""
        masks = [masks_of(job) for job in self.jobs]
        names = {n for own in masks for n in own if n in self.params}
        keep = {}
        for name in names:
            shape = self.params[name].shape[1:]
            keep[name] = torch.stack([
                torch.from_numpy(own[name]).to(torch.float32) if name in own
                else torch.ones(shape) for own in masks]).to(self.device)
        return keep

    def train(self) -> list[TrainResult]:
        steps = self.steps
        losses = torch.zeros(len(self.jobs), dtype=torch.float64, device=self.device)
        rows = None if self.jobs[0].dp is not None else self._row_plan(steps)
        for t in range(steps[0] if steps else 0):
            k = sum(1 for s in steps if s > t)
            self._enforce_masks(k)
            if rows is None:
                loss, grads = self._private_step(t, k)
            else:
                loss, grads = self._step(rows[:k, t], k)
            self._sgd(grads, k)
            losses[:k] += loss.to(torch.float64)
        self._enforce_masks(len(self.jobs))
        results = [TrainResult(float(losses[i]) / max(s, 1),
                               job.dp.records if job.dp else len(job.y), s)
                   for i, (job, s) in enumerate(zip(self.jobs, steps))]
        trained = {n: p.to("cpu") for n, p in self.params.items()}  # one copy per tensor
        for i, job in enumerate(self.jobs):
            with torch.no_grad():
                for name, param in job.model.named_parameters():
                    param.copy_(trained[name][i])
        back = [None] * len(self.jobs)
        for place, i in enumerate(self.order):
            back[i] = results[place]
        return back  # type: ignore[return-value]

    def _row_plan(self, steps: list[int]) -> torch.Tensor:
        """Rows into the stacked data for every client and step, (G, T, batch), -1 for
        padding: each epoch a permutation from the client's generator, as train() draws."""
        size = self.cfg.batch_size
        plan = torch.full((len(self.jobs), max(steps, default=0), size), -1, dtype=torch.long)
        for c, job in enumerate(self.jobs):
            n, per_epoch = len(job.y), math.ceil(len(job.y) / size)
            for epoch in range(self.cfg.local_epochs):
                order = torch.randperm(n, generator=job.generator) + int(self.offsets[c])
                padded = torch.full((per_epoch * size,), -1, dtype=torch.long)
                padded[:n] = order
                plan[c, epoch * per_epoch:(epoch + 1) * per_epoch] = padded.view(per_epoch, size)
        return plan.to(self.device)

    def _enforce_masks(self, k: int) -> None:
        """Zero pruned weights before the forward pass (what masked_training's hooks do)."""
        with torch.no_grad():
            for name, keep in self.keep.items():
                self.params[name][:k].mul_(keep[:k])

    def _leaves(self, k: int) -> Params:
        return {n: p[:k].detach().requires_grad_() for n, p in self.params.items()}

    def _step(self, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Mean cross-entropy of each client's batch (plus FedProx's term); its gradient."""
        valid = (rows >= 0).t()  # (batch, k)
        index = rows.clamp(min=0).t()
        leaves = self._leaves(k)
        logits = self.stacked(leaves, self.x[index])
        per_row = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.y[index].reshape(-1),
                                  reduction="none").view(valid.shape)
        loss = (per_row * valid).sum(0) / valid.sum(0)
        if self.mu is not None:
            drift = sum(((leaves[n] - a[:k]) ** 2).flatten(1).sum(1)
                        for n, a in self.anchor.items())
            loss = loss + 0.5 * self.mu[:k] * drift
        grads = torch.autograd.grad(loss.sum(), list(leaves.values()))
        return loss.detach(), list(grads)

    def _private_step(self, t: int, k: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Opacus's DP-SGD step for each client: its Poisson batch, per-sample gradients
        clipped to dp-clip and summed, its Gaussian noise, divided by its expected batch."""
        samples: list[torch.Tensor] = []
        for c, job in enumerate(self.jobs[:k]):
            per_epoch = self.steps[c] // self.cfg.local_epochs
            if t % per_epoch == 0:  # a new epoch: DataLoader draws its base seed
                torch.empty((), dtype=torch.int64).random_(generator=job.generator)
            drawn = torch.rand(len(job.y), generator=job.generator) < job.dp.sample_rate
            samples.append(drawn.nonzero().reshape(-1) + int(self.offsets[c]))
        width = max((len(s) for s in samples), default=0)
        loss = torch.zeros(k, device=self.device)
        summed = {n: torch.zeros_like(p[:k]) for n, p in self.params.items()}
        if width:
            rows = torch.full((k, width), -1, dtype=torch.long)
            for c, s in enumerate(samples):
                rows[c, :len(s)] = s
            loss, summed = self._clipped_sums(rows.to(self.device), k, width)
        noisy = []
        batches = torch.tensor([job.dp.expected_batch_size for job in self.jobs[:k]],
                               dtype=torch.float32, device=self.device)
        for name, total in summed.items():
            noise = torch.stack([self._noise(job, total.shape[1:]) for job in self.jobs[:k]])
            scale = batches.view(-1, *[1] * (total.dim() - 1))
            grad = (total + noise.to(self.device)) / scale
            if name in self.project:  # as train_private's step hook: after the noise
                grad = grad * self.project[name][:k]
            noisy.append(grad)
        return loss.detach(), noisy

    def _clipped_sums(self, rows: torch.Tensor, k: int, width: int
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Each client's mean loss on its Poisson batch ``rows`` (k, width; -1 pads) and
        its per-sample gradients clipped to dp-clip and summed, as Opacus's DPOptimizer
        sums them (pruned coordinates and those outside a subspace zeroed before the
        norm, as train_private does)."""
        valid = (rows >= 0).reshape(-1)
        slots = valid.nonzero().reshape(-1)  # the samples, packed: no padding computed
        owner = slots // width  # each sample's client
        params, copies = {}, {}
        for name, p in self.params.items():
            if name in self.stacked.linear:  # its gradient is taken at its output
                params[name] = p[:k].detach().requires_grad_()
            else:  # one copy per sample: autograd gives each sample's own gradient
                params[name] = copies[name] = p[:k].detach().index_select(
                    0, owner).requires_grad_()
        tape = Tape(slots, k, width)
        index = rows.reshape(-1)[slots].unsqueeze(0)
        logits = self.stacked.per_sample(params, self.x[index], tape)
        per_sample = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                     self.y[index].reshape(-1), reduction="none")
        grads = torch.autograd.grad(per_sample.sum(),
                                    [*copies.values(), *(out for _, _, out in tape.linear)])
        per_copy = {n: self._kept(n, g, owner) for n, g in zip(copies, grads)}
        squares = tape.grid(sum((g.flatten(1).pow(2).sum(1) for g in per_copy.values()),
                                start=per_sample.new_zeros(len(slots))))  # in the padded grid
        linear: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for (prefix, inputs, _), out_grad in zip(tape.linear, grads[len(copies):]):
            weight, bias = prefix + "weight", prefix + "bias"
            if weight in self.clip_keep:  # ||(g a^T) * M||^2 = sum_oi g_o^2 M_oi a_i^2 (M: 0/1)
                squares = squares + torch.einsum(
                    "kbo,koi,kbi->kb", out_grad.pow(2), self.clip_keep[weight][:k],
                    inputs.pow(2)).reshape(-1)
            else:  # ||g a^T|| = ||g|| ||a||: no per-sample matrix needed
                squares = squares + (out_grad.pow(2).sum(2) * inputs.pow(2).sum(2)).reshape(-1)
            linear[weight] = (out_grad, inputs)
            if bias in self.params:
                bias_grad = out_grad * self.clip_keep[bias][:k].unsqueeze(1) \
                    if bias in self.clip_keep else out_grad
                squares = squares + bias_grad.pow(2).sum(2).reshape(-1)
                linear[bias] = (bias_grad, None)
        factor = ((self.cfg.dp_clip / (squares.sqrt() + 1e-6)).clamp(max=1.0) * valid
                  ).view(k, width)
        summed = {}
        for name in self.params:
            if name in per_copy:  # placed in the grid: a fixed summation order, also on a GPU
                g = per_copy[name]
                summed[name] = torch.einsum("kb,kb...->k...", factor,
                                            tape.grid(g).view(k, width, *g.shape[1:]))
            elif linear[name][1] is None:  # per-sample already: (k, width, ...)
                summed[name] = torch.einsum("kb,kb...->k...", factor, linear[name][0])
            else:
                out_grad, inputs = linear[name]
                summed[name] = torch.bmm((out_grad * factor.unsqueeze(2)).transpose(1, 2), inputs)
                if name in self.clip_keep:  # the mask on each sample's matrix, summed
                    summed[name] = summed[name] * self.clip_keep[name][:k]
        counts = valid.view(k, width).sum(1)
        losses = tape.grid(per_sample.detach()).view(k, width).sum(1)
        return losses / counts.clamp(min=1), summed

    def _kept(self, name: str, grad: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """Each sample's gradient (one row per sample of client ``owner``) masked."""
        if name not in self.clip_keep:
            return grad
        return grad * self.clip_keep[name].index_select(0, owner)

    def _noise(self, job: Job, shape: torch.Size) -> torch.Tensor:
        std = job.dp.noise_multiplier * self.cfg.dp_clip
        if std == 0:
            return torch.zeros(shape)
        return torch.normal(mean=0, std=std, size=tuple(shape), generator=job.generator)

    def _sgd(self, grads: list[torch.Tensor], k: int) -> None:
        cfg = self.cfg
        with torch.no_grad():
            for (name, param), grad in zip(self.params.items(), grads):
                p = param[:k]
                step = grad.add(p, alpha=cfg.weight_decay) if cfg.weight_decay else grad
                if cfg.momentum:
                    buf = self.momentum[name][:k]
                    buf.mul_(cfg.momentum).add_(step)
                    step = buf
                p.add_(step, alpha=-cfg.lr)
