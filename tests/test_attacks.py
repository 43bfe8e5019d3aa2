"""Hostile but authenticated clients (smallfed.attacks): each attack does what it says,
and the AttackGrid picks its attackers among each round's sampled nodes, by seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from smallfed.attacks import (
    ATTACKS,
    AttackError,
    AttackGrid,
    Target,
    parse_attack,
    parse_number,
)
from smallfed.codec import parse_codec
from smallfed.config import Config
from smallfed.flower.client import build_client_app
from smallfed.flower.inprocess import InProcessGrid
from smallfed.flower.records import (
    message_array_bytes,
    payload_record,
    record_arrays,
    record_payload,
)
from smallfed.flower.server import build_server_app

RNG = np.random.default_rng(0)
SENT = {"conv.weight": RNG.standard_normal((4, 1, 3, 3)).astype(np.float32),
        "conv.bias": RNG.standard_normal(4).astype(np.float32),
        "fc.weight": RNG.standard_normal((10, 4)).astype(np.float32)}
DELTA = {k: RNG.standard_normal(v.shape).astype(np.float32) * 0.01 for k, v in SENT.items()}
TRAINED = {k: SENT[k] + DELTA[k] for k in SENT}


def exchange(reply_arrays: ArrayRecord | None = None, examples: int = 30
             ) -> tuple[Message, Message]:
    """A train message carrying SENT and a reply carrying TRAINED (or ``reply_arrays``)."""
    # Messages take their run from the task identity, which an engine (or a Grid) sets.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    sent = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in SENT.items()}),
                               "config": ConfigRecord({"server-round": 1})}),
                   dst_node_id=7, message_type="train")
    arrays = reply_arrays or ArrayRecord({k: Array(v) for k, v in TRAINED.items()})
    reply = Message(RecordDict({"arrays": arrays,
                                "metrics": MetricRecord({"num-examples": examples})}),
                    reply_to=sent)
    return sent, reply


def attacked(spec: str, codec: str = "none", reply_arrays: ArrayRecord | None = None,
             cache: dict | None = None) -> list[Message]:
    sent, reply = exchange(reply_arrays)
    return parse_attack(spec)(Target(reply, sent, 1, parse_codec(codec),
                                     {} if cache is None else cache))


def delta_of(reply: Message) -> dict[str, np.ndarray]:
    model = record_arrays(reply.content["arrays"])
    return {k: model[k].astype(np.float64) - SENT[k] for k in SENT}


def norm(arrays: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in arrays.values())))


@pytest.mark.parametrize(("spec", "factor"), [("scale:1e3", 1e3), ("scale:1e6", 1e6),
                                              ("signflip:10", -10.0)])
def test_scale_and_signflip_multiply_the_update(spec: str, factor: float) -> None:
    [reply] = attacked(spec)
    delta = delta_of(reply)
    assert norm(delta) == pytest.approx(abs(factor) * norm(DELTA), rel=1e-3)
    for key in SENT:
        np.testing.assert_allclose(delta[key], factor * DELTA[key],
                                   rtol=1e-3, atol=1e-6 * abs(factor))
        assert reply.content["arrays"][key].dtype == "float32"


def test_scale_rewrites_a_codec_payload_with_the_same_codec() -> None:
    codec = parse_codec("fp16")
    payload = codec.encode(DELTA, seed=0)[0]
    [reply] = attacked("scale:10", "fp16", payload_record(payload))
    template = {k: v.shape for k, v in SENT.items()}
    decoded = codec.decode(record_payload(reply.content["arrays"]), template)
    assert norm(decoded) == pytest.approx(10 * norm(DELTA), rel=1e-2)
    with pytest.raises(AttackError, match="codec payload"):
        attacked("float64", "fp16", payload_record(payload))
    with pytest.raises(AttackError, match="use codec 'none'"):
        AttackGrid(InProcessGrid(build_client_app(Config()), 1), "nan", codec="fp16")


@pytest.mark.parametrize("claim", [1e9, 1.7e308])
def test_examples_claims_n(claim: float) -> None:
    [reply] = attacked(f"examples:{claim:g}")
    assert reply.content["metrics"]["num-examples"] == claim


def test_float64_declares_float32_but_its_data_are_float64() -> None:
    [reply] = attacked("float64")
    for key, array in reply.content["arrays"].items():
        assert (array.dtype, tuple(array.shape)) == ("float32", SENT[key].shape)
        assert array.numpy().dtype == np.float64
        np.testing.assert_array_equal(array.numpy(), TRAINED[key].astype(np.float64))


def test_shape_and_scalar_lie_under_the_right_declared_shape() -> None:
    [reply] = attacked("shape")
    array = reply.content["arrays"]["conv.weight"]
    assert tuple(array.shape) == (4, 1, 3, 3) and array.numpy().shape == (37,)
    [reply] = attacked("scalar")
    array = reply.content["arrays"]["conv.weight"]
    assert tuple(array.shape) == (4, 1, 3, 3) and array.numpy().shape == (1,)
    assert array.numpy()[0] == pytest.approx(TRAINED["conv.weight"].mean())


def test_duplicate_delivers_k_replies_of_one_node() -> None:
    replies = attacked("duplicate:4")
    assert len(replies) == 4 and len({id(r) for r in replies}) == 4
    assert len({r.metadata.message_id for r in replies[1:]}) == 3
    assert {r.metadata.src_node_id for r in replies} == {7}
    for reply in replies:
        model = record_arrays(reply.content["arrays"])
        np.testing.assert_array_equal(model["fc.weight"], TRAINED["fc.weight"])
    with pytest.raises(AttackError, match="whole number"):
        attacked("duplicate:0.5")


def test_oversize_makes_the_reply_that_large_with_one_buffer() -> None:
    cache: dict = {}
    first = attacked("oversize:1MiB", cache=cache)[0]
    second = attacked("oversize:1MiB", cache=cache)[0]
    assert message_array_bytes(first) == message_array_bytes(second) == 2**20
    pad = first.content["arrays"]["padding"]
    assert pad.data is second.content["arrays"]["padding"].data  # one buffer, made once
    assert pad.numpy().dtype == np.uint8 and pad.numpy()[-1] == 0xAB


def test_nan_fills_the_model_with_nan() -> None:
    [reply] = attacked("nan")
    assert all(np.isnan(v).all() for v in record_arrays(reply.content["arrays"]).values())


def test_specs_parse_or_say_why_not() -> None:
    assert parse_number("1GiB") == 2**30 and parse_number("1.7e308") == 1.7e308
    assert parse_attack("oversize:256MiB").arg == 256 * 2**20
    for bad, why in [("nope", "unknown attack 'nope'; known: scale"),
                     ("scale", "needs an argument"), ("nan:3", "takes no argument"),
                     ("scale:x", "not a number")]:
        with pytest.raises(AttackError, match=why):
            parse_attack(bad)
    assert all(entry.doc for entry in ATTACKS.values())


def run(cfg: Config, out: Path, attack: str | None = None, attackers: int = 1
        ) -> tuple[list[dict], AttackGrid | None]:
    inner = InProcessGrid(build_client_app(cfg), cfg.num_clients, cfg.to_dict())
    grid = (AttackGrid(inner, attack, attackers_per_round=attackers, seed=cfg.seed)
            if attack else None)
    build_server_app(cfg, out)(grid or inner, inner.server_context())
    return json.loads((out / "results.json").read_text())["rounds"], grid


def test_attackers_are_drawn_from_each_rounds_sampled_nodes(
        tiny_cfg: Config, tmp_path: Path) -> None:
    cfg = tiny_cfg.replace(num_clients=6, clients_per_round=3, num_server_rounds=2,
                           local_epochs=1)
    picks = []
    for name in ("a", "b"):
        _, grid = run(cfg, tmp_path / name, "examples:5", attackers=2)
        assert grid is not None
        picks.append(sorted((h.server_round, h.partition) for h in grid.hits))
        assert [h.server_round for h in grid.hits] == [1, 1, 2, 2]
        assert all(h.partition >= 0 for h in grid.hits)  # learned from the queries
    assert picks[0] == picks[1]  # same seed, same partitions, though node ids differ
    assert len({p for _, p in picks[0]}) > 2  # not the same two every round


def test_a_scaled_attacker_neither_stops_the_run_nor_spoils_it(
        tiny_cfg: Config, tmp_path: Path) -> None:
    cfg = tiny_cfg.replace(num_server_rounds=3)
    rounds, grid = run(cfg, tmp_path / "attacked", "scale:1e6")
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]  # every round completes
    assert grid is not None and len(grid.hits) == 3
    honest, _ = run(cfg, tmp_path / "honest")
    assert all(r["clients"] >= 1 for r in rounds[1:])  # every round aggregated something
    assert rounds[-1]["accuracy"] >= honest[-1]["accuracy"] - 0.05
