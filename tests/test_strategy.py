"""The strategy wrapper: seeded sampling by partition id; bad replies dropped, round goes on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from smallfed.config import Config
from smallfed.flower.client import build_client_app
from smallfed.flower.inprocess import InProcessGrid
from smallfed.flower.server import build_server_app
from smallfed.flower.strategy import SmallfedStrategy
from smallfed.flower.strategy import make_inner_strategy


def make_strategy(cfg: Config) -> SmallfedStrategy:
    return SmallfedStrategy(make_inner_strategy(cfg), clients_per_round=cfg.clients_per_round,
                            fraction_evaluate=0.0, seed=cfg.seed)


def sampled_partitions(cfg: Config, rounds: int) -> list[list[int]]:
    grid = InProcessGrid(build_client_app(cfg), cfg.num_clients, cfg.to_dict())
    strategy = make_strategy(cfg)
    picks = []
    for r in range(1, rounds + 1):
        nodes = strategy.sample(grid, r, cfg.clients_per_round, purpose=0)
        picks.append(sorted(strategy.partition_of[n] for n in nodes))
    return picks


def test_sampling_follows_the_seed_not_the_node_ids() -> None:
    cfg = Config(num_clients=20, clients_per_round=5, seed=3)
    first, second = sampled_partitions(cfg, 4), sampled_partitions(cfg, 4)
    assert first == second  # new random node ids, same partitions
    assert all(len(set(p)) == 5 for p in first)
    assert len({tuple(p) for p in first}) > 1  # rounds differ
    assert sampled_partitions(cfg.replace(seed=4), 4) != first


def reply(arrays: dict[str, np.ndarray], num_examples: float = 10) -> RecordDict:
    return RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": num_examples}),
    })


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (reply({"w": np.full((2, 3), np.nan, np.float32)}), "NaN or infinite"),
        (reply({"w": np.zeros((3, 2), np.float32)}), "expected float32[2, 3]"),
        (reply({"w": np.zeros((2, 3), np.float64)}), "expected float32"),
        (reply({"v": np.zeros((2, 3), np.float32)}), "array keys differ"),
        (reply({"w": np.zeros((2, 3), np.float32)}, num_examples=0), "must be a positive finite"),
        (reply({"w": np.zeros((2, 3), np.float32)}, num_examples=float("inf")), "positive finite"),
        (RecordDict({"metrics": MetricRecord({"num-examples": 3})}), "expected one ArrayRecord"),
    ],
)
def test_malformed_replies_are_named(content: RecordDict, reason: str) -> None:
    strategy = make_strategy(Config())
    strategy._expected = {"w": ((2, 3), "float32")}
    assert reason in strategy.check_reply(content)
    assert strategy.check_reply(reply({"w": np.ones((2, 3), np.float32)})) is None


def saboteur_app(cfg: Config) -> ClientApp:
    """The real ClientApp, except partition 1 sends NaNs and partition 2 crashes."""
    real = build_client_app(cfg)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:  # type: ignore[no-untyped-def]
        pid = context.node_config["partition-id"]
        if pid == 2:
            raise RuntimeError("device ran out of battery")
        answer = real(msg, context)
        if pid == 1:
            arrays = answer.content["arrays"]
            key = next(iter(arrays))
            arrays[key] = Array(np.full(arrays[key].shape, np.nan, np.float32))
        return answer

    @app.query()
    def query(msg: Message, context) -> Message:  # type: ignore[no-untyped-def]
        return real(msg, context)

    return app


def test_a_bad_update_is_rejected_and_the_round_goes_on(tiny_cfg: Config, tmp_path: Path) -> None:
    grid = InProcessGrid(saboteur_app(tiny_cfg), tiny_cfg.num_clients, tiny_cfg.to_dict())
    build_server_app(tiny_cfg, tmp_path)(grid, grid.server_context())
    results = json.loads((tmp_path / "results.json").read_text())
    for r in results["rounds"][1:]:
        assert (r["clients"], r["clients_failed"], r["updates_rejected"]) == (2, 1, 1)
    accuracies = [r["accuracy"] for r in results["rounds"]]
    assert accuracies[-1] > accuracies[0] and np.isfinite(accuracies).all()


def test_a_round_with_too_few_updates_fails_and_the_run_goes_on(
    tiny_cfg: Config, tmp_path: Path
) -> None:
    cfg = tiny_cfg.replace(min_replies=3)  # the saboteur leaves only 2 usable updates
    grid = InProcessGrid(saboteur_app(cfg), cfg.num_clients, cfg.to_dict())
    build_server_app(cfg, tmp_path)(grid, grid.server_context())
    rounds = json.loads((tmp_path / "results.json").read_text())["rounds"]
    assert [r["clients"] for r in rounds] == [0, 0, 0]
    assert rounds[2]["accuracy"] == rounds[0]["accuracy"]  # the model never changed


def test_odd_replies_never_stop_a_round() -> None:
    """Error replies without a reason, arrays of the wrong record type, extra or list
    metrics: each is dropped or trimmed, and FedAvg still aggregates the rest."""
    from flwr.app import ConfigRecord, Error

    cfg = Config(num_clients=4, clients_per_round=4)
    grid = InProcessGrid(build_client_app(cfg), 4, cfg.to_dict())  # sets the task identity
    strategy = make_strategy(cfg.replace(codec="topk:0.5"))
    strategy.codec_up = __import__("smallfed.codec", fromlist=["parse_codec"]).parse_codec("fp16")
    strategy._expected = {"w": ((2, 3), "float32")}
    strategy._global = {"w": np.zeros((2, 3), np.float32)}
    node = next(iter(grid.get_node_ids()))

    def answer(content=None, error=None):  # type: ignore[no-untyped-def]
        ask = Message(RecordDict(), dst_node_id=node, message_type="train")
        return Message(error, reply_to=ask) if error else Message(content, reply_to=ask)

    from smallfed.codec import parse_codec
    payload = parse_codec("fp16").encode({"w": np.ones((2, 3), np.float32)}, seed=0)[0]
    from smallfed.flower.records import payload_record

    def good(extra: dict) -> Message:
        return answer(RecordDict({"arrays": payload_record(payload),
                                  "metrics": MetricRecord({"num-examples": 5, **extra})}))

    replies = [
        answer(error=Error(code=0, reason="")),
        answer(RecordDict({"arrays": MetricRecord({"x": 1.0}),
                           "metrics": MetricRecord({"num-examples": 5})})),
        answer(RecordDict({"arrays": payload_record(payload),
                           "metrics": MetricRecord({"num-examples": [1.0, 2.0]})})),
        good({"loss": 0.5}),
        good({"loss": 0.7, "extra": [1.0, 2.0, 3.0]}),
        answer(RecordDict({"status": ConfigRecord({"x": "y"})})),
    ]
    strategy.last_round = strategy.last_round.__class__(sampled=6)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and np.allclose(arrays["w"].numpy(), 1.0, atol=1e-3)
    assert set(metrics) == {"loss"}
    assert (strategy.last_round.failed, strategy.last_round.rejected,
            strategy.last_round.aggregated) == (1, 3, 2)


def test_a_node_that_leaves_does_not_stall_the_next_round() -> None:
    """The first round waits for clients-per-round nodes; later ones go on with who is there."""
    cfg = Config(num_clients=3, clients_per_round=3)
    grid = InProcessGrid(build_client_app(cfg), 3, run_config=cfg.to_dict())
    strategy = SmallfedStrategy(make_inner_strategy(cfg), clients_per_round=3,
                                fraction_evaluate=0.0, seed=1, wait_for_nodes_s=2.0)
    assert len(strategy.sample(grid, 1, 3, purpose=0)) == 3
    gone = next(iter(grid._contexts))
    context = grid._contexts.pop(gone)  # the device died
    assert len(strategy.sample(grid, 2, 3, purpose=0)) == 2
    grid._contexts[gone] = context  # and came back: it joins the next round
    assert gone in strategy.sample(grid, 3, 3, purpose=0)
    fresh = SmallfedStrategy(make_inner_strategy(cfg), clients_per_round=4,
                             fraction_evaluate=0.0, seed=1, wait_for_nodes_s=1.0)
    with pytest.raises(RuntimeError, match="only 3 nodes connected after 1 s"):
        fresh.sample(grid, 1, 4, purpose=0)
