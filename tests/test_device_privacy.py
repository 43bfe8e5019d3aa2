"""The device's side of sample-level DP: its ledger, its floor, and what its reply holds.

Devices here are real ClientApps on data folders, driven by a real ServerApp through the
in-process Grid; a restarted SuperNode is a new Grid (fresh node state) on the same folders.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from smallfed.config import Config
from smallfed.data import write_device_data
from smallfed.flower.client import build_client_app
from smallfed.flower.inprocess import InProcessGrid
from smallfed.flower.layers import ClientReports
from smallfed.flower.server import build_server_app
from smallfed.privacy.floor import DeviceFloor
from smallfed.privacy.ledger import (
    LEDGER_FILE,
    Ledger,
    LedgerError,
    create_ledger,
    read_ledger,
)
from smallfed.privacy.local_dp import epsilon_of

PRIVATE = dict(num_server_rounds=2, num_clients=3, clients_per_round=3, local_epochs=1,
               privacy="sample", dp_noise=1.0, dp_accountant="rdp", batch_size=16, seed=3)
ALLOWED_METRICS = {"num-examples", "epsilon", "noise-multiplier", "dp-sample-rate", "dp-steps",
                   "dp-rounds"}


def devices(cfg: Config, folder: Path, **node: object) -> list[dict]:
    """Three devices with their own data folders (made once) and node config ``node``."""
    configs = []
    for i in range(3):
        data_dir = folder / f"device{i}"
        if not (data_dir / "data.npz").exists():
            write_device_data(cfg, i, data_dir)
        if any(key.startswith("dp-max") or key == "dp-min-noise" for key in node):
            create_ledger(data_dir)  # as `smallfed edge start` does for a floor
        configs.append({"data-dir": str(data_dir), "device": "rpi4", "dp-records": 1024,
                        **node})
    return configs


def run(cfg: Config, nodes: list[dict], out: Path) -> tuple[dict, list[Message]]:
    """A whole run on a fresh Grid, as after a SuperNode restart: (results, train replies)."""
    replies: list[Message] = []
    grid = InProcessGrid(build_client_app(cfg), len(nodes), run_config=cfg.to_dict(),
                         on_reply=replies.append, node_configs=nodes)
    build_server_app(cfg, out)(grid, grid.server_context())
    results = json.loads((out / "results.json").read_text())
    return results, [r for r in replies if r.metadata.message_type == "train"]


def reasons(replies: list[Message]) -> list[str]:
    return [str(r.content.config_records["status"]["reason"]) for r in replies
            if not r.has_error() and "status" in r.content.config_records]


def test_a_restarted_device_goes_on_from_its_ledger_and_the_server_never_lowers(
        tmp_path: Path) -> None:
    cfg = Config(**PRIVATE)
    nodes = devices(cfg, tmp_path)
    run(cfg, nodes, tmp_path / "run1")
    paths = [Path(n["data-dir"]) / LEDGER_FILE for n in nodes]
    assert [len(read_ledger(p)) for p in paths] == [2, 2, 2]  # written before each update left
    second, replies = run(cfg, nodes, tmp_path / "run2")  # new SuperNodes, same data
    ledgers = [read_ledger(p) for p in paths]
    assert [len(ledger) for ledger in ledgers] == [4, 4, 4]
    # The restarted devices composed on from their ledgers (3 and 4 rounds), not from zero.
    reported = sorted(r.content.metric_records["metrics"]["epsilon"] for r in replies)
    expected = sorted(epsilon_of(cfg, ledger[:n]) for ledger in ledgers for n in (3, 4))
    assert reported == pytest.approx(expected, rel=1e-12)
    assert second["summary"]["epsilon"] == pytest.approx(max(expected), rel=1e-12)
    clients = second["summary"]["privacy"]["clients"].values()
    assert {c["rounds_trained"] for c in clients} == {4}


def test_a_lost_or_corrupt_ledger_refuses_to_train() -> None:
    context = Context(run_id=1, node_id=1, node_config={"data-dir": "/nonexistent-smallfed"},
                      state=RecordDict(), run_config={})
    assert Ledger.open(context).history == []  # a fresh device
    context.state["smallfed-dp-ledger-written"] = ConfigRecord({"entries": 2})
    with pytest.raises(LedgerError, match="missing, but this node has written 2 rounds"):
        Ledger.open(context)
    fresh = Context(run_id=2, node_id=1, node_config={"data-dir": "/nonexistent-smallfed"},
                    state=RecordDict(), run_config={})  # a new run: no memory of writing
    with pytest.raises(LedgerError, match="missing, but this device has a privacy floor"):
        Ledger.open(fresh, must_exist=True)


@pytest.mark.parametrize("damage", ["garbage", "checksum", "deleted"])
def test_a_damaged_ledger_declines_with_a_reason(tmp_path: Path, damage: str) -> None:
    cfg = Config(**{**PRIVATE, "num_server_rounds": 1})
    nodes = devices(cfg, tmp_path)
    replies: list[Message] = []
    grid = InProcessGrid(build_client_app(cfg), 3, run_config=cfg.to_dict(),
                         on_reply=replies.append, node_configs=nodes)
    build_server_app(cfg, tmp_path / "a")(grid, grid.server_context())
    path = Path(nodes[1]["data-dir"]) / LEDGER_FILE
    data = json.loads(path.read_text())
    if damage == "garbage":
        path.write_text("{not json")
    elif damage == "checksum":
        data["entries"][0]["noise"] = 100.0  # a lower epsilon, if it were believed
        path.write_text(json.dumps(data))
    else:  # deleted while the SuperNode runs (it remembers having written it)
        path.unlink()
    build_server_app(cfg, tmp_path / "b")(grid, grid.server_context())
    declined = reasons(replies)
    assert len(declined) == 1, declined
    assert "refusing to train" in declined[0] or "cannot be read" in declined[0]
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert results["rounds"][1]["clients"] == 2  # the round went on without it


def test_the_device_floor_declines_what_the_server_asks_below_it(tmp_path: Path) -> None:
    cfg = Config(**PRIVATE)
    cases = {"dp-min-noise": (2.0, "below this device's minimum of 2"),
             "dp-max-epsilon": (0.5, "past its own maximum of 0.5"),
             "dp-max-delta": (1e-7, "dp-delta 1e-05 is above this device's 1e-07")}
    for key, (value, message) in cases.items():
        _, replies = run(cfg, devices(cfg, tmp_path, **{key: value}), tmp_path / key)
        declined = reasons(replies)
        assert len(declined) == 6 and all(message in r for r in declined), declined
    plain = cfg.replace(privacy="none")
    _, replies = run(plain, devices(cfg, tmp_path, **{"dp-max-epsilon": 8.0}), tmp_path / "none")
    assert all("trains only under sample-level DP" in r for r in reasons(replies))
    reproducible = cfg.replace(dp_reproducible=True)
    _, replies = run(reproducible, devices(cfg, tmp_path, **{"dp-max-epsilon": 8.0}),
                     tmp_path / "seeded")
    assert all("dp-reproducible" in r for r in reasons(replies))
    # Within its floor the device trains.
    results, _ = run(cfg, devices(cfg, tmp_path, **{"dp-max-epsilon": 50.0, "dp-min-noise": 0.5}),
                     tmp_path / "ok")
    assert [r["clients"] for r in results["rounds"]] == [0, 3, 3]


def test_a_floor_with_nonsense_fails_clearly() -> None:
    assert DeviceFloor.of({"data-dir": "x"}) is None
    with pytest.raises(ValueError, match="node config dp-max-epsilon = 'lots': must be a positive"):
        DeviceFloor.of({"dp-max-epsilon": "lots"})


def test_a_private_device_never_evaluates(tmp_path: Path) -> None:
    cfg = Config(**{**PRIVATE, "privacy": "none", "num_server_rounds": 1, "fraction_evaluate": 1.0})
    replies: list[Message] = []
    grid = InProcessGrid(build_client_app(cfg), 3, run_config=cfg.to_dict(),
                         on_reply=replies.append,
                         node_configs=devices(cfg, tmp_path, **{"dp-max-epsilon": 8.0}))
    build_server_app(cfg, tmp_path / "out")(grid, grid.server_context())
    evaluations = [r for r in replies if r.metadata.message_type == "evaluate"]
    assert len(evaluations) == 3
    assert all(r.has_error() and "it does not evaluate" in r.error.reason for r in evaluations)


def test_a_private_reply_holds_the_noised_update_and_public_numbers_only(tmp_path: Path) -> None:
    """Canary: a device's reply under DP-SGD is the update plus numbers that do not depend
    on its data: take one record away (a neighbouring dataset) and they stay the same."""
    cfg = Config(**{**PRIVATE, "num_server_rounds": 1, "codec": "topk:0.1,quantize:4"})
    metrics = []
    for drop in (False, True):
        nodes = devices(cfg, tmp_path / str(drop))
        if drop:
            path = Path(nodes[0]["data-dir"]) / "data.npz"
            with np.load(path) as npz:
                x, y = npz["x"][1:], npz["y"][1:]
            np.savez(path, x=x, y=y)
        _, replies = run(cfg, nodes, tmp_path / f"out{drop}")
        for reply in replies:
            assert set(reply.content.keys()) <= {"arrays", "metrics"}
            assert set(reply.content.metric_records["metrics"]) <= ALLOWED_METRICS
        metrics.append(dict(replies[0].content.metric_records["metrics"]))
    assert metrics[0] == metrics[1]
    assert "train-loss" not in metrics[0]


def test_a_private_device_must_declare_its_public_record_count(tmp_path: Path) -> None:
    """Without dp-records the sample rate would follow the data, outside the accountant."""
    cfg = Config(**{**PRIVATE, "num_server_rounds": 1})
    nodes = [{k: v for k, v in n.items() if k != "dp-records"} for n in devices(cfg, tmp_path)]
    replies: list[Message] = []
    grid = InProcessGrid(build_client_app(cfg), 3, run_config=cfg.to_dict(),
                         on_reply=replies.append, node_configs=nodes)
    build_server_app(cfg, tmp_path / "out")(grid, grid.server_context())
    trains = [r for r in replies if r.metadata.message_type == "train"]
    assert all(r.has_error() and "declares no dp-records" in r.error.reason for r in trains)


def test_the_server_keeps_the_largest_epsilon_a_client_reported() -> None:
    reports = ClientReports(strategy=None, note_epsilons=True)  # type: ignore[arg-type]
    for value in (3.0, 1.0):
        reports._note(0, MetricRecord({"epsilon": value}))
    assert reports.epsilon() == (3.0, 3.0)


@pytest.mark.parametrize("publish", [False, True])
def test_user_level_runs_keep_the_sample_secret(tmp_path: Path, publish: bool) -> None:
    cfg = Config(num_server_rounds=2, num_clients=6, clients_per_round=3, local_epochs=1,
                 privacy="user", dp_noise=1.0, dp_clip=0.5, devices="rpi4:1.0",
                 dp_publish_sample=publish)
    grid = InProcessGrid(build_client_app(cfg), 6, run_config=cfg.to_dict())
    build_server_app(cfg, tmp_path)(grid, grid.server_context())
    assert (tmp_path / "clients.csv").exists() == publish
    if publish:
        with open(tmp_path / "clients.csv", newline="") as fh:
            assert len(list(csv.DictReader(fh))) > 0
    privacy = json.loads((tmp_path / "results.json").read_text())["summary"]["privacy"]
    assert privacy["level"] == "user" and privacy["rounds_accounted"] == 2


def test_edge_start_makes_the_ledger_of_a_device_with_a_floor(tmp_path: Path) -> None:
    from smallfed.config import ConfigError
    from smallfed.deploy.launch import ledger_summary, privacy_floor

    assert "no privacy ledger yet" in ledger_summary(tmp_path, floor=False)
    assert "created empty" in ledger_summary(tmp_path, floor=True)
    assert read_ledger(tmp_path / LEDGER_FILE) == []
    assert "0 private rounds recorded" in ledger_summary(tmp_path, floor=True)
    (tmp_path / LEDGER_FILE).write_text("[]")
    with pytest.raises(ConfigError, match="refusing to train until the privacy ledger"):
        ledger_summary(tmp_path, floor=True)
    assert privacy_floor(8.0, None, None, 64) == {"dp-max-epsilon": 8.0, "dp-records": 64}
    with pytest.raises(ConfigError, match="--dp-min-noise = -1.0: must be a positive number"):
        privacy_floor(None, -1.0, None, None)
