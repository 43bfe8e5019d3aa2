"""Secure mode (dp-secure-rng): exact discrete Gaussian, OS-entropy sampling, both DP levels.

The statistical tests draw fixed sample sizes and allow 6 standard errors (or a
chi-square tail of 1e-9): a correct sampler fails them with probability below 1e-8,
while a wrong scale, a biased sign or a float sampler fails them every time.
"""

from __future__ import annotations

import math
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chi2
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data._utils.collate import default_collate

from smallfed.config import Config, ConfigError
from smallfed.privacy.secure import (
    GRID_BITS,
    SecurePoissonBatchSampler,
    SecureRandom,
    discrete_gaussian,
    grid_step,
    rounding_slack,
    secure_gaussian_noise,
    secure_poisson,
    use_secure_noise,
)
from smallfed.privacy.user_dp import GaussianAverage, UserLevelDP, l2_norm
from smallfed.simulation import simulate

SIGMAS = [0.8, 1.5, 3.7, Fraction(7, 3), 100, 2**GRID_BITS]


def pmf(sigma: float | Fraction) -> tuple[np.ndarray, np.ndarray]:
    """Support and probabilities of N_Z(0, sigma^2), truncated where the mass is < 1e-300."""
    s = float(sigma)
    reach = int(40 * s) + 2
    support = np.arange(-reach, reach + 1)
    weights = np.exp(-support.astype(np.float64) ** 2 / (2 * s * s))
    return support, weights / weights.sum()


@pytest.mark.parametrize("sigma", SIGMAS, ids=str)
def test_discrete_gaussian_mean_and_variance(sigma: float | Fraction) -> None:
    """Against the exact moments of the pmf (for small sigma the variance is below sigma^2)."""
    n = 100_000
    draws = discrete_gaussian(sigma, n)
    assert draws.dtype == np.int64 and draws.shape == (n,)
    if float(sigma) < 1000:
        support, probs = pmf(sigma)
        var = float(np.sum(probs * support.astype(np.float64) ** 2))
        fourth = float(np.sum(probs * support.astype(np.float64) ** 4))
    else:  # the discrete and continuous moments agree to ~exp(-2 pi^2 sigma^2)
        var, fourth = float(sigma) ** 2, 3 * float(sigma) ** 4
    x = draws.astype(np.float64)
    assert abs(x.mean()) <= 6 * math.sqrt(var / n)
    assert abs(np.mean(x * x) - var) <= 6 * math.sqrt((fourth - var * var) / n)


@pytest.mark.parametrize("sigma", [1.5, 0.8, Fraction(7, 3)], ids=str)
def test_discrete_gaussian_matches_its_pmf(sigma: float | Fraction) -> None:
    """Chi-square over the bins |x| <= 4 sigma (tails pooled), and each bin within 6 SE."""
    n = 200_000
    draws = discrete_gaussian(sigma, n)
    support, probs = pmf(sigma)
    edge = math.ceil(4 * float(sigma))
    inner = np.abs(support) <= edge
    expected = np.append(probs[inner], probs[~inner].sum()) * n
    observed = np.append([np.sum(draws == x) for x in support[inner]],
                         np.sum(np.abs(draws) > edge))
    statistic = float(np.sum((observed - expected) ** 2 / expected))
    assert statistic < chi2.isf(1e-9, df=len(expected) - 1)
    share = expected / n
    assert np.all(np.abs(observed - expected) <= 6 * np.sqrt(n * share * (1 - share)) + 1)


def test_exact_bernoulli_of_e_to_the_minus_1() -> None:
    """The bits of e^-1 the comparison uses agree with longer expansions; the rate is e^-1."""
    from smallfed.privacy.secure import _bernoulli_exp_minus_1, _exp_minus_1_words

    words = _exp_minus_1_words(6)
    assert words[:4] == _exp_minus_1_words(4)
    assert abs(words[0] / 2.0**64 - math.exp(-1)) < 1e-15
    n = 1_000_000
    rate = float(np.mean(_bernoulli_exp_minus_1(n)))
    assert abs(rate - math.exp(-1)) <= 6 * math.sqrt(math.exp(-1) * (1 - math.exp(-1)) / n)


