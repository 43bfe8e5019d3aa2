"""Every bad configuration value fails before any work, with a message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from smallfed.config import Config, ConfigError, describe_keys, parse_override
from smallfed.data import check_data_config


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"alpha": 0}, "alpha: 0.0 is not allowed; it must be > 0"),
        ({"alpha": -1.5}, "alpha"),
        ({"num-server-rounds": 0}, "num-server-rounds: 0 is not allowed; it must be >= 1"),
        ({"num-clients": 0}, "num-clients"),
        ({"lr": 0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"test-fraction": 1.0}, "test-fraction"),
        ({"fraction-evaluate": 1.5}, "fraction-evaluate"),
        ({"partitioner": "random"}, "partitioner: 'random' is not one of"),
        ({"strategy": "fedsgd"}, "strategy: 'fedsgd' is not known; use one of fedavg"),
        ({"backend": "dask"}, "backend"),
        ({"clients-per-round": 30, "num-clients": 20}, "clients-per-round: 30 is more than"),
        ({"dataset": "mnist"}, "data-dir: dataset 'mnist' needs"),
        ({"dataset": "cifar"}, "dataset: 'cifar' is not known"),
        ({"min-replies": 11}, "min-replies: 11 is more than clients-per-round"),
        ({"codec": "quantize:4,topk:0.1"}, "codec: quantize:4 comes before topk:0.1"),
        ({"codec-down": "zip"}, "codec-down: codec stage 'zip' is not known"),
        ({"codec-down": "topk:0.1"}, "codec-down: 'topk:0.1' would sparsify or sign the model"),
        ({"seed": -1}, "seed: -1 is not allowed"),
    ],
)
def test_impossible_values_are_rejected(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        Config.from_mapping(values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"num-server-rounds": "five"}, "num-server-rounds: expected an integer, got 'five'"),
        ({"num-server-rounds": 2.5}, "num-server-rounds: expected an integer"),
        ({"num-clients": True}, "num-clients: expected an integer"),
        ({"lr": "fast"}, "lr: expected a number"),
        ({"model": 3}, "model: expected a string"),
    ],
)
def test_wrong_types_are_rejected(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.from_mapping(values)


def test_unknown_key_suggests_the_nearest() -> None:
    with pytest.raises(ConfigError, match="num-server-round: unknown key; did you mean 'num-server-rounds'"):
        Config.from_mapping({"num-server-round": 3})


def test_integers_are_accepted_for_numbers() -> None:
    assert Config.from_mapping({"lr": 1}).lr == 1.0


def test_overrides_are_read_as_toml_values() -> None:
    assert parse_override("num-server-rounds=3") == ("num-server-rounds", 3)
    assert parse_override("lr=0.1") == ("lr", 0.1)
    assert parse_override("model=mlp") == ("model", "mlp")
    assert parse_override("model='cnn-seed'") == ("model", "cnn-seed")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("num-server-rounds")


def test_toml_files(tmp_path: Path) -> None:
    good = tmp_path / "run.toml"
    good.write_text('num-server-rounds = 3\nmodel = "mlp"\n')
    cfg = Config.from_toml(good, {"num-server-rounds": 4})
    assert (cfg.num_server_rounds, cfg.model) == (4, "mlp")
    with pytest.raises(ConfigError, match="does not exist"):
        Config.from_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("num-server-rounds = = 3\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        Config.from_toml(bad)


def test_round_trip_through_flower_run_config() -> None:
    cfg = Config(num_server_rounds=3, model="mlp", alpha=0.1)
    assert Config.from_mapping(cfg.to_dict()) == cfg


def test_every_key_is_documented() -> None:
    rows = describe_keys()
    assert {key for key, _, _ in rows} == set(Config().to_dict())
    assert all(doc.strip() for _, _, doc in rows)


def test_more_clients_than_samples_fails_before_work() -> None:
    with pytest.raises(ConfigError, match="num-clients: 5000 is more than the 1438 training samples"):
        check_data_config(Config(num_clients=5000, clients_per_round=10))


def test_missing_data_folder_fails_before_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data-dir: .* is not a folder"):
        check_data_config(Config(dataset="mnist", data_dir=str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match="has no t10k-images-idx3-ubyte"):
        check_data_config(Config(dataset="mnist", data_dir=str(tmp_path)))


def test_unsplittable_partition_fails_before_work() -> None:
    cfg = Config(num_clients=200, clients_per_round=10, alpha=0.01, min_partition_size=10)
    with pytest.raises(ConfigError, match="partitioner: dirichlet cannot split"):
        check_data_config(cfg)
