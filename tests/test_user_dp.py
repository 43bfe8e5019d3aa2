"""User-level DP-FedAvg: noise calibration, clipping after decoding, accounting, budget stop."""

from __future__ import annotations

import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp

from smallfed.codec import parse_codec
from smallfed.config import Config, ConfigError
from smallfed.privacy.local_dp import epsilon_of
from smallfed.privacy.user_dp import GaussianAverage, UserLevelDP, clip, l2_norm
from smallfed.simulation import simulate

TEMPLATE = {"w": np.zeros((200, 500), np.float32), "b": np.zeros(1000, np.float32)}


def test_noise_has_the_calibrated_standard_deviation() -> None:
    """z*C/m on each coordinate of the average; 101,000 draws, so the estimate is within 1%."""
    mechanism = GaussianAverage(clip=2.0, noise_multiplier=1.3, expected_clients=10)
    out = mechanism([], TEMPLATE, np.random.default_rng(0))
    values = np.concatenate([v.reshape(-1) for v in out.values()])
    assert mechanism.noise_std == pytest.approx(1.3 * 2.0 / 10)
    assert values.std() == pytest.approx(mechanism.noise_std, rel=0.01)
    assert abs(values.mean()) < 4 * mechanism.noise_std / math.sqrt(values.size)


def test_clipping_bounds_every_update() -> None:
    rng = np.random.default_rng(1)
    big = {k: rng.normal(0, 1, v.shape).astype(np.float32) for k, v in TEMPLATE.items()}
    small = {k: v * 1e-4 for k, v in big.items()}
    assert l2_norm(clip(big, 3.0)) == pytest.approx(3.0, rel=1e-5)
    assert all(np.array_equal(clip(small, 3.0)[k], small[k]) for k in small)


def test_clip_never_overshoots_after_the_float32_cast() -> None:
    """Adversarial updates (norms up to 1e200, float32 and float64, many shapes and clips):
    the float32 result's norm, measured in float64, is at most C for every one. Scaling
    once and casting, as clip did before, overshoots C in about 40% of these."""
    rng = np.random.default_rng(11)
    for i in range(3000):
        max_norm = float(10 ** rng.uniform(-4, 4))
        scale = 10 ** rng.uniform(-2, 30 if i % 2 else 200)
        dtype = np.float32 if i % 2 else np.float64
        update = {"a": (rng.standard_normal(int(rng.integers(1, 400))) * scale).astype(dtype),
                  "b": (rng.standard_normal((int(rng.integers(1, 30)), 7)) * scale).astype(dtype)}
        if i % 7 == 0:  # every coordinate equal: the cast's rounding errors all point outwards
            update = {k: np.full(v.shape, scale, dtype) for k, v in update.items()}
        clipped = clip(update, max_norm)
        assert all(v.dtype == np.float32 for v in clipped.values())
        assert l2_norm(clipped) <= max_norm
        if i % 2 and l2_norm(update) > 2 * max_norm:  # float32 input: still pointing the same way
            cosine = sum(float(np.vdot(clipped[k].astype(np.float64), update[k].astype(np.float64)))
                         for k in update) / (l2_norm(clipped) * l2_norm(update))
            assert cosine == pytest.approx(1.0, abs=1e-5)
    nan = clip({"w": np.array([np.nan, 1.0], np.float32)}, 1.0)["w"]
    assert np.isnan(nan[0])  # a NaN update stays NaN: the round is rolled back


def test_sensitivity_holds_for_what_the_server_aggregates_after_a_codec() -> None:
    """A clipped update, 1-bit quantised, decodes longer than the clip; the server re-clips."""
    rng = np.random.default_rng(2)
    update = clip({k: rng.normal(0, 1, v.shape).astype(np.float32) for k, v in TEMPLATE.items()},
                  1.0)
    codec = parse_codec("quantize:1")
    decoded = codec.decode(codec.encode(update, seed=0)[0], {k: v.shape for k, v in TEMPLATE.items()})
    assert l2_norm(decoded) > 1.5  # the codec grew the norm: a client-side clip is not enough
    mechanism = GaussianAverage(clip=1.0, noise_multiplier=0.0, expected_clients=4)
    average = mechanism([decoded], TEMPLATE, np.random.default_rng(0))
    assert l2_norm(average) <= 1.0 / 4 + 1e-6  # one client moves the average by <= C/m


@pytest.mark.parametrize(("noise", "rate", "rounds"), [(1.0, 0.1, 20), (0.8, 0.01, 300),
                                                       (2.0, 0.05, 100)])
