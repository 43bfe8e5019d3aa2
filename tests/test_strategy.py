"""The server's layers: seeded sampling by partition id; bad replies dropped, round goes on.

A test of one layer wraps :class:`Tiny`, a strategy that sends the model to every node
it is shown and keeps the replies it is given, as Flower's mods are tested with a lambda.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedAvgM, Strategy

from smallfed.codec import parse_codec
from smallfed.compact.pruning import MASK_RECORD
from smallfed.config import Config
from smallfed.flower.client import build_client_app
from smallfed.flower.inprocess import InProcessGrid
from smallfed.flower.layers import (
    AdmitReplies,
    BoundUpdates,
    ClientReports,
    DecodeUpdates,
    Partitions,
    PartitionSampling,
    ProjectModel,
    Quorum,
    RollbackNonFinite,
    ValidateReplies,
    build_strategy,
    restore_stack,
    stack,
    stack_state,
    stack_stats,
)
from smallfed.flower.records import payload_record
from smallfed.flower.server import build_server_app
from smallfed.flower.strategies import NO_SAMPLING, STRATEGIES, make_inner_strategy
from smallfed.models import build_model


class Tiny(Strategy):
    """Sends the model to every node shown; aggregation returns the first reply's arrays."""

    def __init__(self) -> None:
        self.seen: list[Message] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return [Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=n,
                        message_type="train") for n in grid.get_node_ids()]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.seen = list(replies)
        first = self.seen[0].content["arrays"] if self.seen else None
        return first, MetricRecord({"replies": len(self.seen)})

    def configure_evaluate(self, *args: object) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, *args: object) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        pass


class Nodes(Grid):
    """A Grid of fixed node ids that only lists them (the layers under test send nothing)."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def get_node_ids(self) -> Iterable[int]:
        return list(self.ids)

    def set_run(self, run_id: int) -> None: ...
    @property
    def run(self):  # type: ignore[no-untyped-def]
        return None
    def create_message(self, *args: object, **kwargs: object) -> Message: ...
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]: ...
    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]: ...
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]: ...


MODEL = {"w": np.zeros((2, 3), np.float32)}


@pytest.fixture(autouse=True)
def task_identity() -> None:
    """Messages take their run from the task identity an engine sets: the in-process one."""
    InProcessGrid(ClientApp(), 1)


def answer(ask: Message, content: RecordDict | None = None, error: Error | None = None
           ) -> Message:
    return Message(error, reply_to=ask) if error else Message(content, reply_to=ask)


def update(arrays: dict[str, np.ndarray], num_examples: object = 10) -> RecordDict:
    return RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": num_examples}),
    })


def sent(layer: Strategy, nodes: int | list[int] = 1) -> list[Message]:
    """The train messages a layer stack sends for MODEL to nodes 1..``nodes`` (or those ids)."""
    arrays = ArrayRecord({k: Array(v) for k, v in MODEL.items()})
    ids = list(range(1, nodes + 1)) if isinstance(nodes, int) else nodes
    return list(layer.configure_train(1, arrays, ConfigRecord(), Nodes(ids)))


def sampled_partitions(cfg: Config, rounds: int) -> list[list[int]]:
    grid = InProcessGrid(build_client_app(cfg), cfg.num_clients, cfg.to_dict())
    partitions = Partitions(cfg.clients_per_round)
    sampling = PartitionSampling(Tiny(), partitions, clients_per_round=cfg.clients_per_round,
                                 fraction_evaluate=0.0, seed=cfg.seed)
    picks = []
    for r in range(1, rounds + 1):
        nodes = sampling.sample(grid, r, cfg.clients_per_round, purpose=0)
        picks.append(sorted(partitions.of[n] for n in nodes))
    return picks


def test_sampling_follows_the_seed_not_the_node_ids() -> None:
    cfg = Config(num_clients=20, clients_per_round=5, seed=3)
    first, second = sampled_partitions(cfg, 4), sampled_partitions(cfg, 4)
    assert first == second  # new random node ids, same partitions
    assert all(len(set(p)) == 5 for p in first)
    assert len({tuple(p) for p in first}) > 1  # rounds differ
    assert sampled_partitions(cfg.replace(seed=4), 4) != first


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (update({"w": np.full((2, 3), np.nan, np.float32)}), "NaN or infinite"),
        (update({"w": np.zeros((3, 2), np.float32)}), "expected float32[2, 3]"),
        (update({"w": np.zeros((2, 3), np.float64)}), "expected float32"),
        (update({"v": np.zeros((2, 3), np.float32)}), "array keys differ"),
        (update({"w": np.zeros((2, 3), np.float32)}, num_examples=0), "must be a positive finite"),
        (update({"w": np.zeros((2, 3), np.float32)}, num_examples=float("inf")), "positive finite"),
        (RecordDict({"metrics": MetricRecord({"num-examples": 3})}), "expected one ArrayRecord"),
    ],
)
def test_malformed_replies_are_named(content: RecordDict, reason: str,
                                     caplog: pytest.LogCaptureFixture) -> None:
    inner = Tiny()
    layers = ValidateReplies(DecodeUpdates(inner, seed=0))
    ask = sent(layers)[0]
    good = answer(ask, update({"w": np.ones((2, 3), np.float32)}))
    layers.aggregate_train(1, [answer(ask, content), good])
    assert inner.seen == [good]
    assert stack_stats(layers)["rejected"] == 1
    assert reason in caplog.text


def test_a_layer_sees_only_its_concern() -> None:
    """ClientReports keeps declines from the layers below and notes reported epsilons."""
    inner = Tiny()
    reports = ClientReports(inner)
    ask = sent(reports, nodes=2)
    declined = answer(ask[0], RecordDict({
        "metrics": MetricRecord({"num-examples": 0, "declined": 1, "epsilon": 2.5}),
        "status": ConfigRecord({"reason": "budget spent"})}))
    trained = answer(ask[1], update({"w": np.ones((2, 3), np.float32)}))
    trained.content["metrics"]["epsilon"] = 1.5
    reports.aggregate_train(1, [declined, trained])
    assert inner.seen == [trained]
    assert reports.round_stats() == {"declined": 1}
    assert reports.epsilon() == (2.5, 2.0)
    fresh = ClientReports(Tiny())
    fresh.restore(reports.state())
    assert fresh.epsilon() == (2.5, 2.0)


def test_quorum_fails_a_round_with_too_few_updates() -> None:
    inner = Tiny()
    quorum = Quorum(inner, min_replies=2)
    ask = sent(quorum, nodes=2)[0]
    assert quorum.aggregate_train(1, [answer(ask, update(MODEL))]) == (None, None)
    assert inner.seen == [] and quorum.round_stats() == {"aggregated": 0}


def test_decoding_turns_payloads_into_models() -> None:
    """A reply's payload becomes global + delta for the layer below; the broadcast is encoded."""
    inner = Tiny()
    decode = DecodeUpdates(inner, seed=0, codec_up=parse_codec("fp16"),
                           codec_down=parse_codec("fp16"))
    ask = sent(decode)[0]
    assert list(ask.content["arrays"]) == ["payload"]  # encoded on the way down
    payload = parse_codec("fp16").encode({"w": np.full((2, 3), 0.5, np.float32)}, seed=0)[0]
    reply = answer(ask, RecordDict({"arrays": payload_record(payload),
                                    "metrics": MetricRecord({"num-examples": 3})}))
    arrays, _ = decode.aggregate_train(1, [reply])
    assert np.allclose(arrays["w"].numpy(), 0.5)


