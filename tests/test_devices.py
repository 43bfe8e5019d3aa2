"""Simulated devices: profiles, round time from bytes and compute, deadlines, memory."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from smallfed.config import Config, ConfigError
from smallfed.devices import PROFILES, Arrival, DeviceProfile, RoundClock, profile_of
from smallfed.flower.client import memory_refusal
from smallfed.models import build_model
from smallfed.simulation import simulate


def test_profiles_validate_and_mixes_are_checked() -> None:
    assert {"phone-high", "phone-low", "rpi4", "iot"} <= set(PROFILES)
    with pytest.raises(ValueError, match="availability in"):
        DeviceProfile("bad", 1e9, 1e6, 1e6, 0.01, 1.5, 1 << 20)
    for mix, message in [("rpi4:0.5,toaster:0.5", "'toaster' is not a device profile"),
                         ("rpi4:0.5,iot:0.2", "add up to 0.7"),
                         ("rpi4", "write NAME:SHARE")]:
        with pytest.raises(ConfigError, match=message):
            Config(devices=mix)


def test_population_follows_the_mix_and_the_seed() -> None:
    cfg = Config(devices="phone-high:0.2,phone-low:0.5,rpi4:0.2,iot:0.1", seed=3)
    drawn = [profile_of(cfg, pid).name for pid in range(2000)]
    assert drawn == [profile_of(cfg, pid).name for pid in range(2000)]  # deterministic
    shares = Counter(drawn)
    assert shares["phone-low"] / 2000 == pytest.approx(0.5, abs=0.04)
    assert shares["iot"] / 2000 == pytest.approx(0.1, abs=0.03)
    assert profile_of(Config(), 0) is None


def test_round_time_is_transfer_plus_compute_by_hand() -> None:
    """rpi4: 5 GFLOP/s, 100 Mbit/s down, 50 up, 10 ms latency; 2 local epochs."""
    cfg = Config(devices="rpi4:1", local_epochs=2, round_deadline_s=0.3)
    clock = RoundClock(cfg, flops_per_sample=1e6)
    assert clock.online(1, [7, 8], {7: 0, 8: 1}) == [7, 8]  # rpi4 is online at 0.95
    clock.sent({7: 1_000_000, 8: 1_000_000})
    kept = clock.finish(1, [Arrival(7, 0, False, 500_000, 100),  # 0.04 s of compute
                            Arrival(8, 1, False, 500_000, 1000)])  # 0.4 s: past 0.3
    first, second = clock.rows
    assert first.compute_s == pytest.approx(1e6 * 2 * 100 / 5e9)
    assert first.transfer_s == pytest.approx(2 * 0.01 + 8e6 / 100e6 + 4e6 / 50e6)
    assert first.total_s == pytest.approx(0.22) and first.status == "finished"
    assert second.status == "dropped" and kept == {7}
    assert clock.last.dropped == 1 and clock.last.sim_time_s == 0.3  # waited to the deadline
    clock.online(2, [7, 8], {7: 0, 8: 1})
    kept = clock.finish(2, [Arrival(7, 0, True, 0, 0), Arrival(8, 1, False, 10, 0, True)])
    assert [r.status for r in clock.rows[-2:]] == ["failed", "declined"]
    assert kept == {7, 8} and clock.last.dropped == 0 and clock.last.finished == 0


def clients_by_round(out: Path) -> dict[int, list[dict[str, str]]]:
    """clients.csv's rows, by round."""
    rows: dict[int, list[dict[str, str]]] = {}
    with open(out / "clients.csv") as fh:
        for row in csv.DictReader(fh):
            rows.setdefault(int(row["round"]), []).append(row)
    return rows


