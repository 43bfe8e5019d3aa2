"""Distributed discrete Gaussian encoding for secure aggregation (smallfed.privacy.distributed).

Statistical checks allow 6 standard errors (or a Poisson tail below 1e-7): a correct
encoding fails them with negligible probability, a wrong scale or rotation every time.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest

from smallfed.privacy.distributed import (
    IntegerEncoding,
    bits_needed,
    plan_encoding,
    rotate,
    rounded_norm_bound,
    unamplified_epsilon,
    unrotate,
)
from smallfed.privacy.local_dp import epsilon_of

# cnn-tiny on 8x8 digits, clip 0.5, z = 1, SecAgg+ of 130 clients of which 67 must survive
REFERENCE = dict(dimension=13802, clip=0.5, noise_multiplier=1.0, min_survivors=67,
                 max_clients=130)


def lift(residues: np.ndarray, bits: int) -> np.ndarray:
    """Residues mod 2^bits -> their representatives in [-2^(bits-1), 2^(bits-1))."""
    values = residues.astype(np.int64)
    return np.where(values >= 1 << (bits - 1), values - (1 << bits), values)


@pytest.mark.parametrize("d", [1, 2, 3, 1064, 13802])
def test_rotation_is_orthogonal_and_invertible(d: int) -> None:
    rng = np.random.default_rng(d)
    x = rng.normal(size=d)
    y = rotate(x, seed=11)
    assert y.shape == (d,)
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x), rel=1e-12)
    np.testing.assert_allclose(unrotate(y, seed=11), x, atol=1e-12)
    assert d < 1000 or not np.allclose(unrotate(y, seed=12), x)  # the seed matters


def test_rotation_matrix_is_orthogonal_and_flattens() -> None:
    d = 13  # blocks 8 + 4 + 1
    matrix = np.stack([rotate(e, seed=3) for e in np.eye(d)], axis=1)
    np.testing.assert_allclose(matrix.T @ matrix, np.eye(d), atol=1e-12)
    # each column is a basis vector spread evenly over its block: 1/sqrt(block size)
    magnitudes = sorted(np.round(np.abs(matrix).max(axis=0) ** -2).astype(int))
    assert magnitudes == [1] + [4] * 4 + [8] * 8


@pytest.mark.parametrize("bits", [12, 62])
def test_round_trip_wraps_around(bits: int) -> None:
    d, n, clip = 1064, 8, 0.5
    enc = plan_encoding(dimension=d, clip=clip, bits=bits, noise_multiplier=0.0,
                        min_survivors=n, max_clients=n, k_stddevs=6.0)
    assert enc.noise_std == 0
    rng = np.random.default_rng(bits)
    vectors = rng.normal(size=(n, d)) * rng.uniform(0.2, 3.0, size=(n, 1)) * clip / math.sqrt(d)
    vectors[0, 5] = 40.0  # far over the clip, all in one coordinate
    encodings = np.stack([enc.encode(v, rotation_seed=99) for v in vectors])
    assert encodings.dtype == np.uint64 and encodings.max() < 2**bits
    total = encodings.sum(axis=0)  # plain uint64 arithmetic: overflows 2^64 at bits 62
    assert (total >= 2**bits).any() or bits == 62  # the modular sum wraps
    if bits == 62:
        assert (total < encodings.max(axis=0)).any()  # ... and uint64 itself overflowed
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    clipped = vectors * np.minimum(1.0, clip / norms)
    error = np.linalg.norm(enc.decode_sum(total, rotation_seed=99) - clipped.sum(axis=0))
    assert error <= n * math.sqrt(d) * enc.scale + 1e-9  # each coordinate rounds by < 1 unit
    assert error <= 2 * math.sqrt(n * d / 4) * enc.scale  # rounding variance <= 1/4


def test_rounding_bound_holds_for_adversarial_inputs() -> None:
    d, clip = 1064, 1.0
    half_units = np.full(d, 0.5)  # rotated, every coordinate half a unit: rounding's worst
    encodings = [  # coarse grids (c = 20 units), where rounding inflates the norm most
        IntegerEncoding(dimension=d, clip=clip, bits=62, scale=clip / 20, noise_std=0),
        IntegerEncoding(dimension=d, clip=clip, bits=62, scale=clip / 20, noise_std=0, beta=0),
        IntegerEncoding(dimension=d, clip=clip, bits=62, scale=clip / 3000, noise_std=0),
        # beta near 1: the bound is barely above the clip, about half the draws fail it
        IntegerEncoding(dimension=d, clip=clip, bits=62, scale=clip / np.linalg.norm(half_units),
                        noise_std=0, beta=0.999),
    ]
    rng = np.random.default_rng(0)
    spike = np.zeros(d)
    spike[17] = clip  # all mass in one coordinate, exactly at the clip
    inputs = [spike, -spike, np.full(d, clip / math.sqrt(d))]
    inputs += [v * clip / np.linalg.norm(v) for v in rng.normal(size=(40, d))]
    inputs += list(rng.normal(size=(10, d)))  # beyond the clip: clipped first
    for enc in encodings:
        limit = enc.sensitivity**2
        for x in inputs + [unrotate(half_units * enc.scale, seed=1)] * 20:
            rounded = lift(enc.encode(x, rotation_seed=1), enc.bits)
            assert int(np.dot(rounded, rounded)) <= limit
    # the conditioning is what enforces it: plain randomized rounding often fails it
    plain = (rng.random((200, d)) < 0.5).sum(axis=1)
    assert (plain > encodings[-1].sensitivity ** 2).mean() > 0.3


def test_sensitivity_matches_kairouz_bound() -> None:
    enc = IntegerEncoding(dimension=1000, clip=2.0, bits=20, scale=0.01, noise_std=0)
    c = 200.0
    expected = min(c + math.sqrt(1000), math.sqrt(c**2 + 250 + 1.0 * (c + math.sqrt(1000) / 2)))
    assert enc.sensitivity == pytest.approx(expected)  # sqrt(2 ln(1/beta)) = 1
    assert rounded_norm_bound(c, 0.0, 1000) == c + math.sqrt(1000)


def test_noise_of_the_sum() -> None:
    d, n, s = 13802, 8, 50.0
    enc = IntegerEncoding(dimension=d, clip=1.0, bits=24, scale=1e-3, noise_std=s)
    total = sum(enc.encode(np.zeros(d), rotation_seed=4) for _ in range(n))
    noise = enc.decode_sum(total, rotation_seed=4)
    expected = math.sqrt(n) * s * enc.scale
    assert abs(noise.mean()) < 6 * expected / math.sqrt(d)
    assert noise.std() == pytest.approx(expected, rel=6 / math.sqrt(2 * d))


def test_plan_encoding_reference_point() -> None:
    enc = plan_encoding(bits=16, **REFERENCE)
    assert enc.noise_multiplier(67) >= 1.0
    assert enc.sensitivity * enc.scale == pytest.approx(0.5, rel=0.01)
    assert enc.sensitivity * enc.scale >= 0.5
    # The worst case for the range: 130 clients send the same dense vector at the clip
    # (their norms add up), plus 130 shares of noise (one discrete Gaussian of the summed
    # variance stands in for them here, to keep the test fast).
    d, n, half = REFERENCE["dimension"], REFERENCE["max_clients"], 2**15
    x = np.random.default_rng(5).normal(size=d)
    x *= 0.5 / np.linalg.norm(x)
    quiet = dataclasses.replace(enc, noise_std=0.0)
    signal = sum(lift(quiet.encode(x, rotation_seed=8), 16) for _ in range(n))
    noisy = dataclasses.replace(enc, noise_std=enc.noise_std * math.sqrt(n))
    total = signal + lift(noisy.encode(np.zeros(d), rotation_seed=8), 16)
    assert total.std() <= half / 4 * 1.03  # k = 4 standard deviations fit
    inside = (total >= -half) & (total < half)
    assert (~inside).sum() <= 30  # subgaussian: expected <= d * 2 exp(-8) = 9.3 (Gaussian: 0.9)
    residues = np.mod(total, 2**16).astype(np.uint64)
    assert np.array_equal(lift(residues, 16)[inside], total[inside])
    error = np.linalg.norm(enc.decode_sum(residues, rotation_seed=8) - n * x)
    noise_norm = enc.noise_std * math.sqrt(n * d) * enc.scale  # the noise, in float units
    assert error < 1.05 * noise_norm + (~inside).sum() * 2**16 * enc.scale


def test_plan_encoding_refuses_too_few_bits() -> None:
    needed = bits_needed(**REFERENCE)
    assert needed == 11
    plan_encoding(bits=needed, **REFERENCE)
    with pytest.raises(ValueError, match=r"bits=8 cannot hold the sum of 130 clients.*"
                                         r"use bits >= 11"):
        plan_encoding(bits=8, **REFERENCE)
    with pytest.raises(ValueError, match="bits >= 11"):
        plan_encoding(bits=10, **REFERENCE)


def test_plan_without_noise() -> None:
    enc = plan_encoding(dimension=138, clip=0.5, bits=16, noise_multiplier=0.0,
                        min_survivors=1, max_clients=130)
    assert enc.noise_std == 0 and enc.noise_multiplier(130) == 0.0
    assert enc.sensitivity * enc.scale < 0.5 * 1.01


def test_noise_multiplier_grows_as_sqrt_of_survivors() -> None:
    enc = plan_encoding(bits=16, **REFERENCE)
    base = enc.noise_multiplier(25)
    for survivors in (1, 67, 100, 130, 400):
        assert enc.noise_multiplier(survivors) == pytest.approx(
            base * math.sqrt(survivors / 25), rel=1e-12)
    assert enc.noise_multiplier(67) == pytest.approx(
        math.sqrt(67) * enc.noise_std / enc.sensitivity, rel=1e-12)


def test_noise_multiplier_refuses_a_non_negligible_tau() -> None:
    enc = IntegerEncoding(dimension=1000, clip=1.0, bits=20, scale=0.1, noise_std=0.5)
    with pytest.raises(ValueError, match="tau"):
        enc.noise_multiplier(10)
    assert enc.noise_multiplier(1) > 0  # one share is a discrete Gaussian: tau = 0


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("bits", [11, 16])
def test_accountant_sees_the_central_mechanism(accountant: str, bits: int) -> None:
    """The effective multiplier of 67 survivors' noise gives the central epsilon at z = 1
    (or less), whatever the rounding inflation: the noise is calibrated to it."""
    enc = plan_encoding(bits=bits, **REFERENCE)
    cfg = SimpleNamespace(dp_accountant=accountant, dp_delta=1e-5)
    rate, rounds = 67 / 1000, 200
    central = epsilon_of(cfg, [(1.0, rate, rounds)])
    distributed = epsilon_of(cfg, [(enc.noise_multiplier(67), rate, rounds)])
    assert distributed <= central
    assert distributed == pytest.approx(central, rel=0.01)
    more = epsilon_of(cfg, [(enc.noise_multiplier(100), rate, rounds)])
    assert more < 0.8 * central  # survivors beyond the minimum only add noise


def test_encode_checks_its_input() -> None:
    enc = IntegerEncoding(dimension=4, clip=1.0, bits=8, scale=0.1, noise_std=0)
    with pytest.raises(ValueError, match="expected 4"):
        enc.encode(np.zeros(5), rotation_seed=0)
    with pytest.raises(ValueError, match="non-finite"):
        enc.encode(np.array([0.0, np.nan, 0.0, 0.0]), rotation_seed=0)
    with pytest.raises(ValueError, match="precision"):
        IntegerEncoding(dimension=4, clip=1.0, bits=8, scale=1e-30, noise_std=0)


@pytest.mark.parametrize("z, rounds", [(1.0, 1), (1.0, 9), (0.7, 10), (3.0, 2)])
def test_unamplified_epsilon_lies_between_the_gaussian_and_the_simple_zcdp_bound(
        z: float, rounds: int) -> None:
    """Against the server (no subsampling): zCDP converted to (epsilon, delta), never
    below the continuous Gaussian's exact epsilon (Google's PLD accountant), and tighter
    than the simple conversion rho + 2 sqrt(rho log(1/delta))."""
    from dp_accounting.pld import privacy_loss_distribution

    pld = privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=z, value_discretization_interval=1e-4).self_compose(rounds)
    gaussian = pld.get_epsilon_for_delta(1e-5)
    rho = rounds / (2 * z * z)
    simple = rho + 2 * math.sqrt(rho * math.log(1e5))
    got = unamplified_epsilon(z, rounds, 1e-5)
    assert gaussian < got < simple
    assert got < 1.15 * gaussian  # the price of proving less than Gaussian noise
    assert unamplified_epsilon(z, 0, 1e-5) == 0.0