def test_projection_masks_the_aggregate_and_fedavgm_steps_from_it() -> None:
    """ProjectModel prunes what it sends and what comes back, and tells FedAvgM."""
    cfg = Config(prune="unstructured", prune_sparsity=0.5, num_server_rounds=2,
                 prune_end_round=1)
    model = build_model("mlp", (1, 8, 8), 10, 0)
    inner = FedAvgM(**NO_SAMPLING, server_momentum=0.5)
    layers = build_strategy(cfg, model, input_shape=(1, 8, 8), inner=inner)
    project = next(s for s in stack(layers) if isinstance(s, ProjectModel))
    grid = InProcessGrid(build_client_app(cfg), cfg.num_clients, cfg.to_dict())
    arrays = ArrayRecord(model.state_dict())
    messages = list(layers.configure_train(1, arrays, ConfigRecord({"lr": 0.1}), grid))
    assert all(MASK_RECORD in m.content.array_records for m in messages)
    result, _ = layers.aggregate_train(1, grid.send_and_receive(messages))
    zeros = {k: float((v.numpy() == 0).mean()) for k, v in result.items() if k.endswith("weight")}
    assert min(zeros.values()) > 0.3  # pruned weights stayed zero after the step
    assert inner.current_arrays is result  # FedAvgM steps from the projected model
    assert project.changed


