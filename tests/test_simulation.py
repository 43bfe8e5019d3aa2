"""End to end: real ServerApp and ClientApp, in-process and on Flower's Ray engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from smallfed.config import Config
from smallfed.flower.records import record_bytes, model_to_record
from smallfed.models import build_model
from smallfed.report.results import ROUND_FIELDS, SCHEMA_VERSION
from smallfed.simulation import simulate

SUMMARY_FIELDS = {"final_accuracy", "best_accuracy", "total_bytes_up", "total_bytes_down",
                  "dense_bytes_up", "dense_bytes_down", "compression_ratio_up",
                  "compression_ratio_down", "epsilon", "delta", "privacy", "model_params",
                  "model_fp32_bytes", "wall_time_s", "sim_time_s", "sim_time_to_target_s",
                  "secure_aggregation", "total_bytes_up_wire_est", "total_bytes_down_wire_est",
                  "dense_bytes_up_wire_est", "compression_ratio_up_wire_est", "wire_model"}


def without_times(results: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in results["rounds"]]


@pytest.fixture(scope="module")
def inprocess_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    cfg = Config(num_server_rounds=2, num_clients=4, clients_per_round=4, seed=7,
                 local_epochs=2, batch_size=16)
    return simulate(cfg, tmp_path_factory.mktemp("inprocess"), progress=False)


def test_results_follow_the_schema(inprocess_run: dict) -> None:
    results = inprocess_run
    assert results["schema_version"] == SCHEMA_VERSION
    assert Config.from_mapping(results["config"]).num_server_rounds == 2
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2]
    assert all(set(r) == set(ROUND_FIELDS) for r in results["rounds"])
    assert set(results["summary"]) == SUMMARY_FIELDS
    assert results["summary"]["epsilon"] is None  # no DP, no claim
    assert results["summary"]["privacy"] is None
    assert results["summary"]["secure_aggregation"] is None
    assert all(r["epsilon"] is None and r["clients_declined"] == 0 for r in results["rounds"])


def test_accuracy_rises_above_the_initial_model(inprocess_run: dict) -> None:
    rounds = inprocess_run["rounds"]
    assert rounds[-1]["accuracy"] > rounds[0]["accuracy"] + 0.2
    assert inprocess_run["summary"]["final_accuracy"] == rounds[-1]["accuracy"]


def test_bytes_are_what_the_messages_carried(inprocess_run: dict) -> None:
    model = build_model("cnn-tiny", (1, 8, 8), 10, seed=7)
    per_model = record_bytes(model_to_record(model))
    for r in inprocess_run["rounds"][1:]:
        assert r["clients"] == 4
        assert r["bytes_down"] == 4 * per_model  # the global model to each client
        assert r["bytes_up"] == 4 * per_model  # a dense fp32 model back from each
    summary = inprocess_run["summary"]
    assert summary["dense_bytes_up"] == summary["total_bytes_up"] == 8 * per_model
    assert summary["compression_ratio_up"] == summary["compression_ratio_down"] == 1.0
    assert summary["model_params"] == sum(p.numel() for p in model.parameters())


def test_same_seed_same_rounds(inprocess_run: dict, tmp_path: Path) -> None:
    cfg = Config.from_mapping(inprocess_run["config"])
    again = simulate(cfg, tmp_path, progress=False)
    assert without_times(again) == without_times(inprocess_run)
    other = simulate(cfg.replace(seed=8), tmp_path / "other", progress=False)
    assert without_times(other) != without_times(inprocess_run)


def test_client_sampling_and_fedavgm(tmp_path: Path) -> None:
    cfg = Config(num_server_rounds=2, num_clients=10, clients_per_round=3, seed=1,
                 strategy="fedavgm", server_momentum=0.5, fraction_evaluate=0.5)
    results = simulate(cfg, tmp_path, progress=False)
    assert [r["clients"] for r in results["rounds"]] == [0, 3, 3]
    assert (tmp_path / "rounds.csv").read_text().splitlines()[0] == ",".join(ROUND_FIELDS)


def test_ray_simulation_engine_gives_the_same_rounds(tmp_path: Path) -> None:
    """The real Flower Simulation Engine (Ray), same apps: identical results.

    With a codec and error feedback, so the apps are pickled to Ray's actors and each
    node's residual must survive in its Context.state between rounds, as in-process.
    """
    cfg = Config(num_server_rounds=3, num_clients=4, clients_per_round=4, seed=3,
                 local_epochs=2, batch_size=8, lr=0.02, codec_down="fp16",
                 codec="topk:0.05,quantize:4,error_feedback")
    inprocess = simulate(cfg, tmp_path / "inprocess", progress=False)
    on_ray = simulate(cfg.replace(backend="ray"), tmp_path / "ray", progress=False)
    assert [r["clients"] for r in on_ray["rounds"]] == [0, 4, 4, 4]
    assert without_times(on_ray) == without_times(inprocess)
