"""DP-friendly models: the fixed scattering front end (kymatio's numbers, no bytes on the
wire, ONNX), scatter-linear, scatter-cnn and cnn-tiny-tanh under Opacus."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from smallfed.cli import main
from smallfed.compact.export import run_onnx, to_onnx
from smallfed.config import Config
from smallfed.data import federated_data
from smallfed.models import build_model, macs, model_report
from smallfed.models.scatter import Scattering2D, filter_bank, scattering_scales
from smallfed.privacy.local_dp import check_private_model, train_private
from smallfed.simulation import simulate

DP_MODELS = ("scatter-linear", "scatter-cnn", "cnn-tiny-tanh")
SHAPES = ((1, 8, 8), (1, 28, 28))
# Trainable parameters, counted by hand in the models' docstrings.
PARAMS = {
    ("scatter-linear", 28): 2 * 81 + 81 * 7 * 7 * 10 + 10,  # 39,862
    ("scatter-linear", 8): 2 * 9 + 9 * 4 * 4 * 10 + 10,  # 1,468
    ("scatter-cnn", 28): 2 * 81 + 81 * 9 * 32 + 32 + 32 * 3 * 3 * 10 + 10,  # 26,412
    ("scatter-cnn", 8): 2 * 9 + 9 * 9 * 32 + 32 + 32 * 2 * 2 * 10 + 10,  # 3,932
}


def digit_images(size: int) -> torch.Tensor:
    """scikit-learn's digits in [0, 1], resized to ``size`` (MNIST-like strokes)."""
    images = torch.tensor(load_digits().images[:16], dtype=torch.float32)[:, None] / 16
    return F.interpolate(images, size=(size, size), mode="bilinear") if size != 8 else images


@pytest.mark.parametrize("name", DP_MODELS)
@pytest.mark.parametrize("shape", SHAPES)
def test_state_dict_holds_only_trainable_tensors(name: str, shape: tuple) -> None:
    """Every state_dict tensor crosses the network each round: the filters must not."""
    model = build_model(name, shape, 10, seed=0)
    state = model.state_dict()
    assert set(state) == {k for k, p in model.named_parameters() if p.requires_grad}
    assert sum(v.numel() for v in state.values()) == model_report(model).params
    # A model rebuilt from the state alone (as a client does) computes the same.
    twin = build_model(name, shape, 10, seed=1)
    twin.load_state_dict(state, strict=True)
    x = torch.randn(4, *shape)
    torch.testing.assert_close(twin.eval()(x), model.eval()(x))


def test_scattering_adds_no_parameters_and_no_state() -> None:
    front = Scattering2D((1, 28, 28))
    assert list(front.parameters()) == [] and front.state_dict() == {}
    assert len(list(front.buffers())) > 0  # the filters live in non-persistent buffers
    from smallfed.flower.records import model_to_record, record_arrays

    model = build_model("scatter-linear", (1, 28, 28), 10, 0)
    arrays = record_arrays(model_to_record(model))  # what a client sends
    assert sum(a.nbytes for a in arrays.values()) == model_report(model).fp32_bytes


@pytest.mark.parametrize(("name", "size"), sorted(PARAMS))
def test_parameter_counts(name: str, size: int) -> None:
    model = build_model(name, (1, size, size), 10, 0)
    assert model_report(model).params == PARAMS[name, size]


def test_cnn_tiny_tanh_is_cnn_tiny_with_tanh() -> None:
    tiny = build_model("cnn-tiny", (1, 28, 28), 10, 0)
    tanh = build_model("cnn-tiny-tanh", (1, 28, 28), 10, 0)
    assert [type(m) for m in tanh] == [nn.Tanh if isinstance(m, nn.ReLU) else type(m)
                                       for m in tiny]
    assert model_report(tanh) == model_report(tiny)
    assert macs(tanh, (1, 28, 28)) == macs(tiny, (1, 28, 28)) == 1_117_056


def test_macs_count_the_fixed_convolutions() -> None:
    """The hooks see no Conv2d in the scattering; its ``fixed_macs`` must equal what
    torch's own FLOP counter sees its conv2d calls do."""
    for shape in SHAPES:
        front = Scattering2D(shape)
        with FlopCounterMode(display=False) as counter:
            front(torch.zeros(1, *shape))
        assert counter.get_total_flops() == 2 * front.fixed_macs
    front = Scattering2D((1, 28, 28))
    assert front.fixed_macs == 58_901_337
    linear = build_model("scatter-linear", (1, 28, 28), 10, 0)
    assert macs(linear, (1, 28, 28)) == front.fixed_macs + 81 * 49 * 10
    cnn = build_model("scatter-cnn", (1, 28, 28), 10, 0)
    assert macs(cnn, (1, 28, 28)) == front.fixed_macs + 49 * 81 * 9 * 32 + 288 * 10


def test_scales_follow_the_input_size() -> None:
    assert scattering_scales(28, 28) == 2 and scattering_scales(8, 8) == 1
    assert Scattering2D((1, 28, 28))(torch.zeros(2, 1, 28, 28)).shape == (2, 81, 7, 7)
    assert Scattering2D((1, 8, 8))(torch.zeros(2, 1, 8, 8)).shape == (2, 9, 4, 4)
    assert Scattering2D((3, 16, 16))(torch.zeros(2, 3, 16, 16)).shape == (2, 243, 4, 4)