def test_discrete_gaussian_is_symmetric_and_shaped() -> None:
    draws = discrete_gaussian(2.0, (300, 200))
    assert draws.shape == (300, 200) and draws.dtype == np.int64
    positive, negative = int(np.sum(draws > 0)), int(np.sum(draws < 0))
    assert abs(positive - negative) <= 6 * math.sqrt(positive + negative)
    assert discrete_gaussian(0.0, 5).tolist() == [0] * 5
    assert discrete_gaussian(3.0).shape == ()
    with pytest.raises(ValueError):
        discrete_gaussian(-1.0, 3)


def test_discrete_gaussian_is_fast_enough_for_a_model() -> None:
    """50,000 coordinates (a small model's noise) well under the few seconds allowed."""
    discrete_gaussian(2**GRID_BITS, 1000)
    start = time.perf_counter()
    discrete_gaussian(2**GRID_BITS, 50_000)
    assert time.perf_counter() - start < 3.0


def test_secure_noise_lies_on_its_grid_with_the_right_scale() -> None:
    sigma, n = 0.37, 100_000
    step = grid_step(sigma)
    assert step == sigma / 2**GRID_BITS
    noise = secure_gaussian_noise(sigma, (n,))
    units = noise / step
    assert np.max(np.abs(units - np.rint(units))) < 1e-6  # every value is a grid point
    assert abs(noise.mean()) <= 6 * sigma / math.sqrt(n)
    assert noise.std() == pytest.approx(sigma, rel=6 * math.sqrt(0.5 / n))
    assert secure_gaussian_noise(0.0, 3).tolist() == [0.0] * 3
    assert rounding_slack(10_000, step) == pytest.approx(50 * step)


@pytest.mark.parametrize("rate", [0.0, 0.03, 0.5, 1.0])
def test_secure_poisson_keeps_the_rate(rate: float) -> None:
    n = 200_000
    kept = secure_poisson(n, rate)
    assert kept.dtype == bool and kept.shape == (n,)
    assert abs(kept.mean() - rate) <= 6 * math.sqrt(rate * (1 - rate) / n)
    with pytest.raises(ValueError):
        secure_poisson(3, 1.5)


def test_secure_random_never_repeats_and_is_uniform() -> None:
    a, b = SecureRandom(), SecureRandom()
    x, y = a.random(1000), b.random(1000)
    assert not np.array_equal(x, y) and not np.array_equal(x, a.random(1000))
    big = a.random(100_000)
    assert big.min() >= 0 and big.max() < 1
    assert np.all(big * 2**53 == np.floor(big * 2**53))  # 53-bit floats
    assert abs(big.mean() - 0.5) <= 6 * math.sqrt(1 / 12 / big.size)
    assert isinstance(a.random(), float) and isinstance(a.normal(0.0, 1.0), float)
    assert a.normal(1.0, 0.0, 3).tolist() == [1.0] * 3
    assert a.normal(0.0, 2.0, (4, 5)).shape == (4, 5)


# ------------------------------------------------------------------------ user level (server)

TEMPLATE = {"w": np.zeros((200, 500), np.float32), "b": np.zeros(1000, np.float32)}


def test_secure_average_has_the_calibrated_noise_on_its_grid() -> None:
    mechanism = GaussianAverage(clip=2.0, noise_multiplier=1.3, expected_clients=8, secure=True)
    out = mechanism([], TEMPLATE, np.random.default_rng(0))  # the rng is not used
    values = np.concatenate([v.reshape(-1) for v in out.values()]).astype(np.float64)
    assert values.std() == pytest.approx(mechanism.noise_std, rel=6 * math.sqrt(0.5 / values.size))
    assert abs(values.mean()) <= 6 * mechanism.noise_std / math.sqrt(values.size)
    units = values * 8 / grid_step(1.3 * 2.0)  # expected_clients 8: the division is exact
    # float32 keeps 24 bits: a grid value of up to ~2**19 steps is within 1/32 of its point
    assert np.max(np.abs(units - np.rint(units))) < 0.05


