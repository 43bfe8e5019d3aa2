"""Sample-level DP: the accountant adds up across rounds, budgets stop clients, runs learn."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant
from torch import nn

from smallfed.config import Config, ConfigError
from smallfed.data import check_data_config, federated_data
from smallfed.models import build_model
from smallfed.privacy import check_privacy_config
from smallfed.privacy.local_dp import epsilon_of, planned_rounds, train_private
from smallfed.simulation import simulate

FAST = dict(privacy="sample", dp_accountant="rdp", dp_reproducible=True, num_clients=4,
            clients_per_round=4,
            partitioner="iid", batch_size=30, local_epochs=1, lr=0.1, seed=5)


def rounds_of_dp(cfg: Config, rounds: int) -> list:
    x, y = federated_data(cfg).client(0)
    history, outcomes = [], []
    for r in range(rounds):
        model = build_model(cfg.model, (1, 8, 8), 10, cfg.seed)
        outcome = train_private(model, x, y, cfg, seed=r, history=history)
        history = outcome.history
        outcomes.append(outcome)
    return outcomes


@pytest.mark.parametrize("modules", ["smallfed.privacy, smallfed.privacy.user_dp",
                                     "smallfed.simulation"])
def test_opacus_is_imported_only_when_privacy_is_on(modules: str) -> None:
    """Opacus and scipy.stats take 3 s to import; a run without privacy does not pay it."""
    code = f"import {modules}, sys; print('opacus' in sys.modules, 'scipy.stats' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_epsilon_adds_up_across_rounds_and_matches_one_accountant() -> None:
    cfg = Config(**FAST, dp_noise=1.0)
    outcomes = rounds_of_dp(cfg, 3)
    epsilons = [o.epsilon for o in outcomes]
    assert epsilons == sorted(epsilons) and epsilons[0] > 0  # never decreases
    # One accountant that saw all three rounds' steps reports the same total.
    accountant = RDPAccountant()
    noise, rate, steps = outcomes[0].history[0]
    accountant.history = [(noise, rate, 3 * steps)]
    assert epsilons[-1] == pytest.approx(accountant.get_epsilon(delta=cfg.dp_delta), rel=1e-9)
    assert epsilons[-1] > epsilons[0] + 1.0  # the total, not a new engine's one round


def test_target_epsilon_is_spent_over_the_planned_rounds_then_clients_decline() -> None:
    cfg = Config(**{**FAST, "num_server_rounds": 3}, dp_target_epsilon=4.0)
    outcomes = rounds_of_dp(cfg, 4)
    assert [o.result is not None for o in outcomes] == [True, True, True, False]
    assert outcomes[2].epsilon == pytest.approx(4.0, abs=0.05)  # search tolerance
    assert "past the budget of 4.000" in outcomes[3].declined_reason
    assert outcomes[3].epsilon == outcomes[2].epsilon  # declining spends nothing


def test_epsilon_of_merges_repeated_rounds() -> None:
    cfg = Config(**FAST)
    assert epsilon_of(cfg, [(1.0, 0.1, 20), (1.0, 0.1, 20)]) == pytest.approx(
        epsilon_of(cfg, [(1.0, 0.1, 40)]))
    assert epsilon_of(cfg, []) == 0.0


def test_cached_rdp_epsilon_equals_opacus_accountant() -> None:
    history = [(1.1, 0.1, 45), (0.9, 0.05, 10), (1.1, 0.1, 45)]
    accountant = RDPAccountant()
    accountant.history = [(1.1, 0.1, 90), (0.9, 0.05, 10)]
    assert epsilon_of(Config(dp_accountant="rdp"), history) == pytest.approx(
        accountant.get_epsilon(delta=1e-5), rel=1e-12)


def test_budget_is_planned_for_a_quantile_of_participations() -> None:
    cfg = Config(num_server_rounds=30, num_clients=100, clients_per_round=10)
    planned = [planned_rounds(cfg.replace(dp_plan_quantile=q)) for q in (0.5, 0.9, 0.99)]
    assert planned == [3, 5, 7]  # Binomial(30, 0.1) quantiles
    assert planned_rounds(cfg.replace(num_clients=10)) == 30  # every client, every round


def test_prv_is_tighter_than_rdp() -> None:
    """The issue's anchor: 20 steps at rate 0.1, noise 1.0: RDP 4.22, PLD 3.59 (delta 1e-5)."""
    rdp = epsilon_of(Config(dp_accountant="rdp"), [(1.0, 0.1, 20)])
    prv = epsilon_of(Config(dp_accountant="prv"), [(1.0, 0.1, 20)])
    assert rdp == pytest.approx(4.22, abs=0.01)
    assert prv == pytest.approx(3.59, abs=0.05)