def test_every_registered_strategy_builds_and_checkpoints() -> None:
    """Each of Flower's strategies is a registry entry; its state round-trips without
    smallfed naming its fields."""
    for name in STRATEGIES:
        cfg = Config(strategy=name, clients_per_round=10)
        strategy = make_inner_strategy(cfg)
        assert isinstance(strategy, Strategy), name
    layers = build_strategy(Config(strategy="fedavgm", server_momentum=0.9),
                            build_model("mlp", (1, 8, 8), 10, 0), input_shape=(1, 8, 8))
    inner = list(stack(layers))[-1]
    inner.momentum_vector = [np.ones(3, np.float32)]
    fresh = build_strategy(Config(strategy="fedavgm", server_momentum=0.9),
                           build_model("mlp", (1, 8, 8), 10, 0), input_shape=(1, 8, 8))
    restore_stack(fresh, stack_state(layers))
    assert np.array_equal(list(stack(fresh))[-1].momentum_vector[0], np.ones(3))


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
    inner = FedAvg(**NO_SAMPLING)
    layers = ValidateReplies(DecodeUpdates(Quorum(inner), seed=0, codec_up=parse_codec("fp16")))
    cfg = Config(num_clients=4, clients_per_round=4)
    grid = InProcessGrid(build_client_app(cfg), 4, cfg.to_dict())
    node = next(iter(grid.get_node_ids()))
    ask = sent(layers, nodes=[node])[0]
    payload = parse_codec("fp16").encode({"w": np.ones((2, 3), np.float32)}, seed=0)[0]

    def good(extra: dict) -> Message:
        return answer(ask, RecordDict({"arrays": payload_record(payload),
                                       "metrics": MetricRecord({"num-examples": 5, **extra})}))

    replies = [
        answer(ask, error=Error(code=0, reason="")),
        answer(ask, RecordDict({"arrays": MetricRecord({"x": 1.0}),
                                "metrics": MetricRecord({"num-examples": 5})})),
        answer(ask, RecordDict({"arrays": payload_record(payload),
                                "metrics": MetricRecord({"num-examples": [1.0, 2.0]})})),
        good({"loss": 0.5}),
        good({"loss": 0.7, "extra": [1.0, 2.0, 3.0]}),
        answer(ask, RecordDict({"status": ConfigRecord({"x": "y"})})),
    ]
    arrays, metrics = layers.aggregate_train(1, replies)
    assert arrays is not None and np.allclose(arrays["w"].numpy(), 1.0, atol=1e-3)
    assert set(metrics) == {"loss"}
    counts = stack_stats(layers)
    assert (counts["failed"], counts["rejected"], counts["aggregated"]) == (1, 3, 2)


def test_a_node_that_leaves_does_not_stall_the_next_round() -> None:
    """The first round waits for clients-per-round nodes; later ones go on with who is there."""
    cfg = Config(num_clients=3, clients_per_round=3)
    grid = InProcessGrid(build_client_app(cfg), 3, run_config=cfg.to_dict())
    partitions = Partitions(3, wait_for_nodes_s=2.0)
    assert len(partitions.discover(grid)) == 3
    gone = next(iter(grid.get_node_ids()))
    grid.disconnect(gone)  # the device died
    assert len(partitions.discover(grid)) == 2
    grid.reconnect(gone)  # and came back: it joins the next round
    assert gone in partitions.discover(grid)
    with pytest.raises(RuntimeError, match="only 3 nodes connected after 1 s"):
        Partitions(4, wait_for_nodes_s=1.0).discover(grid)


def test_one_reply_per_node_sent_a_message_and_none_too_large(
        caplog: pytest.LogCaptureFixture) -> None:
    inner = Tiny()
    admit = AdmitReplies(inner, max_reply_bytes=1000)
    asks = sent(admit, nodes=2)
    first = answer(asks[0], update(MODEL))
    stranger = Message(update(MODEL), dst_node_id=0, message_type="train")  # never asked
    replies = [first, answer(asks[0], update(MODEL)),
               answer(asks[1], update({"w": np.zeros((200, 3), np.float32)})), ]
    admit.aggregate_train(1, [*replies, answer(stranger, update(MODEL))])
    assert inner.seen == [first]
    assert admit.round_stats() == {"rejected": 3}
    for reason in ("a second reply this round", "more than an update of this model",
                   "it was sent no message this round"):
        assert reason in caplog.text


def test_a_claim_past_the_known_partition_size_is_rejected() -> None:
    inner = Tiny()
    validate = ValidateReplies(inner, known_examples=lambda node: 50)
    ask = sent(validate)[0]
    honest, liar = answer(ask, update(MODEL, 50)), answer(ask, update(MODEL, 1e9))
    validate.aggregate_train(1, [honest, liar])
    assert inner.seen == [honest] and validate.round_stats()["rejected"] == 1


