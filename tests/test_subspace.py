"""The shared random subspace: same positions for every client, DP in the subspace only."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from smallfed.config import Config
from smallfed.data import federated_data
from smallfed.models import build_model
from smallfed.privacy.local_dp import train_private
from smallfed.privacy.subspace import combine, round_subspace, subspace_config, subspace_masks
from smallfed.privacy.user_dp import GaussianAverage, l2_norm
from smallfed.simulation import simulate

TEMPLATE = {"a.weight": (16, 1, 3, 3), "a.bias": (16,), "b.weight": (10, 64)}


def test_every_client_of_a_round_gets_the_same_positions_and_rounds_differ() -> None:
    one = round_subspace(subspace_config(0.1, seed=3, server_round=2), TEMPLATE)
    two = round_subspace(subspace_config(0.1, seed=3, server_round=2), TEMPLATE)
    later = round_subspace(subspace_config(0.1, seed=3, server_round=3), TEMPLATE)
    assert all(np.array_equal(one[k], two[k]) for k in TEMPLATE)
    assert not all(np.array_equal(one[k], later[k]) for k in TEMPLATE)
    for name, shape in TEMPLATE.items():
        assert one[name].shape == shape
        assert one[name].sum() == max(1, math.ceil(0.1 * math.prod(shape)))
    assert round_subspace({}, TEMPLATE) == {}


def test_pruned_and_subspace_coordinates_combine() -> None:
    sub = subspace_masks(0.5, 1, {"w": (8,)})
    pruned = {"w": np.arange(8) % 2 == 0}
    assert np.array_equal(combine(pruned, sub)["w"], sub["w"] & pruned["w"])
    assert combine(pruned, {}) is pruned


def test_dp_sgd_moves_the_model_only_inside_the_subspace_at_the_same_epsilon() -> None:
    cfg = Config(privacy="sample", dp_noise=1.0, dp_accountant="rdp", num_clients=4,
                 clients_per_round=4, batch_size=16, lr=0.5)
    x, y = federated_data(cfg).client(0)
    model = build_model(cfg.model, (1, 8, 8), 10, 0)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    template = {k: tuple(v.shape) for k, v in before.items()}
    sub = subspace_masks(0.05, 9, template)
    outcome = train_private(model, x, y, cfg, 1, [], subspace=sub)
    plain = train_private(build_model(cfg.model, (1, 8, 8), 10, 0), x, y, cfg, 1, [])
    assert outcome.epsilon == plain.epsilon  # the accountant's inputs are unchanged
    for name, value in model.state_dict().items():
        moved = (value - before[name]).numpy() != 0
        assert not moved[~sub[name]].any(), name  # nothing outside the subspace
        assert moved[sub[name]].mean() > 0.9, name  # noise lands on the subspace


def test_user_level_noise_lives_in_the_subspace_with_the_same_std() -> None:
    template = {"w": np.zeros(200_000, np.float32)}
    support = subspace_masks(0.25, 4, {"w": (200_000,)})
    rng = np.random.default_rng(0)
    updates = [{"w": np.where(support["w"], rng.normal(0, 5, 200_000), 0).astype(np.float32)}
               for _ in range(3)]
    mechanism = GaussianAverage(clip=0.5, noise_multiplier=1.2, expected_clients=10)
    clipped_sum = sum(u["w"] * min(1.0, 0.5 / l2_norm(u)) for u in updates)
    average = mechanism(updates, template, np.random.default_rng(1), support)["w"]
    noise = average * 10 - clipped_sum
    assert np.all(average[~support["w"]] == 0)
    inside = noise[support["w"]]
    assert inside.std() == pytest.approx(1.2 * 0.5, rel=0.02)
    assert all(l2_norm({"w": u["w"] * min(1.0, 0.5 / l2_norm(u))}) <= 0.5 + 1e-6
               for u in updates)


@pytest.mark.parametrize("privacy", ["sample", "user"])
def test_a_subspace_run_sends_the_fraction_and_keeps_its_epsilon(tmp_path: Path,
                                                                 privacy: str) -> None:
    common = dict(num_server_rounds=2, local_epochs=1, seed=5, privacy=privacy, dp_noise=1.0,
                  dp_accountant="rdp")
    shape = (dict(num_clients=4, clients_per_round=4, batch_size=30) if privacy == "sample"
             else dict(num_clients=40, clients_per_round=10, dp_clip=0.5))
    dense = simulate(Config(**common, **shape), tmp_path / "dense", progress=False)
    sub = simulate(Config(**common, **shape, subspace=0.1), tmp_path / "sub", progress=False)
    ratio = sub["summary"]["compression_ratio_up"]
    assert 9.5 < ratio < 10.5  # ~10% of each tensor's values, no positions
    assert sub["summary"]["epsilon"] == pytest.approx(dense["summary"]["epsilon"], rel=1e-12)
    assert all(math.isfinite(r["loss"]) for r in sub["rounds"])


def test_top_k_under_dp_sgd_is_warned_about_with_the_subspace_suggested() -> None:
    from smallfed.privacy import codec_advice

    advice = codec_advice(Config(privacy="sample", codec="topk:0.01,quantize:4,error_feedback"))
    assert "top-k of a DP-SGD update keeps mostly noise" in advice and "subspace" in advice
    assert codec_advice(Config(privacy="sample", codec="randk:0.1")) == ""
    assert codec_advice(Config(privacy="user", codec="topk:0.01")) == ""  # clipped after


def test_error_feedback_carries_what_the_subspace_left_out(tmp_path: Path) -> None:
    """Without privacy, subspace is random-k on a shared index set; with error feedback
    the coordinates left out of one round's subspace are sent in a later one."""
    accuracy = {}
    for codec in ("quantize:8", "quantize:8,error_feedback"):
        cfg = Config(num_server_rounds=3, local_epochs=1, seed=5, subspace=0.1, codec=codec,
                     num_clients=4, clients_per_round=4)
        accuracy[codec] = simulate(cfg, tmp_path / codec, progress=False)["summary"][
            "final_accuracy"]
    assert accuracy["quantize:8,error_feedback"] > accuracy["quantize:8"] + 0.1