def batchnorm_model(input_shape: tuple, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, num_classes))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": "tests.test_privacy:batchnorm_model"}, "model: cannot train under DP"),
        ({"dp_noise": 0.0}, "dp-noise: 0 adds no noise"),
    ],
)
def test_impossible_private_settings_fail_before_the_run(changes: dict, message: str) -> None:
    cfg = Config(**{**FAST, **changes})
    with pytest.raises(ConfigError, match=message):
        check_privacy_config(cfg, check_data_config(cfg))


def test_bad_privacy_keys() -> None:
    for values, message in [({"dp-delta": 1.0}, "dp-delta"), ({"dp-clip": 0}, "dp-clip"),
                            ({"dp-noise": -1}, "dp-noise"), ({"privacy": "local"}, "privacy"),
                            ({"dp-clip-quantile": 1.5}, "dp-clip-quantile"),
                            ({"dp-secure-rng": True, "dp-reproducible": True},
                             "dp-secure-rng: secure mode draws noise no seed can repeat"),
                            ({"privacy": "sample", "fraction-evaluate": 0.5},
                             "fraction-evaluate: 0.5 asks private clients"),
                            ({"privacy": "sample", "strategy": "qfedavg"},
                             "strategy: qfedavg needs the clients' train-loss")]:
        with pytest.raises(ConfigError, match=message):
            Config.from_mapping(values)


def test_a_short_private_simulation_learns_and_reports_epsilon(tmp_path: Path) -> None:
    cfg = Config(**{**FAST, "num_server_rounds": 3}, dp_noise=0.7, dp_clip=1.0)
    results = simulate(cfg, tmp_path, progress=False)
    rounds = results["rounds"]
    epsilons = [r["epsilon"] for r in rounds]
    assert epsilons[0] == 0.0 and epsilons == sorted(epsilons) and epsilons[-1] > 0
    assert all(r["epsilon_mean"] <= r["epsilon"] for r in rounds)
    assert results["summary"]["epsilon"] == epsilons[-1]
    assert results["summary"]["delta"] == 1e-5
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"] + 0.2
    assert math.isfinite(rounds[-1]["loss"])


def test_secure_mode_trains_with_the_same_accounting(tmp_path: Path) -> None:
    """dp-secure-rng swaps where the randomness comes from, not the mechanism: the same
    epsilon, and a short run still learns."""
    cfg = Config(**{**FAST, "dp_reproducible": False, "num_server_rounds": 3},
                 dp_noise=0.7, dp_secure_rng=True)
    results = simulate(cfg, tmp_path, progress=False)
    plain = rounds_of_dp(cfg.replace(dp_secure_rng=False), 3)
    assert results["summary"]["epsilon"] == pytest.approx(plain[-1].epsilon, rel=1e-12)
    assert results["summary"]["privacy"]["secure_rng"] is True
    assert results["rounds"][-1]["accuracy"] > results["rounds"][0]["accuracy"] + 0.2


def test_physical_batches_give_the_same_steps_as_whole_ones() -> None:
    """BatchMemoryManager splits each Poisson batch and steps once per logical batch: with
    the same draws (seed) and no noise, the model ends where whole batches take it."""
    cfg = Config(**{**FAST, "batch_size": 30}, dp_noise=0.0, dp_clip=1.0)
    x, y = federated_data(cfg).client(0)
    models = []
    for physical in (0, 4):
        model = build_model(cfg.model, (1, 8, 8), 10, cfg.seed)
        outcome = train_private(model, x, y, cfg.replace(dp_physical_batch=physical), 3, [])
        models.append(model.state_dict())
        assert outcome.result is not None
    for name, value in models[0].items():
        assert (value - models[1][name]).abs().max() < 1e-5, name
    assert any((v - build_model(cfg.model, (1, 8, 8), 10, cfg.seed).state_dict()[k]).abs().max()
               > 1e-3 for k, v in models[0].items())  # it did train


def test_physical_batches_lower_the_memory_a_device_needs() -> None:
    from smallfed.devices import training_memory_bytes

    model = build_model("cnn-tiny", (1, 28, 28), 10, 0)
    cfg = Config(privacy="sample", batch_size=256)
    whole = training_memory_bytes(model, (1, 28, 28), cfg)
    split = training_memory_bytes(model, (1, 28, 28), cfg.replace(dp_physical_batch=16))
    assert split < whole / 5
