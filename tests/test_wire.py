"""The wire estimate: Flower's objects counted, the model's arithmetic, and what a
simulation records and charges its devices."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from smallfed.config import Config
from smallfed.flower.records import model_to_record, payload_record, record_bytes
from smallfed.flower.wire import MODEL, app_bundle_bytes, content_objects, message_objects
from smallfed.models import build_model
from smallfed.report.table import rounds_table
from smallfed.simulation import simulate


class _Held:
    """What message_objects reads of a Message: its content (Messages need a run)."""

    def __init__(self, content: RecordDict) -> None:
        self.content = content

    def has_error(self) -> bool:
        return False


@pytest.mark.parametrize("content", [
    RecordDict({"arrays": model_to_record(build_model("cnn-tiny", (1, 28, 28), 10, 0)),
                "config": ConfigRecord({"lr": 0.1})}),
    RecordDict({"arrays": payload_record(b"x" * 1500), "metrics": MetricRecord({"n": 3})}),
    RecordDict({"metrics": MetricRecord({"partition-id": 2})}),
])
def test_objects_are_what_flower_moves(content: RecordDict) -> None:
    """One request per object: the message, and every object Flower nests in it."""
    assert message_objects(_Held(content)) == 1 + len(get_all_nested_objects(content))


def test_the_app_bundle_is_what_flwr_build_packs(tmp_path: Path) -> None:
    """The FAB's size from the sources, against `flwr build` of this project (1%)."""
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parent.parent
    flwr = Path(sys.executable).parent / "flwr"
    subprocess.run([str(flwr), "build", "--app", str(root)], cwd=tmp_path, check=True,
                   capture_output=True, timeout=120)
    fab, = tmp_path.glob("*.fab")
    stored = {info.compress_type for info in zipfile.ZipFile(fab).infolist()}
    assert stored == {zipfile.ZIP_STORED}  # Flower does not compress it
    assert app_bundle_bytes() == pytest.approx(fab.stat().st_size, rel=0.01)


def test_the_model_by_hand() -> None:
    down, up = MODEL.up(1500, 6)
    assert down == pytest.approx(MODEL.request_down * 7)
    assert up == pytest.approx(MODEL.request_up * 7 + (1 + MODEL.framing_up) * 1500)
    down, up = MODEL.down(425_384, 28, messages=2)
    assert down == pytest.approx(MODEL.request_down * 30 + (1 + MODEL.framing_down) * 425_384)
    assert MODEL.polling(10.0) == (MODEL.poll_down * 10, MODEL.poll_up * 10)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("wire")
    cfg = Config(num_server_rounds=2, num_clients=6, clients_per_round=3, seed=5,
                 local_epochs=1, batch_size=16, codec="topk:0.05,quantize:8,error_feedback",
                 devices="rpi4:0.5,phone-low:0.5", round_deadline_s=0)
    return simulate(cfg, out, progress=False), out


def test_a_round_is_charged_its_messages_joins_and_polling(
        compressed: tuple[dict, Path]) -> None:
    results, _ = compressed
    first, second = results["rounds"][1:]
    for r, joins in ((first, 6), (second, 0)):  # discovery asks all 6 nodes in round 1
        requests = r["objects_up"] + r["objects_down"] + r["messages_up"] + r["messages_down"]
        poll_down, poll_up = MODEL.polling(r["sim_time_s"] * 6)  # every node polls
        assert r["bytes_up_wire_est"] == round(
            MODEL.request_up * requests + (1 + MODEL.framing_up) * r["bytes_up"] + poll_up
            + MODEL.join_up * joins)
        assert r["bytes_down_wire_est"] == round(
            MODEL.request_down * requests + (1 + MODEL.framing_down) * r["bytes_down"]
            + poll_down + (MODEL.join_down + app_bundle_bytes()) * joins)
    s = results["summary"]
    assert s["total_bytes_up_wire_est"] == first["bytes_up_wire_est"] + second["bytes_up_wire_est"]
    # A compressed update saves far less on the wire than in payload: requests dominate.
    assert 1 < s["compression_ratio_up_wire_est"] < s["compression_ratio_up"] / 3
    assert s["wire_model"]["flwr_version"] == MODEL.flwr_version


def test_dense_on_the_wire_is_the_dense_run(compressed: tuple[dict, Path],
                                            tmp_path: Path) -> None:
    """dense_bytes_up_wire_est: what the same rounds cost with dense updates, requests
    included: the dense run's own estimate, where the two runs sent the same messages."""
    results, _ = compressed
    cfg = Config.from_mapping(results["config"]).replace(codec="none", devices="")
    dense = simulate(cfg, tmp_path, progress=False)
    plain = simulate(cfg.replace(codec=results["config"]["codec"]), tmp_path / "topk",
                     progress=False)
    for d, c in zip(dense["rounds"][1:], plain["rounds"][1:]):
        assert d["clients"] == c["clients"]  # no devices: the same clients replied
        assert c["dense_bytes_up_wire_est"] == d["bytes_up_wire_est"] == d[
            "dense_bytes_up_wire_est"]


def test_a_declined_client_sent_no_update_to_make_dense(tmp_path: Path) -> None:
    """iot's 1 MB cannot hold a batch of 256: every client declines, and the dense
    counterpart of the run is the run itself."""
    cfg = Config(devices="iot:1", batch_size=256, num_server_rounds=1, num_clients=4,
                 clients_per_round=4)
    last = simulate(cfg, tmp_path, progress=False)["rounds"][1]
    assert last["clients_declined"] == 4 - last["clients_offline"] > 0
    assert last["dense_bytes_up_wire_est"] == last["bytes_up_wire_est"]


def test_devices_are_charged_the_wire(compressed: tuple[dict, Path]) -> None:
    results, out = compressed
    model = build_model("cnn-tiny", (1, 8, 8), 10, 0)
    dense = record_bytes(model_to_record(model))
    pulled = MODEL.round_trips(1 + content_objects(RecordDict({
        "arrays": model_to_record(model), "config": ConfigRecord({"lr": 0.1})})))
    with open(out / "clients.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["status"] == "finished"]
    assert rows
    for row in rows:
        assert int(row["bytes_down"]) == dense
        assert int(row["bytes_down_wire_est"]) > int(row["bytes_down"])
        assert int(row["bytes_down_wire_est"]) < app_bundle_bytes()  # the join is not a round's
        assert int(row["bytes_up_wire_est"]) > int(row["bytes_up"]) + MODEL.request_up * 6
        device = {"rpi4": (50e6, 100e6, 0.01), "phone-low": (3e6, 15e6, 0.06)}[row["device"]]
        up_bps, down_bps, latency = device
        pushed = MODEL.round_trips(6, pulled=False)  # a payload reply: 6 objects
        assert float(row["transfer_s"]) == pytest.approx(
            2 * latency * (pulled + pushed) + 8 * int(row["bytes_down_wire_est"]) / down_bps
            + 8 * int(row["bytes_up_wire_est"]) / up_bps, abs=2e-5)


def test_the_table_shows_the_columns_the_run_has(compressed: tuple[dict, Path]) -> None:
    results, _ = compressed
    names = [c.header for c in rounds_table(results).columns]
    assert {"wire up (est.)", "simulated (s)", "offline", "dropped"} <= set(names)
    assert "epsilon" not in names
    plain = {**results, "rounds": [{**r, "sim_time_s": None} for r in results["rounds"]]}
    assert "offline" not in [c.header for c in rounds_table(plain).columns]