def test_data_that_lie_about_their_dtype_or_shape_are_rejected(
        caplog: pytest.LogCaptureFixture) -> None:
    """An Array declares float32 (2, 3), but its bytes hold float64, or one value."""
    inner = Tiny()
    decode = DecodeUpdates(inner, seed=0)
    ask = sent(decode)[0]
    lies = []
    for data in (np.zeros((2, 3), np.float64), np.zeros((1,), np.float32)):
        real = Array(data)
        lying = Array(dtype="float32", shape=(2, 3), stype=real.stype, data=real.data)
        lies.append(answer(ask, RecordDict({"arrays": ArrayRecord({"w": lying}),
                                            "metrics": MetricRecord({"num-examples": 3})})))
    decode.aggregate_train(1, lies)
    assert inner.seen == [] and decode.round_stats() == {"rejected": 2}
    assert "but its data hold float64[2, 3]" in caplog.text
    assert "but its data hold float32[1]" in caplog.text


def test_updates_are_bounded_by_a_multiple_of_recent_medians() -> None:
    inner = Tiny()
    bound = BoundUpdates(inner, factor=2.0)
    asks = sent(bound, nodes=4)
    replies = [answer(a, update({"w": np.full((2, 3), v, np.float32)}))
               for a, v in zip(asks, (1.0, 1.1, 0.9, 1e6))]
    bound.aggregate_train(1, replies)
    norms = [np.linalg.norm(r.content["arrays"]["w"].numpy()) for r in inner.seen]
    median = np.median([np.linalg.norm(np.full(6, v)) for v in (1.0, 1.1, 0.9, 1e6)])
    assert norms[:3] == pytest.approx([np.sqrt(6) * v for v in (1.0, 1.1, 0.9)])
    assert norms[3] == pytest.approx(2.0 * median, rel=1e-5)
    assert bound.round_stats() == {"clipped": 1}
    fixed = BoundUpdates(Tiny(), clip=0.5)
    sent(fixed)
    assert fixed.norm_bound([10.0]) == 0.5


def test_unknown_clients_weights_are_capped_at_a_multiple_of_the_median() -> None:
    inner = Tiny()
    bound = BoundUpdates(inner, factor=0.0)  # weights only
    asks = sent(bound, nodes=3)
    replies = [answer(a, update(MODEL, n)) for a, n in zip(asks, (10, 20, 1e9))]
    bound.aggregate_train(1, replies)
    assert [r.content["metrics"]["num-examples"] for r in inner.seen] == [10, 20, 80]


def test_a_non_finite_aggregate_is_rolled_back_with_the_state_below() -> None:
    """FedAvgM's momentum would keep an infinity for good: the round is undone whole."""
    inner = FedAvgM(**NO_SAMPLING, server_momentum=0.9, server_learning_rate=10.0)
    rollback = RollbackNonFinite(Quorum(inner))
    cfg = Config(num_clients=2, clients_per_round=2)
    grid = InProcessGrid(build_client_app(cfg), 2, cfg.to_dict())
    node = next(iter(grid.get_node_ids()))
    arrays = ArrayRecord({k: Array(v) for k, v in MODEL.items()})
    ask = list(rollback.configure_train(1, arrays, ConfigRecord(), Nodes([node])))[0]
    good = answer(ask, update({"w": np.ones((2, 3), np.float32)}))
    assert rollback.aggregate_train(1, [good])[0] is not None
    momentum = [m.copy() for m in inner.momentum_vector]
    huge = answer(ask, update({"w": np.full((2, 3), 3e38, np.float32)}))
    assert rollback.aggregate_train(2, [huge]) == (None, None)  # 10 x 3e38 overflows float32
    assert rollback.round_stats() == {"rolled_back": 1}
    assert np.array_equal(inner.momentum_vector[0], momentum[0])


def test_the_superlinks_error_for_a_dead_node_is_counted_as_failed() -> None:
    """Flower's "Node Unavailable" reply comes from the SuperLink, not the node sent to."""
    inner = Tiny()
    layers = AdmitReplies(ValidateReplies(inner), max_reply_bytes=1000)
    ask = sent(layers)[0]
    from_superlink = Message(Error(code=5, reason="Node Unavailable"), reply_to=Message(
        RecordDict(), dst_node_id=1, message_type="train"))
    layers.aggregate_train(1, [answer(ask, update(MODEL)), from_superlink])
    assert stack_stats(layers) == {"rejected": 0, "failed": 1}


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan",
                                  "fedyogi", "qfedavg"])