def test_secure_average_keeps_the_clip_bound_after_rounding() -> None:
    """Adversarial updates: each lands on the grid with norm <= C in exact integers."""
    rng = np.random.default_rng(5)
    z, clip_norm = 0.9, 1.7
    mechanism = GaussianAverage(clip=clip_norm, noise_multiplier=z, expected_clients=4,
                                secure=True)
    step = grid_step(z * clip_norm)
    dimension = sum(v.size for v in TEMPLATE.values())
    inner = clip_norm - rounding_slack(dimension, step)
    limit = Fraction(4**GRID_BITS) / Fraction(z) ** 2
    for i in range(20):
        scale = 10.0 ** rng.uniform(-1, 30)
        update = {k: (rng.standard_normal(v.shape) * scale).astype(np.float32)
                  for k, v in TEMPLATE.items()}
        if i % 2:  # all the mass in one direction: rounding errors add up coherently
            update = {k: np.full(v.shape, scale, np.float32) for k, v in TEMPLATE.items()}
        ints = mechanism._on_grid(update, inner, step)
        assert ints is not None
        squares = sum(int(np.sum(v.astype(object) ** 2)) for v in ints.values())
        assert squares <= limit  # ||X|| <= 2**16 / z grid steps: sensitivity C, exactly
        assert l2_norm({k: v * step for k, v in ints.items()}) <= clip_norm
    # one huge update moves the noiseless part of the average by at most C/m
    no_noise = GaussianAverage(clip=clip_norm, noise_multiplier=z, expected_clients=4, secure=True)
    huge = {k: np.full(v.shape, 1e30, np.float32) for k, v in TEMPLATE.items()}
    with_one = no_noise([huge], TEMPLATE, None)
    assert all(np.isfinite(v).all() for v in with_one.values())
    nan = {k: np.full(v.shape, np.nan, np.float32) for k, v in TEMPLATE.items()}
    assert all(np.isnan(v).all() for v in mechanism([nan], TEMPLATE, None).values())


def test_secure_rng_on_the_server() -> None:
    cfg = Config(privacy="user", num_clients=40, clients_per_round=10, dp_noise=1.0,
                 dp_secure_rng=True)
    server = UserLevelDP(cfg)
    rng = server.rng(3)
    assert isinstance(rng, SecureRandom) and server.mechanism.secure
    picked = rng.random(40) < server.sample_rate  # how PartitionSampling draws
    assert picked.dtype == bool
    assert not isinstance(UserLevelDP(cfg.replace(dp_secure_rng=False)).rng(3), SecureRandom)
    object.__setattr__(cfg, "dp_reproducible", True)  # past Config's own check
    with pytest.raises(ConfigError, match="dp-secure-rng.*dp-reproducible"):
        UserLevelDP(cfg)


def test_secure_adaptive_clip_follows_the_target_quantile() -> None:
    cfg = Config(privacy="user", num_clients=200, clients_per_round=100, dp_noise=0.5,
                 dp_clip=0.5, dp_clip_mode="adaptive", dp_clip_quantile=0.5, dp_secure_rng=True)
    server = UserLevelDP(cfg)
    updates = [{"w": np.full(4, norm / 2, np.float32)} for norm in np.linspace(1, 10, 100)]
    for _ in range(200):
        server.adapt_clip(updates, server.rng(1))
    assert server.clip_norm == pytest.approx(5.5, abs=0.8)


def test_a_secure_user_level_simulation_runs(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from smallfed.privacy import user_dp

    secure_rounds = []
    exact = user_dp.GaussianAverage._secure

    def spy(self: GaussianAverage, *args: object) -> dict:
        secure_rounds.append(self.noise_multiplier)
        return exact(self, *args)

    monkeypatch.setattr(user_dp.GaussianAverage, "_secure", spy)
    cfg = Config(privacy="user", num_clients=20, clients_per_round=10, partitioner="iid",
                 dp_noise=0.5, dp_clip=1.0, num_server_rounds=2, local_epochs=1, seed=3,
                 dp_secure_rng=True)
    rounds = simulate(cfg, tmp_path, progress=False)["rounds"]
    assert len(rounds) == 3
    assert all(r["epsilon"] > 0 for r in rounds[1:])
    assert all(math.isfinite(r["accuracy"]) for r in rounds)
    assert secure_rounds == [0.5, 0.5]  # both rounds took the integer path


# ------------------------------------------------------------------------ sample level (clients)

def test_secure_poisson_batches_work_with_opacus_empty_batch_collate() -> None:
    from opacus.data_loader import wrap_collate_with_empty

    n, rate, steps = 20, 0.01, 300
    x = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)
    y = torch.arange(n)
    dataset = TensorDataset(x, y)
    sampler = SecurePoissonBatchSampler(n, rate, steps)
    assert len(sampler) == steps
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=wrap_collate_with_empty(
        collate_fn=default_collate, sample_empty_shapes=[(0, 3), (0,)],
        dtypes=[torch.float32, torch.int64]))
    sizes = []
    for xb, yb in loader:
        assert xb.shape == (len(yb), 3) and xb.dtype == torch.float32
        assert torch.equal(xb[:, 0].long(), yb)  # the rows the sampler chose
        sizes.append(len(yb))
    assert len(sizes) == steps and 0 in sizes  # P(no empty batch) = (1 - 0.99**20)**300
    batches = list(SecurePoissonBatchSampler(1000, 0.05, 40))
    kept = sum(len(b) for b in batches)
    assert abs(kept - 2000) <= 6 * math.sqrt(40_000 * 0.05 * 0.95)
    assert all(b == sorted(set(b)) for b in batches)


