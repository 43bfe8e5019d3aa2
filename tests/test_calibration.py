"""DP noise calibration: as tight as Opacus's search or tighter, never above the target,
searched once per key and then read from the disk cache by any process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

from smallfed import cache as disk_cache
from smallfed.config import Config, ConfigError
from smallfed.privacy import calibration, check_privacy_config
from smallfed.privacy.local_dp import noise_for, planned_rounds, sample_rate, steps_per_round
from smallfed.privacy.user_dp import user_noise

DELTA = 1e-5


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty disk cache, and an empty memory cache before and after the test."""
    monkeypatch.setenv("SMALLFED_CACHE_DIR", str(tmp_path))
    calibration.noise_multiplier.cache_clear()
    yield tmp_path / "dp-noise"
    calibration.noise_multiplier.cache_clear()


def searches(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Records each search (the cache's misses) and lets it run."""
    calls: list[tuple] = []
    search = calibration.search

    def counted(*args):
        calls.append(args)
        return search(*args)

    monkeypatch.setattr(calibration, "search", counted)
    return calls


def opacus_epsilon(sigma: float, rate: float, steps: int, accountant: str) -> float:
    engine = create_accountant(mechanism=accountant)
    engine.history = [(sigma, rate, steps)]
    return engine.get_epsilon(delta=DELTA)


# (target, rate, steps, accountant): a user-level run (central-dp.toml at target 3),
# long small-q runs, and a client with all its records in every step (PRV is slow at
# other rates: benchmarks/dp_calibration.py compares a sweep point's clients).
AGREEMENT = [(3.0, 0.1, 30, "rdp"), (4.0, 0.02, 500, "rdp"), (1.0, 0.01, 3000, "rdp"),
             (2.0, 1.0, 10, "prv")]


@pytest.mark.parametrize(("target", "rate", "steps", "accountant"), AGREEMENT)
def test_agrees_with_opacus_and_is_never_above_the_target(
        cache: Path, target: float, rate: float, steps: int, accountant: str) -> None:
    ours = calibration.noise_multiplier(target, DELTA, rate, steps, accountant)
    theirs = get_noise_multiplier(target_epsilon=target, target_delta=DELTA,
                                  sample_rate=rate, steps=steps, accountant=accountant)
    eps = opacus_epsilon(ours, rate, steps, accountant)
    assert target * (1 - calibration.TOLERANCE) <= eps <= target
    # Opacus stops within 0.01 below the target (0.5% at 2): as tight, or tighter
    assert ours == pytest.approx(theirs, rel=0.01)
    assert ours <= theirs * (1 + calibration.TOLERANCE)


@pytest.mark.parametrize(("sigma", "rate", "steps"), [(1.3, 0.2, 50), (0.9, 1.0, 10)])
def test_prv_epsilon_is_opacus_prv_accountant_to_the_last_bit(
        sigma: float, rate: float, steps: int) -> None:
    ours = calibration.prv_epsilon(sigma, rate, steps, DELTA, RDPAccountant.DEFAULT_ALPHAS)
    assert ours == opacus_epsilon(sigma, rate, steps, "prv")


def test_rdp_epsilon_is_opacus_rdp_accountant_to_the_last_bit() -> None:
    ours = calibration.rdp_epsilon(1.1, 0.1, 45, DELTA, RDPAccountant.DEFAULT_ALPHAS)
    assert ours == opacus_epsilon(1.1, 0.1, 45, "rdp")


def test_a_new_process_reads_the_disk_and_does_not_search(
        cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = calibration.noise_multiplier(2.0, DELTA, 0.02, 500, "rdp")
    [entry] = cache.iterdir()
    stored = json.loads(entry.read_text())
    assert stored["noise_multiplier"] == first and stored["epsilon"] <= 2.0
    calibration.noise_multiplier.cache_clear()  # as a fresh process

    def no_search(*args):
        raise AssertionError("searched despite the disk cache")

    monkeypatch.setattr(calibration, "search", no_search)
    assert calibration.noise_multiplier(2.0, DELTA, 0.02, 500, "rdp") == first


@pytest.mark.parametrize("content", ["{\"noise_multiplier\": 1.0", "", "[1, 2]",
                                     "{\"key\": \"another\", \"noise_multiplier\": 0.5}"])
def test_a_corrupt_or_foreign_entry_is_searched_again_and_rewritten(
        cache: Path, monkeypatch: pytest.MonkeyPatch, content: str) -> None:
    args = (2.0, DELTA, 0.02, 500, "rdp")
    value = calibration.noise_multiplier(*args)
    [entry] = cache.iterdir()
    entry.write_text(content)
    calibration.noise_multiplier.cache_clear()
    calls = searches(monkeypatch)
    assert calibration.noise_multiplier(*args) == value
    assert len(calls) == 1
    assert json.loads(entry.read_text())["noise_multiplier"] == value


def test_an_unwritable_cache_warns_once_and_still_calibrates(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("SMALLFED_CACHE_DIR", str(blocker))
    monkeypatch.setattr(disk_cache, "_warned", set())
    warnings: list[tuple] = []
    monkeypatch.setattr(disk_cache, "log", lambda *args: warnings.append(args))
    calibration.noise_multiplier.cache_clear()
    try:
        noises = [calibration.noise_multiplier(2.0, DELTA, 0.02, steps, "rdp")
                  for steps in (400, 500)]
    finally:
        calibration.noise_multiplier.cache_clear()
    assert noises[0] < noises[1]
    assert len(warnings) == 1 and "SMALLFED_CACHE_DIR" in warnings[0][1]


def test_each_key_has_its_own_file_and_a_new_opacus_its_own_keys(
        cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = searches(monkeypatch)
    for target in (2.0, 2.0000000000000004):  # exact reprs: a float apart is a new key
        calibration.noise_multiplier(target, DELTA, 0.02, 500, "rdp")
    calibration.noise_multiplier(2.0, DELTA, 0.02, 400, "rdp")
    calibration.noise_multiplier.cache_clear()
    monkeypatch.setattr(calibration.metadata, "version", lambda name: "99.0")
    calibration.noise_multiplier(2.0, DELTA, 0.02, 400, "rdp")
    assert len(calls) == 4
    files = sorted(p.name for p in cache.iterdir())  # and no temporary files left
    assert len(files) == 4 and all(len(name) == 64 + len(".json") for name in files)


def test_an_unreachable_target_is_a_value_error_naming_it(cache: Path) -> None:
    """PRV's epsilon never goes below its 0.01 error margin."""
    with pytest.raises(ValueError, match="target epsilon 0.005 cannot be reached"):
        calibration.noise_multiplier(0.005, DELTA, 0.1, 30, "prv")


def test_an_unreachable_target_stops_the_run_before_it_starts(cache: Path) -> None:
    cfg = Config(privacy="user", dp_target_epsilon=0.005, num_clients=10,
                 clients_per_round=2, num_server_rounds=3)
    with pytest.raises(ConfigError, match="dp-target-epsilon: 0.005 cannot be reached"):
        check_privacy_config(cfg, None)  # type: ignore[arg-type]  # user-level: no data


def test_both_levels_of_dp_calibrate_through_the_cache(
        cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []
    monkeypatch.setattr(calibration, "search",
                        lambda *args: calls.append(args) or (0.75, args[0]))
    sample = Config(privacy="sample", dp_target_epsilon=4.0, dp_accountant="rdp",
                    num_server_rounds=3, batch_size=16)
    user = sample.replace(privacy="user", num_clients=10, clients_per_round=2)
    assert noise_for(sample, 100) == user_noise(user) == 0.75
    assert calls == [
        (4.0, sample.dp_delta, sample_rate(sample, 100),
         planned_rounds(sample) * steps_per_round(sample, 100), "rdp"),
        (4.0, user.dp_delta, 0.2, 3, "rdp")]
