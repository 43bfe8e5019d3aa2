"""The Python front door: the researcher's own dataset, model, strategy and codec stage."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg

import smallfed
from smallfed.codec import Stage, TensorCode, register_stage
from smallfed.config import Config, ConfigError
from smallfed.flower.strategies import NO_SAMPLING

ROOT = Path(__file__).resolve().parents[1]


def load_example():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("tabular_example", ROOT / "examples/tabular.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["tabular_example"] = module
    spec.loader.exec_module(module)
    return module


def test_the_readme_example_runs_and_learns(tmp_path: Path) -> None:
    """examples/tabular.py, shown whole in the README: a tabular dataset and an MLP."""
    example = load_example()
    results = example.main(out=str(tmp_path), rounds=4)
    accuracies = [r["accuracy"] for r in results["rounds"]]
    assert accuracies[-1] > 0.85 > accuracies[0]
    assert results["config"]["dataset"] == "tabular_example:breast_cancer"
    assert results["config"]["model"] == "tabular_example:mlp"
    readme = (ROOT / "README.md").read_text()
    code = (ROOT / "examples/tabular.py").read_text()
    body = code[code.index("import numpy"):]
    assert body.strip() in readme, "README's bring-your-own example differs from the file"


class CountingFedAvg(FedAvg):
    """A researcher's strategy: FedAvg that counts the rounds it aggregated."""

    def __init__(self) -> None:
        super().__init__(**NO_SAMPLING)
        self.rounds: list[int] = []
        self.replies: list[int] = []

    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        replies = list(replies)
        self.rounds.append(server_round)
        self.replies.append(len(replies))
        return super().aggregate_train(server_round, replies)


def test_a_strategy_of_ones_own_runs_under_the_layers(tmp_path: Path) -> None:
    mine = CountingFedAvg()
    results = smallfed.simulate(out=tmp_path, strategy=mine, num_server_rounds=2,
                                num_clients=4, clients_per_round=3, local_epochs=1,
                                codec="topk:0.5,fp16")
    assert mine.rounds == [1, 2] and mine.replies == [3, 3]  # decoded models, not payloads
    assert results["config"]["strategy"].endswith("test_api:CountingFedAvg")
    with pytest.raises(ConfigError, match="strategy=<that object>, resume=True"):
        smallfed.simulate(Config.from_mapping(results["config"]), out=tmp_path, resume=True)
    assert results["rounds"][-1]["accuracy"] > results["rounds"][0]["accuracy"]


@register_stage("halve-api")  # a name of its own: test_registries has a "halve" too
class Halve(Stage):
    """A researcher's codec stage: sends every value halved, and doubles it back."""

    lossy = False

    def encode(self, codes, rng, seed):  # type: ignore[no-untyped-def]
        return [TensorCode(c.shape, (c.values * 0.5).astype(np.float32), c.indices, c.seeded)
                for c in codes]

    def decode(self, codes, seed):  # type: ignore[no-untyped-def]
        return [TensorCode(c.shape, (c.values * 2.0).astype(np.float32), c.indices, c.seeded)
                for c in codes]


def test_a_codec_stage_of_ones_own_crosses_the_wire(tmp_path: Path) -> None:
    plain = smallfed.simulate(out=tmp_path / "plain", num_server_rounds=2, num_clients=4,
                              clients_per_round=2, local_epochs=1, codec="fp16")
    halved = smallfed.simulate(out=tmp_path / "halved", num_server_rounds=2, num_clients=4,
                               clients_per_round=2, local_epochs=1, codec="halve-api,fp16")
    # The stage is in the header of every payload; x0.5, x2 and fp16 commute exactly.
    rounds = [(r["accuracy"], r["bytes_up"]) for r in plain["rounds"]]
    other = [(r["accuracy"], r["bytes_up"] - 10 * r["clients"]) for r in halved["rounds"]]
    assert rounds == other  # len("halve-api,") = 10 more header bytes per payload
    with pytest.raises(ConfigError, match="codec-down"):
        smallfed.simulate(out=tmp_path / "down", codec_down="halve-api")


def test_objects_that_ray_cannot_import_are_refused_before_the_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("backend = 'inprocess'")):
        smallfed.simulate(out=tmp_path, model=lambda shape, classes: None, backend="ray")
    assert not any(tmp_path.iterdir())


@pytest.fixture
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plugin's registration and import path end with the test."""
    from smallfed.flower import strategies

    monkeypatch.setattr(strategies, "STRATEGIES", dict(strategies.STRATEGIES))
    monkeypatch.setattr(sys, "path", list(sys.path))


def test_plugins_register_before_the_configuration_is_checked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_registry: None) -> None:
    """A strategy registered in the user's module is known wherever the Config is built."""
    monkeypatch.delitem(sys.modules, "my_plugin", raising=False)
    (tmp_path / "my_plugin.py").write_text(
        "from flwr.serverapp.strategy import FedMedian\n"
        "from smallfed.flower.strategies import NO_SAMPLING, register_strategy\n\n"
        "@register_strategy('my-median', 'the median, registered by a plugin')\n"
        "def my_median(cfg):\n"
        "    return FedMedian(**NO_SAMPLING)\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="'my-median' is not known"):
        smallfed.simulate(out=tmp_path / "no", strategy="my-median")
    results = smallfed.simulate(out=tmp_path / "run", plugins="my_plugin", strategy="my-median",
                                num_server_rounds=1, num_clients=4, clients_per_round=3,
                                local_epochs=1)
    assert results["rounds"][1]["clients"] == 3
