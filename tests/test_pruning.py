"""Federated pruning: masks from the server, zeros that stay zero, fewer bytes up."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from smallfed.config import Config, ConfigError
from smallfed.data import federated_data
from smallfed.flower.checkpoint import load
from smallfed.compact.pruning import (
    compact,
    expand,
    magnitude_masks,
    masked_training,
    pack_masks,
    prunable,
    sparsity_at,
    unpack_masks,
)
from smallfed.models import build_model
from smallfed.privacy.local_dp import train_private
from smallfed.report.results import RoundRecord
from smallfed.simulation import simulate
from smallfed.training import client_generator, train

SMALL = Config(num_server_rounds=4, num_clients=4, clients_per_round=4, seed=3,
               local_epochs=1, batch_size=32, prune="unstructured", prune_sparsity=0.8,
               prune_end_round=3)


def prunable_zeros(arrays: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    return {k: arrays[k] == 0 for k in names}


def test_cubic_schedule_grows_to_the_target_and_stays() -> None:
    cfg = Config(num_server_rounds=10, prune="unstructured", prune_sparsity=0.5,
                 prune_start_round=2, prune_end_round=6)
    values = [sparsity_at(cfg, r) for r in range(1, 11)]
    assert values[:2] == [0.0, 0.0]
    assert values[2] == pytest.approx(0.5 * (1 - 0.75 ** 3))
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[5:] == [0.5] * 5
    assert sparsity_at(cfg.replace(prune="none"), 8) == 0.0


def test_bad_schedule_fails_before_the_run() -> None:
    with pytest.raises(ConfigError, match="prune-end-round: 20 must lie between"):
        Config(num_server_rounds=10, prune="unstructured", prune_end_round=20)


def test_pruned_weights_stay_zero_and_updates_shrink(tmp_path: Path) -> None:
    names = [n for n, _ in prunable(build_model("cnn-tiny", (1, 8, 8), 10, 0))]
    zeros: list[dict[str, np.ndarray]] = []

    def after_round(record: RoundRecord, _: int) -> None:
        zeros.append(prunable_zeros(load(tmp_path).global_arrays, names))

    results = simulate(SMALL, tmp_path, progress=False, on_round=after_round)
    for before, after in zip(zeros, zeros[1:]):  # a pruned weight is never revived
        assert all((after[k] | ~before[k]).all() for k in names)
    total = sum(z.size for z in zeros[-1].values())
    assert sum(int(z.sum()) for z in zeros[-1].values()) / total == pytest.approx(0.8, abs=0.01)
    rounds = results["rounds"]
    dense_up = rounds[1]["bytes_up"]  # round 1 is not pruned yet (cubic schedule)
    share_kept = 1 - 0.8 * total / results["summary"]["model_params"]
    assert rounds[4]["bytes_up"] < dense_up * (share_kept + 0.02)
    assert rounds[4]["accuracy"] > 0.5  # the pruned model still learns


def test_structured_masks_remove_whole_channels_but_never_classes() -> None:
    model = build_model("cnn-tiny", (1, 28, 28), 10, 0)
    masks = magnitude_masks(model, 0.5, structured=True)
    # conv 0 + GroupNorm 1 (4 groups of 4), conv 4 + GroupNorm 5 (8 of 4), linear 9, and
    # the classifier 11, which keeps its rows but loses the inputs of pruned units.
    assert set(masks) == {f"{i}.{p}" for i in (0, 1, 4, 5, 9) for p in ("weight", "bias")} | {
        "11.weight"}
    previous = None
    for layer, norm, group in (("0", "1", 4), ("4", "5", 4), ("9", None, 1), ("11", None, 1)):
        mask = masks[f"{layer}.weight"]
        rows = mask.reshape(mask.shape[0], mask.shape[1], -1).any(axis=2)  # (out, in)
        kept = rows.any(axis=1)
        assert (rows[~kept] == 0).all() and (rows[kept] == rows[kept][0]).all()
        assert (kept.reshape(-1, group) == kept.reshape(-1, group)[:, :1]).all()  # whole groups
        assert kept.mean() == (1.0 if layer == "11" else 0.5)
        if previous is not None:  # inputs from pruned channels (or their H x W blocks) go
            per_input = rows.shape[1] // len(previous)
            assert (rows[kept][0] == np.repeat(previous, per_input)).all()
        if layer != "11":
            assert (masks[f"{layer}.bias"] == kept).all()
        if norm:
            assert (masks[f"{norm}.weight"] == kept).all() and (masks[f"{norm}.bias"] == kept).all()
        previous = kept


@pytest.mark.parametrize("private", [False, True])
def test_clients_train_with_masked_weights_that_stay_zero(private: bool) -> None:
    cfg = Config(batch_size=32, local_epochs=1, dp_noise=1.0, dp_accountant="rdp")
    x, y = federated_data(cfg.replace(num_clients=4, clients_per_round=4)).client(0)
    model = build_model("cnn-tiny", (1, 8, 8), 10, 0)
    masks = magnitude_masks(model, 0.7, structured=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen_live = []  # every forward pass during training must see the pruned weights zero

    def check(module: torch.nn.Module, _inputs: object, _output: object) -> None:
        seen_live.append(bool(module.weight.detach()[~torch.from_numpy(masks["9.weight"])].any()))

    handle = model[9].register_forward_hook(check)
    with masked_training(model, masks):
        if private:  # Opacus's per-sample gradients work with the in-place masks
            train_private(model, x, y, cfg, 0, [], masks)
        else:
            train(model, x, y, cfg, client_generator(0, 1, 0))
    handle.remove()
    assert len(seen_live) > 1 and not any(seen_live)
    state = model.state_dict()
    for name, mask in masks.items():
        assert (state[name].numpy()[~mask] == 0).all()
        assert not torch.equal(state[name], before[name])  # the kept weights trained


def test_masks_round_trip_and_compacted_updates_expand_exactly() -> None:
    rng = np.random.default_rng(0)
    template = {"w": (3, 5), "b": (3,)}
    masks = {"w": rng.random((3, 5)) < 0.4}
    assert (unpack_masks(pack_masks(masks), template)["w"] == masks["w"]).all()
    update = {"w": rng.normal(size=(3, 5)).astype(np.float32), "b": np.ones(3, np.float32)}
    small = compact(update, masks)
    assert small["w"].shape == (int(masks["w"].sum()),)
    back = expand(small, masks, template)
    np.testing.assert_array_equal(back["w"], np.where(masks["w"], update["w"], 0))
    with pytest.raises(ValueError, match="expected 2"):
        unpack_masks({"w": np.zeros(5, np.uint8)}, template)
    with pytest.raises(ValueError, match="does not have"):
        unpack_masks({"x": np.zeros(2, np.uint8)}, template)


def test_structured_pruning_refuses_models_it_cannot_follow() -> None:
    from smallfed.compact.pruning import ServerPruning

    model = build_model("cnn-shared", (1, 8, 8), 10, 0)  # one block used three times
    with pytest.raises(ConfigError, match="prune: structured pruning follows channels"):
        ServerPruning(Config(model="cnn-shared", prune="structured"), model)
    ServerPruning(Config(model="cnn-shared", prune="unstructured"), model)  # fine