def test_flowers_strategies_run_with_codecs_and_pruning(name: str, tiny_cfg: Config,
                                                        tmp_path: Path) -> None:
    """Robust aggregators see decoded whole models and their result is pruned again."""
    cfg = tiny_cfg.replace(strategy=name, codec="topk:0.3,quantize:8,error_feedback",
                           prune="unstructured", prune_sparsity=0.5, prune_end_round=1)
    grid = InProcessGrid(build_client_app(cfg), cfg.num_clients, cfg.to_dict())
    build_server_app(cfg, tmp_path)(grid, grid.server_context())
    rounds = json.loads((tmp_path / "results.json").read_text())["rounds"]
    assert [r["clients"] for r in rounds] == [0, 4, 4]
    assert all(r["updates_rejected"] == 0 and r["rolled_back"] == 0 for r in rounds)
    assert np.isfinite([r["loss"] for r in rounds]).all()
    if name != "qfedavg":  # q-FedAvg's step is small at lr 0.05: two rounds barely move it
        assert rounds[-1]["accuracy"] > rounds[0]["accuracy"] + 0.1


def test_a_poisoned_first_round_does_not_freeze_the_run() -> None:
    """FedAvgM has no momentum before round 1: a rolled-back round 1 leaves it None."""
    inner = FedAvgM(**NO_SAMPLING, server_momentum=0.9, server_learning_rate=10.0)
    rollback = RollbackNonFinite(Quorum(inner))
    arrays = ArrayRecord({k: Array(v) for k, v in MODEL.items()})
    ask = list(rollback.configure_train(1, arrays, ConfigRecord(), Nodes([7])))[0]
    huge = answer(ask, update({"w": np.full((2, 3), 3e38, np.float32)}))
    assert rollback.aggregate_train(1, [huge]) == (None, None)
    assert inner.momentum_vector is None
    good = answer(ask, update({"w": np.ones((2, 3), np.float32)}))
    new, _ = rollback.aggregate_train(2, [good])
    assert new is not None and np.isfinite(new["w"].numpy()).all()


def test_odd_metrics_never_crash_the_aggregation() -> None:
    """A NaN loss, a list, a missing key, or a strategy that raises: the round fails at
    worst, the ServerApp goes on."""
    layers = ValidateReplies(DecodeUpdates(Quorum(FedAvg(**NO_SAMPLING)), seed=0))
    asks = sent(layers, nodes=3)
    replies = [answer(a, update(MODEL)) for a in asks]
    replies[0].content["metrics"]["train-loss"] = float("nan")
    replies[1].content["metrics"]["train-loss"] = [1.0, 2.0]
    replies[2].content["metrics"]["train-loss"] = 0.5
    arrays, metrics = layers.aggregate_train(1, replies)
    assert arrays is not None and "train-loss" not in metrics

    class Raises(Tiny):
        def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
            raise ValueError("cannot aggregate these")

    quorum = Quorum(Raises())
    ask = sent(quorum)[0]
    assert quorum.aggregate_train(1, [answer(ask, update(MODEL))]) == (None, None)


def test_qfedavg_needs_a_train_loss_it_can_use() -> None:
    inner = Tiny()
    validate = ValidateReplies(inner, required_metrics=("train-loss",))
    asks = sent(validate, nodes=3)
    replies = [answer(a, update(MODEL)) for a in asks]
    replies[0].content["metrics"]["train-loss"] = -1.0
    replies[1].content["metrics"]["train-loss"] = 0.3
    validate.aggregate_train(1, replies)
    assert inner.seen == [replies[1]] and validate.round_stats()["rejected"] == 2


def test_clients_epsilons_count_only_under_sample_level_dp() -> None:
    inner = Tiny()
    reports = ClientReports(inner, note_epsilons=False)
    ask = sent(reports)[0]
    lie = answer(ask, update(MODEL))
    lie.content["metrics"]["epsilon"] = 0.01
    reports.aggregate_train(1, [lie])
    assert reports.epsilon() is None


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_server_optimizers_keep_the_models_dtypes(name: str, tiny_cfg: Config,
                                                  tmp_path: Path) -> None:
    """Flower's FedOpt strategies aggregate in float64; the next round's dense float32
    updates must still match the model sent (they were all rejected from round 2)."""
    cfg = tiny_cfg.replace(strategy=name, num_server_rounds=3, server_lr=0.01)
    grid = InProcessGrid(build_client_app(cfg), cfg.num_clients, cfg.to_dict())
    build_server_app(cfg, tmp_path)(grid, grid.server_context())
    rounds = json.loads((tmp_path / "results.json").read_text())["rounds"]
    assert [r["clients"] for r in rounds] == [0, 4, 4, 4]
    assert all(r["updates_rejected"] == 0 for r in rounds)
