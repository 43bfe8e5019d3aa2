"""Secure aggregation end to end on the in-process engine, with the real ClientApp.

The server's new model must be the mean of the clients' clipped updates (within the
integer encoding's rounding) whoever drops where, a round with too few survivors must
fail without stopping the run, and results.json must say what crossed the wire.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message

from smallfed.config import Config, ConfigError
from smallfed.flower.checkpoint import load as load_checkpoint
from smallfed.flower.client import build_client_app
from smallfed.flower.inprocess import InProcessGrid
from smallfed.flower.records import ARRAYS_KEY, record_arrays
from smallfed.flower.secagg import DATA_RECORD, byte_array
from smallfed.flower.server import build_server_app
from smallfed.models import build_model

BASE = dict(dataset="digits", num_clients=9, clients_per_round=9, num_server_rounds=1,
            model="cnn-tiny", local_epochs=1, batch_size=16, momentum=0.0, seed=3,
            update_clip=2.0, fraction_evaluate=0.0)
Hook = Callable[[InProcessGrid, Message], None]


def run(tmp_path: Path, name: str, hook: Hook | None = None, **changes: object
        ) -> tuple[dict, dict[str, np.ndarray], dict[int, Message]]:
    """(results.json, the final global model, the train replies by partition) of an
    in-process run."""
    cfg = Config(**{**BASE, **changes})
    replies: dict[int, Message] = {}

    def on_reply(reply: Message) -> None:
        if reply.metadata.message_type == "train" and not reply.has_error():  # as sent
            replies[grid.place(reply.metadata.src_node_id)] = copy.deepcopy(reply)
        if hook is not None:
            hook(grid, reply)

    grid = InProcessGrid(build_client_app(cfg), cfg.num_clients, run_config=cfg.to_dict(),
                         on_reply=on_reply)
    out = tmp_path / name
    build_server_app(cfg, out, node_states=grid.node_states)(grid, grid.server_context())
    results = json.loads((out / "results.json").read_text())
    return results, load_checkpoint(out).global_arrays, replies


def initial_model() -> dict[str, np.ndarray]:
    model = build_model("cnn-tiny", (1, 8, 8), 10, BASE["seed"])
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def models(replies: Iterable[Message]) -> list[dict[str, np.ndarray]]:
    return [record_arrays(reply.content[ARRAYS_KEY]) for reply in replies]


def clipped_mean(clients: list[dict[str, np.ndarray]], start: dict[str, np.ndarray],
                 clip: float) -> dict[str, np.ndarray]:
    """start + the plain mean of the clients' deltas, each clipped to ``clip`` in L2."""
    deltas = []
    for model in clients:
        delta = {k: model[k].astype(np.float64) - start[k] for k in start}
        norm = math.sqrt(sum(float(np.sum(v * v)) for v in delta.values()))
        deltas.append({k: v * min(1.0, clip / norm) for k, v in delta.items()})
    return {k: start[k] + sum(d[k] for d in deltas) / len(deltas) for k in start}


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], results: dict
                 ) -> None:
    """Equal within the integer grid: each client's rounding moves each rotated coordinate
    of the mean by less than one grid step, a few after the inverse rotation."""
    step = results["summary"]["secure_aggregation"]["scale"]
    worst = max(float(np.max(np.abs(got[k] - want[k]))) for k in want)
    assert worst < 5 * step, f"largest difference {worst:.3g}, grid step {step:.3g}"


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Message]:
    """The same round without secure aggregation: each client's model, in the clear."""
    _, _, replies = run(tmp_path_factory.mktemp("plain"), "plain")
    assert len(replies) == 9
    return replies


def test_the_secure_sum_is_the_mean_of_the_clipped_updates(
        tmp_path: Path, plain: dict[int, Message]) -> None:
    results, model, replies = run(tmp_path, "secure", secure_aggregation=True)
    start = initial_model()
    assert_close(model, clipped_mean(models(plain.values()), start, 2.0), results)
    # What the server held of each client: a masked vector of 16-bit integers, no metrics.
    d = sum(v.size for v in start.values())
    for reply in replies.values():
        assert [len(a.data)
                for a in reply.content[ARRAYS_KEY].values()] == [2 * d]
        assert dict(reply.content["metrics"]) == {"num-examples": 1}
    last = results["rounds"][-1]
    assert last["clients"] == 9
    assert last["bytes_up"] - last["secagg_bytes_up"] == 9 * 2 * d  # the payloads, exactly
    assert 0 < last["secagg_bytes_up"] < last["bytes_up"]
    block = results["summary"]["secure_aggregation"]
    assert (block["bits"], block["coordinates"], block["cohort"]) == (16, d, 9)