def test_offline_devices_are_never_sent_a_message(tmp_path: Path) -> None:
    cfg = Config(num_server_rounds=3, num_clients=20, clients_per_round=10, seed=4,
                 local_epochs=1, batch_size=32, devices="iot:0.5,phone-low:0.5",
                 round_deadline_s=30.0)  # an IoT radio: ~19 round trips at 0.1 s, and bytes
    results = simulate(cfg, tmp_path, progress=False)
    rows = clients_by_round(tmp_path)
    for record in results["rounds"][1:]:
        mine = rows.get(record["round"], [])
        offline = [r for r in mine if r["status"] == "offline"]
        assert len(offline) == record["clients_offline"] and len(mine) == 10
        assert record["clients_finished"] + record["clients_offline"] == 10
        assert all(r["bytes_down"] == "0" for r in offline)
        finished = [float(r["total_s"]) for r in mine if r["status"] == "finished"]
        assert record["sim_time_s"] == pytest.approx(max(finished), abs=1e-5)
    assert sum(r["clients_offline"] for r in results["rounds"]) > 0
    assert results["summary"]["sim_time_s"] == pytest.approx(
        sum(r["sim_time_s"] or 0 for r in results["rounds"]), abs=1e-3)


def test_a_device_without_the_memory_is_refused_with_a_reason(tmp_path: Path) -> None:
    cfg = Config(devices="iot:1", batch_size=256)
    model = build_model("cnn-tiny", (1, 8, 8), 10, 0)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    reason = memory_refusal(cfg, context, model, (1, 8, 8))
    assert "device iot allows 1.00 MiB" in reason and "use a smaller model or batch" in reason
    assert memory_refusal(cfg.replace(batch_size=8), context, model, (1, 8, 8)) == ""
    device = Context(run_id=1, node_id=1, node_config={"device": "rpi4"}, state=RecordDict(),
                     run_config={})
    assert memory_refusal(cfg, device, model, (1, 8, 8)) == ""  # the node config's device
    results = simulate(cfg.replace(num_server_rounds=1, num_clients=4, clients_per_round=4),
                       tmp_path, progress=False)
    last = results["rounds"][1]
    assert last["clients_declined"] == 4 - last["clients_offline"] and last["clients"] == 0
    assert last["clients_finished"] == 0
    with open(tmp_path / "clients.csv") as fh:
        statuses = {row["status"] for row in csv.DictReader(fh)}
    assert statuses <= {"declined", "offline"} and "declined" in statuses


def test_dp_sgd_memory_counts_the_per_sample_gradients() -> None:
    from smallfed.devices import training_memory_bytes

    model = build_model("cnn-tiny", (1, 28, 28), 10, 0)
    params = sum(p.numel() for p in model.parameters())
    plain = training_memory_bytes(model, (1, 28, 28), Config(batch_size=16))
    private = training_memory_bytes(model, (1, 28, 28), Config(batch_size=16, privacy="sample",
                                                               dp_noise=1.0))
    # 16 + 3 * 4 = 28 per-sample gradients of every parameter, and 28 samples' activations
    assert private - plain >= 4 * params * 28


def test_stragglers_past_the_deadline_are_left_out_of_the_round(tmp_path: Path) -> None:
    """phone-high rounds take ~1.9 s here (30 request round trips at 30 ms, and
    compute), phone-low ~3.9 s: a 2.5 s deadline drops every phone-low update, end to
    end through the ServerApp."""
    cfg = Config(num_server_rounds=2, num_clients=10, clients_per_round=10, seed=4,
                 local_epochs=1, batch_size=32, devices="phone-high:0.5,phone-low:0.5",
                 round_deadline_s=2.5)
    results = simulate(cfg, tmp_path, progress=False)
    rows = clients_by_round(tmp_path)
    for record in results["rounds"][1:]:
        mine = rows.get(record["round"], [])
        dropped = [r for r in mine if r["status"] == "dropped"]
        finished = [r for r in mine if r["status"] == "finished"]
        assert {r["device"] for r in dropped} <= {"phone-low"}
        assert {r["device"] for r in finished} <= {"phone-high"}
        assert record["clients_dropped"] == len(dropped)
        assert record["clients"] == record["clients_finished"] == len(finished)
        assert all(float(r["total_s"]) > 2.5 for r in dropped)
        if dropped:  # the server waited for them until the deadline
            assert record["sim_time_s"] == pytest.approx(2.5)
    assert sum(r["clients_dropped"] for r in results["rounds"]) > 0
