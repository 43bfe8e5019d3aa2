"""Quantization-aware training: int8 rounding in the forward pass, float weights kept."""

from __future__ import annotations

import pytest
import torch

from smallfed.compact.pruning import magnitude_masks, masked_training
from smallfed.compact.qat import fake_quantized, is_qat_round
from smallfed.config import Config, ConfigError
from smallfed.data import federated_data
from smallfed.models import build_model
from smallfed.training import client_generator, train


def test_weights_are_seen_through_per_channel_int8_rounding() -> None:
    model = build_model("cnn-tiny", (1, 8, 8), 10, 0)
    with fake_quantized(model):
        for layer in (model[0], model[9]):
            seen = layer.weight.detach().reshape(layer.weight.shape[0], -1)
            raw = layer.parametrizations.weight.original.detach().reshape(seen.shape)
            scale = raw.abs().amax(dim=1, keepdim=True) / 127
            torch.testing.assert_close(seen, torch.round(raw / scale) * scale)
            assert max(len(row.unique()) for row in seen) <= 255
    assert set(model.state_dict()) == set(build_model("cnn-tiny", (1, 8, 8), 10, 0).state_dict())


def test_qat_training_changes_the_float_weights_and_respects_masks() -> None:
    cfg = Config(batch_size=32, local_epochs=1)
    x, y = federated_data(cfg.replace(num_clients=4, clients_per_round=4)).client(0)
    model = build_model("cnn-tiny", (1, 8, 8), 10, 0)
    masks = magnitude_masks(model, 0.6, structured=False)
    before = model[9].weight.detach().clone()
    with masked_training(model, masks), fake_quantized(model):
        train(model, x, y, cfg, client_generator(0, 1, 0))
    after = model[9].weight.detach()
    assert type(model[9].weight) is torch.nn.Parameter  # a plain layer again
    assert not torch.equal(after, before)
    # Float weights, not int8 grid points: the rounding was only in the forward pass.
    scale = after.abs().amax(dim=1, keepdim=True) / 127
    assert not torch.allclose(after, torch.round(after / scale) * scale)
    assert (after[~torch.from_numpy(masks["9.weight"])] == 0).all()


def test_qat_rounds_are_the_last_ones_and_refused_under_dp_sgd() -> None:
    cfg = Config(num_server_rounds=10, qat_rounds=3)
    assert [r for r in range(1, 11) if is_qat_round(cfg, r)] == [8, 9, 10]
    assert not is_qat_round(cfg.replace(qat_rounds=0), 10)
    with pytest.raises(ConfigError, match="qat-rounds: quantization-aware training cannot run"):
        Config(qat_rounds=2, privacy="sample")
    with pytest.raises(ConfigError, match="qat-rounds: 20 is more than"):
        Config(num_server_rounds=10, qat_rounds=20)
