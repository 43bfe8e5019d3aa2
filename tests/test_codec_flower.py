"""Compression in a real federation: bytes on the wire are the payloads, bad ones are dropped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message
from flwr.clientapp import ClientApp

from smallfed.cli import load_config
from smallfed.config import Config
from smallfed.flower.client import build_client_app
from smallfed.flower.inprocess import InProcessGrid
from smallfed.flower.server import build_server_app
from smallfed.flower.codec_mod import RESIDUAL_KEY
from smallfed.flower.records import PAYLOAD_KEY, record_payload

CODEC = "topk:0.05,quantize:4,error_feedback"


@pytest.fixture(scope="module")
def compressed_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 3-round run whose train replies are recorded as they leave the clients."""
    cfg = Config(num_server_rounds=3, num_clients=6, clients_per_round=4, seed=3,
                 local_epochs=3, batch_size=8, lr=0.02, codec=CODEC, codec_down="fp16")
    out = tmp_path_factory.mktemp("compressed")
    sent: list[int] = []
    grid = InProcessGrid(
        build_client_app(cfg), cfg.num_clients, cfg.to_dict(),
        on_reply=lambda m: sent.append(len(record_payload(m.content["arrays"])))
        if m.metadata.message_type == "train" else None,
    )
    build_server_app(cfg, out)(grid, grid.server_context())
    results = json.loads((out / "results.json").read_text())
    return {"results": results, "payload_sizes": sent, "grid": grid}


def test_bytes_up_are_the_payload_lengths(compressed_run: dict) -> None:
    rounds = compressed_run["results"]["rounds"][1:]
    sizes = compressed_run["payload_sizes"]
    assert len(sizes) == 12
    assert [r["bytes_up"] for r in rounds] == [sum(sizes[i : i + 4]) for i in (0, 4, 8)]


def test_compression_ratios_and_learning(compressed_run: dict) -> None:
    results = compressed_run["results"]
    summary = results["summary"]
    assert summary["compression_ratio_up"] == pytest.approx(
        summary["dense_bytes_up"] / summary["total_bytes_up"], rel=1e-3)
    assert summary["compression_ratio_up"] > 25  # 5% kept, 4-bit values
    # fp16 halves the values; dense fp32 arrays also carry numpy headers, ours do not
    assert 1.95 < summary["compression_ratio_down"] < 2.1
    down = {r["bytes_down"] for r in results["rounds"][1:]}
    assert len(down) == 1  # the same broadcast payload to each of 4 clients every round
    assert results["rounds"][-1]["accuracy"] > results["rounds"][0]["accuracy"] + 0.2


def test_error_feedback_residual_stays_on_the_client(compressed_run: dict) -> None:
    grid = compressed_run["grid"]
    holders = [c for c in grid._contexts.values() if RESIDUAL_KEY in c.state]
    assert holders, "no client kept a residual"
    residual = holders[0].state[RESIDUAL_KEY]
    assert any(np.abs(a.numpy()).sum() > 0 for a in residual.values())


def corrupting_app(cfg: Config) -> ClientApp:
    """The real ClientApp, but partition 0's payload loses its last bytes on the way."""
    real = build_client_app(cfg)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:  # type: ignore[no-untyped-def]
        reply = real(msg, context)
        if context.node_config["partition-id"] == 0:
            array = reply.content["arrays"][PAYLOAD_KEY]
            array.data = array.data[:-5]
        return reply

    @app.query()
    def query(msg: Message, context) -> Message:  # type: ignore[no-untyped-def]
        return real(msg, context)

    return app


def test_a_corrupted_payload_is_rejected_and_the_round_goes_on(tmp_path: Path) -> None:
    cfg = Config(num_server_rounds=2, num_clients=3, clients_per_round=3, seed=3,
                 codec=CODEC, batch_size=8, lr=0.02)
    grid = InProcessGrid(corrupting_app(cfg), cfg.num_clients, cfg.to_dict())
    build_server_app(cfg, tmp_path)(grid, grid.server_context())
    rounds = json.loads((tmp_path / "results.json").read_text())["rounds"][1:]
    assert [(r["clients"], r["updates_rejected"]) for r in rounds] == [(2, 1), (2, 1)]


def test_compressed_toml_reaches_100x() -> None:
    cfg = load_config("simulations/compressed.toml", [])
    from smallfed.codec import parse_codec
    from smallfed.data import federated_data
    from smallfed.models import build_model

    ds = federated_data(cfg).dataset
    model = build_model(cfg.model, ds.input_shape, ds.num_classes, cfg.seed)
    update = {k: np.random.default_rng(0).normal(0, 0.01, v.shape).astype(np.float32)
              for k, v in model.state_dict().items()}
    payload, _ = parse_codec(cfg.codec).encode(update, seed=1)
    dense = sum(4 * v.size for v in update.values())
    assert dense / len(payload) >= 100