def test_with_a_shared_subspace_only_its_coordinates_are_summed(
        tmp_path: Path, plain: dict[int, Message]) -> None:
    """subspace = 0.1: each client encodes and masks only the round's 10% of coordinates
    (the integer codec composes with the shared subspace), clipped in that subspace."""
    from smallfed.privacy.subspace import subspace_masks, subspace_seed

    results, model, replies = run(tmp_path, "subspace", secure_aggregation=True, subspace=0.1)
    start = initial_model()
    masks = subspace_masks(0.1, subspace_seed(BASE["seed"], 1),
                           {k: v.shape for k, v in start.items()})
    kept = sum(int(m.sum()) for m in masks.values())
    assert results["summary"]["secure_aggregation"]["coordinates"] == kept
    assert all(len(r.content[ARRAYS_KEY]["payload"].data) == 2 * kept for r in replies.values())
    inside = [{k: np.where(masks[k], m[k], start[k]) for k in start}  # cut to the subspace
              for m in models(plain.values())]
    want = clipped_mean(inside, start, 2.0)
    assert_close(model, want, results)
    assert all(np.array_equal(model[k][~masks[k]], start[k][~masks[k]]) for k in start)


def drop_after(action: str, count: int) -> Hook:
    """A hook that disconnects the first ``count`` nodes to answer ``action``."""
    gone: list[int] = []

    def hook(grid: InProcessGrid, reply: Message) -> None:
        if reply.metadata.message_type == action and len(gone) < count:
            gone.append(reply.metadata.src_node_id)
            grid.disconnect(reply.metadata.src_node_id)

    return hook


def test_a_third_dropping_after_the_masked_upload_still_counts(
        tmp_path: Path, plain: dict[int, Message]) -> None:
    results, model, replies = run(tmp_path, "late", drop_after("train", 3),
                                  secure_aggregation=True)
    assert len(replies) == 9 and results["rounds"][-1]["clients"] == 9
    assert_close(model, clipped_mean(models(plain.values()), initial_model(), 2.0), results)


def test_parties_dropping_before_the_upload_are_left_out(
        tmp_path: Path, plain: dict[int, Message]) -> None:
    results, model, replies = run(tmp_path, "early", drop_after("query.secagg_shares", 3),
                                  secure_aggregation=True)
    assert len(replies) == 6 and results["rounds"][-1]["clients"] == 6
    theirs = [plain[place] for place in replies]  # the same partitions, in the clear
    assert_close(model, clipped_mean(models(theirs), initial_model(), 2.0), results)


def test_a_sparse_graph_with_a_third_dropping_at_both_stages(tmp_path: Path) -> None:
    """40 parties share with 17 neighbours each (SecAgg+, not the full graph); 6 leave
    before their upload and 7 after it: the sum holds exactly the 34 uploads."""
    sparse = dict(num_clients=40, clients_per_round=40)
    _, _, clear = run(tmp_path, "clear", **sparse)
    early, late = drop_after("query.secagg_shares", 6), drop_after("train", 7)

    def both(grid: InProcessGrid, reply: Message) -> None:
        early(grid, reply)
        late(grid, reply)

    results, model, replies = run(tmp_path, "sparse", both, secure_aggregation=True, **sparse)
    block = results["summary"]["secure_aggregation"]
    assert block["neighbours"] < 39 and block["min_survivors"] == 27
    assert len(replies) == 34 and results["rounds"][-1]["clients"] == 34
    theirs = [clear[place] for place in replies]
    assert_close(model, clipped_mean(models(theirs), initial_model(), 2.0), results)


def test_on_rays_simulation_engine(tmp_path: Path, plain: dict[int, Message]) -> None:
    """The same round on Flower's Simulation Engine: the nodes' keys live in their
    Context.state on Ray's actors between the four exchanges."""
    from smallfed.simulation import simulate

    results = simulate(Config(**{**BASE, "secure_aggregation": True, "backend": "ray"}),
                       tmp_path, progress=False)
    assert results["rounds"][-1]["clients"] == 9
    assert_close(load_checkpoint(tmp_path).global_arrays,
                 clipped_mean(models(plain.values()), initial_model(), 2.0), results)


def hostile_app(cfg: Config, action: str, mutate: Callable[[Message], None]) -> Callable:
    """The real ClientApp, except that the first node to answer ``action`` has its reply
    rewritten by ``mutate``, as a modified client would."""
    app, done = build_client_app(cfg), []

    def call(msg: Message, context: Context) -> Message:
        reply = app(msg, context)
        if msg.metadata.message_type == action and not done and not reply.has_error():
            done.append(msg.metadata.dst_node_id)
            mutate(reply)
        return reply

    return call


def _zero_keys(reply: Message) -> None:  # a low-order X25519 point for both keys
    reply.content[DATA_RECORD] = ArrayRecord({"keys": byte_array(bytes(64))})


def _config_instead_of_arrays(reply: Message) -> None:
    del reply.content[DATA_RECORD]
    reply.content[DATA_RECORD] = ConfigRecord({"ciphertexts": b"x"})


def _garbage_shares(reply: Message) -> None:
    shares = reply.content[DATA_RECORD]["shares"]
    reply.content[DATA_RECORD]["shares"] = byte_array(np.random.default_rng(0).bytes(
        len(shares.data)))