def test_input_gradients_stay_finite() -> None:
    """Gradient-inversion attacks differentiate through the model to the pixels; the
    modulus of an all-zero response must not give NaN."""
    model = build_model("scatter-cnn", (1, 28, 28), 10, 0)
    x = torch.zeros(2, 1, 28, 28, requires_grad=True)
    model(x).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", DP_MODELS)
@pytest.mark.parametrize("shape", SHAPES)
def test_opacus_validates(name: str, shape: tuple) -> None:
    from opacus.validators import ModuleValidator

    model = build_model(name, shape, 10, 0)
    assert ModuleValidator.validate(model, strict=False) == []
    check_private_model(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name", DP_MODELS)
def test_one_dp_sgd_round_on_digits(name: str) -> None:
    cfg = Config(privacy="sample", dp_accountant="rdp", dp_reproducible=True, num_clients=2,
                 clients_per_round=2, partitioner="iid", batch_size=64, local_epochs=2,
                 lr=0.5, seed=3, model=name, dp_noise=0.5)
    x, y = federated_data(cfg).client(0)
    model = build_model(name, (1, 8, 8), 10, cfg.seed)
    front = model[0] if isinstance(model[0], Scattering2D) else None
    filters = [b.clone() for b in front.buffers()] if front is not None else []
    with torch.no_grad():
        before = F.cross_entropy(model(x), y).item()
    outcome = train_private(model, x, y, cfg, seed=0, history=[])
    assert outcome.result is not None and 0 < outcome.epsilon < math.inf
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with torch.no_grad():
        after = F.cross_entropy(model(x), y).item()
    assert after < 0.5 * before  # measured: 2.3-2.4 -> 0.2-0.6
    if front is not None:  # the fixed transform stayed fixed
        assert all(torch.equal(a, b) for a, b in zip(filters, front.buffers(), strict=True))


@pytest.mark.parametrize(("name", "shape"), [("scatter-linear", (1, 28, 28)),
                                             ("scatter-cnn", (1, 8, 8))])
def test_onnx_round_trip(name: str, shape: tuple, tmp_path: Path) -> None:
    model = build_model(name, shape, 10, 0).eval()
    path = tmp_path / "model.onnx"
    to_onnx(model, shape, path)
    pixels = digit_images(shape[1]).numpy()
    with torch.no_grad():
        expected = model(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(run_onnx(path, pixels), expected, atol=1e-4, rtol=0)


def test_smallfed_export_of_a_scatter_linear_run(tmp_path: Path) -> None:
    run = Config(num_server_rounds=2, num_clients=2, clients_per_round=2, seed=5,
                 local_epochs=1, batch_size=16, model="scatter-linear", lr=0.2)
    simulate(run, tmp_path / "run", progress=False)
    out = tmp_path / "model.onnx"
    assert main(["export", "--run", str(tmp_path / "run"), "--format", "onnx",
                 "--output", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["prediction_agreement"] == 1.0 and report["max_logit_difference"] < 1e-4
    assert report["params"] == PARAMS["scatter-linear", 8]
    assert report["macs"] == Scattering2D((1, 8, 8)).fixed_macs + 9 * 16 * 10


# --- the scattering against kymatio -------------------------------------------------------

def kymatio_scattering(J: int, size: int):
    """kymatio's torch Scattering2D. ``kymatio.torch`` itself fails to import with scipy
    >= 1.15 (its 3D module wants scipy.special.sph_harm), so the 2D frontend directly."""
    pytest.importorskip("kymatio")
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    return ScatteringTorch2D(J=J, shape=(size, size), L=8)


@pytest.mark.parametrize("size", [28, 8])
def test_filter_bank_is_kymatios(size: int) -> None:
    pytest.importorskip("kymatio")
    from kymatio.scattering2d.filter_bank import filter_bank as kymatio_bank

    J = scattering_scales(size, size)
    grid = {28: 36, 8: 12}[size]
    theirs, ours = kymatio_bank(grid, grid, J, 8), filter_bank(grid, grid, J, 8)
    for res in range(J):
        np.testing.assert_allclose(ours["phi"][res], theirs["phi"]["levels"][res], atol=1e-6)
    for n, psi in enumerate(theirs["psi"]):
        assert len(psi["levels"]) == len(ours["psi"][psi["j"]][psi["theta"]])
        for res, level in enumerate(psi["levels"]):
            np.testing.assert_allclose(ours["psi"][n // 8][n % 8][res], level, atol=1e-6)


@pytest.mark.parametrize("size", [28, 8])
def test_scattering_matches_kymatio(size: int) -> None:
    J = scattering_scales(size, size)
    reference = kymatio_scattering(J, size)
    strokes = digit_images(size)
    noise = torch.rand(4, 1, size, size, generator=torch.Generator().manual_seed(0))
    normalised = (strokes[:4] - 0.13) / 0.31  # as the datasets feed the models
    x = torch.cat([strokes, noise, normalised])
    ours = Scattering2D((1, size, size))(x)
    theirs = reference(x).reshape(ours.shape)
    relative = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert relative < 1e-5, relative
    exact = Scattering2D((1, size, size), tail=0)(x)  # whole-grid kernels
    assert ((exact - theirs).abs().max() / theirs.abs().max()).item() < 3e-6
