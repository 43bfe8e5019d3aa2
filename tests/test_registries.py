"""A researcher's own codec stage, dataset and device profile, each defined in one module
(this one, outside the package), registered, and used by name like the built-in ones."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from smallfed.codec import (
    STAGES,
    CodecError,
    PayloadError,
    Stage,
    TensorCode,
    check_downlink,
    parse_codec,
    register_stage,
)
from smallfed.codec.wire import pack
from smallfed.config import Config
from smallfed.data import DATASETS, Dataset, load_dataset, register_dataset
from smallfed.devices import PROFILES, DeviceProfile, profile_of, register


# --- the researcher's module: a codec stage, a dataset, a device profile ---------------
@register_stage("halve")
class Halve(Stage):
    """Halves every value on the way out, doubles it on the way back: exact in float32."""

    lossy, downlink = False, True

    def encode(self, codes, rng, seed):  # type: ignore[no-untyped-def]
        return [replace(c, values=c.values * np.float32(0.5)) for c in codes]

    def decode(self, codes, seed):  # type: ignore[no-untyped-def]
        return [replace(c, values=c.values * np.float32(2)) for c in codes]


@register_stage("clip")
class Clip(Stage):
    """Clips every value to [-limit, limit]: an argument, lossy, for deltas only."""

    usage = "clip:L"

    def __init__(self, limit: float) -> None:
        if not limit > 0:
            raise ValueError(f"clip: limit {limit} must be > 0")
        self.limit = limit

    @classmethod
    def from_args(cls, args: list[str]) -> Clip:
        if len(args) != 1:
            raise ValueError(f"write it as {cls.usage}")
        return cls(float(args[0]))

    @property
    def spec(self) -> str:
        return f"clip:{self.limit:g}"

    def encode(self, codes, rng, seed):  # type: ignore[no-untyped-def]
        return [replace(c, values=np.clip(c.values, -self.limit, self.limit)) for c in codes]


@register_dataset("wine")
def wine(cfg: Config) -> Dataset:
    """scikit-learn's wine: 178 samples of 13 features, 3 classes, standardised."""
    from sklearn.datasets import load_wine

    x, y = load_wine(return_X_y=True)
    order = np.random.default_rng(cfg.seed).permutation(len(y))
    n_test = round(len(y) * cfg.test_fraction)
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(axis=0), x[train].std(axis=0)
    x = torch.from_numpy((x - mean) / std).float()
    y = torch.from_numpy(y).long()
    return Dataset("wine", x[train], y[train], x[test], y[test], num_classes=3)


def wine_default() -> Dataset:
    """The same data as package.module:function (no arguments), which Config accepts today."""
    return wine(Config())


JETSON = register(DeviceProfile("jetson-nano", train_flops=20e9, uplink_bps=20e6,
                                downlink_bps=50e6, latency_s=0.02, availability=0.9,
                                memory_bytes=1 << 30))


# --- codec stage -------------------------------------------------------------------
rng = np.random.default_rng(0)
UPDATE = {"w": rng.normal(size=(20, 30)).astype(np.float32),
          "b": rng.normal(size=(30,)).astype(np.float32)}
TEMPLATE = {k: v.shape for k, v in UPDATE.items()}


def test_own_stage_round_trips_through_the_wire_format() -> None:
    codec = parse_codec("halve,zlib")
    assert isinstance(codec.stages[0], Halve) and codec.spec == "halve,zlib:6"
    payload, _ = codec.encode(UPDATE, seed=1)
    assert payload[:3] == b"SFU"
    decoded = codec.decode(payload, TEMPLATE)
    assert all(np.array_equal(decoded[k], UPDATE[k]) for k in UPDATE)


