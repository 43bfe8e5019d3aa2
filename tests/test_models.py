"""The model zoo: sizes as documented, seeded init, bring-your-own factories."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from smallfed.config import ConfigError
from smallfed.models import MODELS, build_model, macs, model_report


def test_cnn_seed_matches_the_reference() -> None:
    report = model_report(build_model("cnn-seed", (1, 28, 28), 10, seed=0))
    assert report.params == 693_962
    assert report.fp32_bytes == 2_775_848  # 2.78 MB


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28)])
def test_every_model_classifies_both_datasets(name: str, shape: tuple) -> None:
    model = build_model(name, shape, 10, seed=0)
    assert model(torch.zeros(3, *shape)).shape == (3, 10)


def test_cnn_tiny_is_compact_and_uses_groupnorm() -> None:
    model = build_model("cnn-tiny", (1, 28, 28), 10, seed=0)
    assert model_report(model).params < 110_000
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_init_is_seeded() -> None:
    a = build_model("cnn-tiny", (1, 8, 8), 10, seed=1).state_dict()
    b = build_model("cnn-tiny", (1, 8, 8), 10, seed=1).state_dict()
    c = build_model("cnn-tiny", (1, 8, 8), 10, seed=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def linear_factory(input_shape: tuple, num_classes: int) -> nn.Module:
    """A bring-your-own model used by the test below."""
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), num_classes))


def test_bring_your_own_model() -> None:
    model = build_model("tests.test_models:linear_factory", (1, 8, 8), 10, seed=0)
    assert model_report(model).params == 64 * 10 + 10
    tabular = build_model("tests.test_models:linear_factory", (13,), 3, seed=0)
    assert tabular(torch.zeros(2, 13)).shape == (2, 3)


NOT_A_FUNCTION = 7


def not_a_model(input_shape: tuple, num_classes: int) -> str:
    return "a model"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("resnet-152", "model: 'resnet-152' is not in the zoo (cnn-tiny, cnn-seed, cnn-shared, "
                       "mlp"),
        ("tests.no_such_module:f", "no module 'tests.no_such_module'"),
        ("tests.test_models:nope", "has no 'nope'; it has"),
        ("tests.test_models:NOT_A_FUNCTION", "is not callable (int)"),
        ("tests.test_models:not_a_model", "returned str, not a torch.nn.Module"),
    ],
)
def test_unknown_models_are_config_errors(name: str, message: str) -> None:
    with pytest.raises(ConfigError, match="^model: ") as err:
        build_model(name, (1, 8, 8), 10, seed=0)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_mlp_takes_tabular_features_and_the_cnns_say_they_need_images() -> None:
    model = build_model("mlp", (13,), 3, seed=0)
    assert model(torch.zeros(4, 13)).shape == (4, 3)
    assert macs(model, (13,)) == 13 * 64 + 64 * 3
    for name in ("cnn-tiny", "cnn-seed", "cnn-shared"):
        with pytest.raises(ConfigError, match=f"model: {name} takes images .C, H, W., the "
                                              r"dataset's samples have shape \(13,\); use mlp"):
            build_model(name, (13,), 3, seed=0)


def test_shared_block_model_is_small_and_opacus_gets_its_per_sample_gradients() -> None:
    from opacus import GradSampleModule

    model = build_model("cnn-shared", (1, 28, 28), 10, 0)
    assert sum(p.numel() for p in model.parameters()) == 10_026  # a tenth of cnn-tiny
    small = build_model("cnn-shared", (1, 8, 8), 10, 0)
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 4, 7])
    expected = []
    for i in range(3):  # per-sample gradients the slow, sure way
        small.zero_grad()
        torch.nn.functional.cross_entropy(small(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        expected.append(small.block[0].weight.grad.clone())
    wrapped = GradSampleModule(small, loss_reduction="sum")
    wrapped.zero_grad()
    torch.nn.functional.cross_entropy(wrapped(x), y, reduction="sum").backward()
    # The block is used three times: Opacus must add up its three per-sample gradients.
    torch.testing.assert_close(small.block[0].weight.grad_sample, torch.stack(expected),
                               atol=1e-5, rtol=1e-4)