def _private_linear(z: float, clip_norm: float):
    from opacus import PrivacyEngine

    model = nn.Linear(1000, 100)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    loader = DataLoader(TensorDataset(torch.randn(64, 1000), torch.zeros(64)), batch_size=16)
    engine = PrivacyEngine(accountant="rdp")
    module, optimizer, private_loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=loader, noise_multiplier=z, max_grad_norm=clip_norm, poisson_sampling=True)
    return model, module, optimizer, private_loader


def test_use_secure_noise_gives_calibrated_noise_on_the_grid() -> None:
    """All gradients zero: the change of a parameter is -lr * noise / expected batch size."""
    z, clip_norm = 1.3, 2.0
    model, module, optimizer, _ = _private_linear(z, clip_norm)
    use_secure_noise(optimizer)
    assert optimizer.secure_noise_std == pytest.approx(z * clip_norm)
    dimension = 1000 * 100 + 100
    step = grid_step(z * clip_norm)
    assert optimizer.max_grad_norm <= clip_norm - math.sqrt(dimension) * step
    assert optimizer.expected_batch_size == 16
    torch.manual_seed(0)
    optimizer.zero_grad()
    (module(torch.randn(16, 1000)) * 0).sum().backward()  # per-sample gradients all zero
    optimizer.step()
    noise = -model.weight.detach().double().numpy().reshape(-1) * 16  # lr 1, 16: exact
    assert noise.std() == pytest.approx(z * clip_norm, rel=6 * math.sqrt(0.5 / noise.size))
    assert abs(noise.mean()) <= 6 * z * clip_norm / math.sqrt(noise.size)
    units = noise / step
    assert np.max(np.abs(units - np.rint(units))) < 0.05  # float32 of a grid point
    # not torch's generator: the same torch seed gives other noise
    model2, module2, optimizer2, _ = _private_linear(z, clip_norm)
    use_secure_noise(optimizer2)
    torch.manual_seed(0)
    optimizer2.zero_grad()
    (module2(torch.randn(16, 1000)) * 0).sum().backward()
    optimizer2.step()
    assert not torch.equal(model.weight, model2.weight)


def test_use_secure_noise_trains_and_refuses_misuse() -> None:
    from opacus.data_loader import wrap_collate_with_empty

    torch.manual_seed(1)
    z, clip_norm = 0.5, 1.0
    model, module, optimizer, private_loader = _private_linear(z, clip_norm)
    use_secure_noise(optimizer)
    dataset = private_loader.dataset
    loader = DataLoader(dataset, batch_sampler=SecurePoissonBatchSampler(
        len(dataset), private_loader.sample_rate, len(private_loader)),
        collate_fn=private_loader.collate_fn)
    assert isinstance(private_loader.collate_fn, type(wrap_collate_with_empty(collate_fn=None)))
    for xb, yb in loader:
        optimizer.zero_grad()
        ((module(xb)[:, 0] - yb - 1) ** 2).sum().backward()
        optimizer.step()
    assert torch.isfinite(model.weight).all() and model.weight.abs().sum() > 0
    with pytest.raises(ValueError, match="already"):
        use_secure_noise(optimizer)
    optimizer.noise_multiplier = 0.7
    optimizer.zero_grad()
    (module(torch.randn(4, 1000)) ** 2).sum().backward()
    with pytest.raises(RuntimeError, match="noise multiplier changed"):
        optimizer.step()
    with pytest.raises(TypeError, match="DPOptimizer"):
        use_secure_noise(torch.optim.SGD(model.parameters(), lr=0.1))