def test_own_stage_with_arguments_in_a_chain_with_error_feedback() -> None:
    codec = parse_codec("clip:0.5,topk:0.1,quantize:8,error_feedback")
    assert codec.spec == "clip:0.5,topk:0.1,quantize:8,error_feedback"
    payload, residual = codec.encode(UPDATE, seed=2)
    decoded = codec.decode(payload, TEMPLATE)
    for name, values in decoded.items():
        assert np.abs(values).max() <= 0.5 + 1e-6
        assert (values != 0).sum() <= np.ceil(0.1 * values.size)
        # error feedback keeps what clipping, top-k and quantisation left out
        np.testing.assert_allclose(values + residual[name], UPDATE[name], atol=1e-6)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("clip", "codec stage 'clip': write it as clip:L"),
        ("clip:-1", "codec stage 'clip:-1': clip: limit -1.0 must be > 0"),
        ("halve:2", "codec stage 'halve:2': takes no arguments; write it as halve"),
        ("quantize:4,clip:1", "clip:1 comes after quantize:4, which codes the values"),
        ("halve,error_feedback", "error_feedback needs a lossy stage"),
        ("scale", "stages are separated by commas, each one of topk:A[:global]"),
        ("scale", "clip:L"),
    ],
)
def test_own_stage_errors_show_its_form(spec: str, message: str) -> None:
    with pytest.raises(CodecError) as err:
        parse_codec(spec)
    assert message in str(err.value)


def test_downlink_takes_only_stages_that_say_so() -> None:
    check_downlink(parse_codec("halve,fp16,zlib"))
    for spec, bad in [("clip:1,fp16", "'clip:1'"), ("topk:0.1", "'topk:0.1'"),
                      ("sign,error_feedback", "'sign,error_feedback'")]:
        with pytest.raises(CodecError, match=f"^{bad} would sparsify or sign the model itself"):
            check_downlink(parse_codec(spec))
    with pytest.raises(CodecError, match="use fp16, bf16, quantize:B.:N., cluster:K, halve or zlib"):
        check_downlink(parse_codec("clip:1"))


def test_a_payload_that_lies_about_its_values_is_refused() -> None:
    codes = [TensorCode(shape=s, values=np.zeros(int(np.prod(s)), np.uint8), kind="q", bits=8,
                        scales=np.zeros(2, np.float32)) for s in TEMPLATE.values()]
    with pytest.raises(PayloadError, match="tensor 0: q values of 8 bits"):
        parse_codec("halve").decode(pack("halve", 0, codes, None), TEMPLATE)


def test_stage_names_and_roles_are_checked_when_registered() -> None:
    for name in ("zlib", "error_feedback", "a:b", "a,b", ""):
        with pytest.raises(ValueError, match="stage name"):
            register_stage(name)
    with pytest.raises(ValueError, match="role 'compress' must be one of"):
        register_stage("odd")(type("Odd", (Stage,), {"role": "compress"}))
    assert "odd" not in STAGES


# --- dataset and device profile ----------------------------------------------------------
def test_registered_dataset_loads_by_name() -> None:
    assert "wine" in DATASETS
    dataset = DATASETS["wine"](Config())
    assert dataset.input_shape == (13,) and dataset.num_classes == 3
    assert torch.equal(load_dataset(Config(dataset="tests.test_registries:wine_default")).test_y,
                       dataset.test_y)


def test_registered_profile_joins_the_device_mix() -> None:
    assert PROFILES["jetson-nano"] is JETSON
    cfg = Config(devices="jetson-nano:0.5,rpi4:0.5", num_clients=20)
    assert {profile_of(cfg, i).name for i in range(20)} == {"jetson-nano", "rpi4"}
    with pytest.raises(ValueError, match="NAME:SHARE"):
        register(replace(JETSON, name="jetson:nano"))


# --- all of it in one federation -----------------------------------------------------------
def test_a_federation_on_own_tabular_data_and_own_codec_stages(tmp_path: Path) -> None:
    from smallfed.simulation import simulate

    cfg = Config(dataset="tests.test_registries:wine_default", model="mlp", num_clients=3,
                 clients_per_round=3, partitioner="iid", num_server_rounds=3, local_epochs=2,
                 batch_size=8, lr=0.05, seed=1, codec="clip:0.5,quantize:8",
                 codec_down="halve,fp16", devices="jetson-nano:1")
    results = simulate(cfg, tmp_path, progress=False)
    rounds = results["rounds"]
    assert len(rounds) == 4 and all(r["bytes_up"] > 0 for r in rounds[1:])
    assert rounds[-1]["accuracy"] > 0.8