@pytest.mark.parametrize("action, mutate, summed", [
    ("query.secagg_keys", _zero_keys, 8),  # left out before anyone uses its keys
    ("query.secagg_shares", _config_instead_of_arrays, 8),
    ("query.secagg_unmask", _garbage_shares, 9),  # outvoted by spare shares
])
def test_a_hostile_reply_in_any_exchange_is_rejected_and_the_round_goes_on(
        tmp_path: Path, plain: dict[int, Message], action: str, mutate: Callable,
        summed: int) -> None:
    cfg = Config(**{**BASE, "secure_aggregation": True})
    grid = InProcessGrid(hostile_app(cfg, action, mutate), cfg.num_clients,
                         run_config=cfg.to_dict())
    build_server_app(cfg, tmp_path)(grid, grid.server_context())
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["rounds"][-1]["clients"] == summed
    if summed == 9:
        assert_close(load_checkpoint(tmp_path).global_arrays,
                     clipped_mean(models(plain.values()), initial_model(), 2.0), results)


def test_a_client_that_skips_its_clip_is_bounded_in_the_sum(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hostile client encodes every coordinate at the top of the range: the server
    cannot see its update, but the decoded sum exceeds what clipped updates reach, so it
    is scaled down to that bound (and counted)."""
    from smallfed.privacy.distributed import IntegerEncoding

    honest, calls = IntegerEncoding.encode, []

    def encode(self: IntegerEncoding, vector: np.ndarray, seed: int) -> np.ndarray:
        calls.append(1)
        out = honest(self, vector, seed)
        return out if len(calls) > 1 else np.full_like(out, (1 << (self.bits - 1)) - 1)

    monkeypatch.setattr(IntegerEncoding, "encode", encode)
    results, model, _ = run(tmp_path, "unclipped", secure_aggregation=True)
    last = results["rounds"][-1]
    assert last["clients"] == 9 and last["updates_clipped"] == 1
    start = initial_model()
    moved = math.sqrt(sum(float(np.sum((model[k] - start[k]) ** 2)) for k in start))
    assert moved <= 2.0 * 1.01  # the mean of 9 updates of norm <= 2 (within the rounding)


def test_a_resumed_run_keeps_its_accounting_and_its_summary(tmp_path: Path) -> None:
    """Stopped after round 1 and resumed: the accountant's rounds, each client's count of
    sums and results.json's secure-aggregation block come back from the checkpoint."""
    from smallfed.report.results import RoundRecord
    from smallfed.simulation import simulate

    class Stop(Exception):
        pass

    def stop_after_round_1(record: RoundRecord, _: int) -> None:
        if record.round == 1:
            raise Stop

    cfg = Config(**{**BASE, "secure_aggregation": True, "num_server_rounds": 2,
                    "privacy": "user", "dp_noise": 1.0, "dp_clip": 0.5})
    with pytest.raises(Stop):
        simulate(cfg, tmp_path, progress=False, on_round=stop_after_round_1)
    stopped = json.loads((tmp_path / "results.json").read_text())["summary"]
    results = simulate(cfg, tmp_path, progress=False, resume=True)
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2]
    privacy = results["summary"]["privacy"]
    assert privacy["rounds_accounted"] == 2 and privacy["most_rounds_of_a_client"] == 2
    assert privacy["epsilon_against_server"] > stopped["privacy"]["epsilon_against_server"]
    assert results["summary"]["secure_aggregation"]["coordinates"] == 13802


def test_too_few_survivors_fail_the_round_and_the_run_goes_on(tmp_path: Path) -> None:
    results, _, replies = run(tmp_path, "fail", drop_after("query.secagg_keys", 4),
                              secure_aggregation=True, num_server_rounds=2)
    first, second = results["rounds"][1], results["rounds"][2]
    assert first["clients"] == 0 and first["accuracy"] == results["rounds"][0]["accuracy"]
    assert second["clients"] == 5 and len(replies) == 5


def test_distributed_dp_reports_the_central_epsilon_and_the_servers(tmp_path: Path) -> None:
    dp = dict(privacy="user", num_clients=30, clients_per_round=10, num_server_rounds=2,
              dp_noise=1.0, dp_clip=0.5)
    central, _, _ = run(tmp_path, "central", **dp)
    secure, _, _ = run(tmp_path, "secure", secure_aggregation=True, **dp)
    assert secure["summary"]["epsilon"] == pytest.approx(central["summary"]["epsilon"])
    block = secure["summary"]["privacy"]
    assert block["mechanism"].startswith("distributed discrete Gaussian")
    assert block["epsilon_against_server"] > secure["summary"]["epsilon"]
    assert secure["summary"]["secure_aggregation"]["noise_std"] > 0


@pytest.mark.parametrize("changes, problem", [
    (dict(privacy="sample"), "privacy = 'sample'"),
    (dict(fraction_evaluate=0.5), "fraction-evaluate"),
    (dict(min_replies=2), "min-replies"),
    (dict(update_clip=0.0), "update-clip"),
    (dict(strategy="fedmedian"), "strategy"),
    (dict(codec="quantize:8"), "codec"),
    (dict(clients_per_round=3), "clients-per-round"),
    (dict(privacy="user", dp_clip_mode="adaptive"), "dp-clip-mode"),
])
def test_what_secure_aggregation_cannot_run_with_is_refused(changes: dict, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        Config(**{**BASE, "secure_aggregation": True, **changes})