def test_epsilon_agrees_with_dp_accounting(noise: float, rate: float, rounds: int) -> None:
    """Our epsilon (Opacus RDP and PRV) against Google's dp-accounting (RDP and PLD)."""
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)), rounds)
    history = [(noise, rate, 1)] * rounds
    theirs_rdp = rdp.RdpAccountant()
    theirs_rdp.compose(event)
    theirs_pld = pld.PLDAccountant()
    theirs_pld.compose(event)
    ours_rdp = epsilon_of(Config(dp_accountant="rdp"), history)
    ours_prv = epsilon_of(Config(dp_accountant="prv"), history)
    assert ours_rdp == pytest.approx(theirs_rdp.get_epsilon(1e-5), rel=0.02)
    assert ours_prv == pytest.approx(theirs_pld.get_epsilon(1e-5), rel=0.05)


def test_budget_stops_at_the_right_round() -> None:
    cfg = Config(privacy="user", num_clients=100, clients_per_round=5, dp_noise=1.0,
                 dp_budget=2.0, dp_accountant="rdp", num_server_rounds=50)
    expected = next(r for r in range(1, 200)
                    if epsilon_of(cfg, [(1.0, 0.05, 1)] * (r + 1)) > 2.0)
    server = UserLevelDP(cfg)
    allowed = [server.start_round()[0] for _ in range(expected + 3)]
    assert allowed == [True] * expected + [False] * 3
    epsilons = [epsilon_of(cfg, server.history[:r]) for r in range(1, expected + 1)]
    assert epsilons == sorted(epsilons) and epsilons[-1] <= 2.0


def test_user_dp_needs_fedavg() -> None:
    with pytest.raises(ConfigError, match="strategy: DP-FedAvg"):
        Config(privacy="user", strategy="fedadam")


def test_a_user_level_private_simulation_learns_and_stops_at_its_budget(tmp_path: Path) -> None:
    cfg = Config(privacy="user", num_clients=40, clients_per_round=20, partitioner="iid",
                 dp_noise=0.3, dp_clip=1.0, dp_budget=40.0, num_server_rounds=5, local_epochs=2,
                 seed=4, codec="topk:0.2,quantize:4,error_feedback", dp_reproducible=True)
    rounds = simulate(cfg, tmp_path, progress=False)["rounds"]
    trained = [r for r in rounds[1:] if r["clients"] > 0]
    assert 2 <= len(trained) < 5  # the budget ends training before the last round
    assert rounds[len(trained)]["accuracy"] > rounds[0]["accuracy"] + 0.2
    assert all(r["epsilon"] <= 40.0 for r in rounds)
    assert [r["epsilon"] for r in rounds] == sorted(r["epsilon"] for r in rounds)


def test_adaptive_clip_follows_the_target_quantile_of_norms() -> None:
    """Norms spread evenly over 1..10: the clip settles near their median, 5.5."""
    cfg = Config(privacy="user", num_clients=200, clients_per_round=100, dp_noise=0.5,
                 dp_clip=0.5, dp_clip_mode="adaptive", dp_clip_quantile=0.5)
    server = UserLevelDP(cfg)
    assert server.update_noise > server.noise  # part of z pays for the noisy count
    updates = [{"w": np.full(4, norm / 2, np.float32)} for norm in np.linspace(1, 10, 100)]
    rng = np.random.default_rng(0)
    for _ in range(200):
        server.adapt_clip(updates, rng)
    assert server.clip_norm == pytest.approx(5.5, abs=0.8)
    fixed = UserLevelDP(cfg.replace(dp_clip_mode="fixed"))
    fixed.adapt_clip(updates, rng)
    assert fixed.clip_norm == 0.5


def test_adaptive_clip_needs_enough_count_noise() -> None:
    from smallfed.data import check_data_config
    from smallfed.privacy import check_privacy_config

    cfg = Config(privacy="user", num_clients=40, clients_per_round=4, dp_noise=1.0,
                 dp_clip_mode="adaptive", partitioner="iid")
    with pytest.raises(ConfigError, match="dp-clip-count-stddev"):
        check_privacy_config(cfg, check_data_config(cfg))


def test_dp_fedavg_takes_server_momentum_as_post_processing(tmp_path) -> None:
    """fedavgm under user-level DP: momentum 0 and server-lr 1 is DP-FedAvg exactly; with
    momentum the model differs and epsilon does not."""
    from smallfed.config import Config
    from smallfed.simulation import simulate

    base = dict(num_server_rounds=3, num_clients=40, clients_per_round=10, local_epochs=1,
                privacy="user", dp_noise=1.0, dp_clip=0.5, dp_reproducible=True, seed=2)
    plain = simulate(Config(**base), tmp_path / "a", progress=False)
    same = simulate(Config(**base, strategy="fedavgm", server_momentum=0.0, server_lr=1.0),
                    tmp_path / "b", progress=False)
    moved = simulate(Config(**base, strategy="fedavgm", server_momentum=0.9, server_lr=1.0),
                     tmp_path / "c", progress=False)
    accuracy = [[r["accuracy"] for r in run["rounds"]] for run in (plain, same, moved)]
    assert accuracy[0] == accuracy[1]
    assert accuracy[2][-1] != accuracy[0][-1]
    assert moved["summary"]["epsilon"] == plain["summary"]["epsilon"]
