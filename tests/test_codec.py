"""Codec stages, chains and the wire format: error bounds, exact sizes, hostile payloads."""

from __future__ import annotations

import math
import re
import struct
import zlib

import numpy as np
import pytest

from smallfed.codec import CodecError, PayloadError, chain, parse_codec
from smallfed.codec.bits import decode_varints, encode_varints, pack_codes, unpack_codes
from smallfed.codec.wire import (
    CHECKSUM_BYTES, FORMAT_VERSION, INDEX_BITMAP, INDEX_VARINT, _indices, reseal, seal)
from smallfed.codec.stages import TensorCode

RNG = np.random.default_rng(1234)
UPDATE = {
    "conv.weight": RNG.normal(0, 0.1, (16, 1, 3, 3)).astype(np.float32),
    "conv.bias": RNG.normal(0, 0.1, (16,)).astype(np.float32),
    "fc.weight": RNG.normal(0, 0.1, (64, 200)).astype(np.float32),
}
TEMPLATE = {k: v.shape for k, v in UPDATE.items()}


def roundtrip(spec: str, update: dict = UPDATE, seed: int = 0) -> tuple[bytes, dict]:
    codec = parse_codec(spec)
    payload, _ = codec.encode(update, seed=seed)
    return payload, codec.decode(payload, {k: v.shape for k, v in update.items()})


def test_dense_fp32_is_exact() -> None:
    _, decoded = roundtrip("none")
    assert all(np.array_equal(decoded[k], UPDATE[k]) for k in UPDATE)


@pytest.mark.parametrize(("spec", "bound"), [("fp16", 2**-11), ("bf16", 2**-8)])
def test_16_bit_floats_within_their_relative_error(spec: str, bound: float) -> None:
    _, decoded = roundtrip(spec)
    for k, x in UPDATE.items():
        assert np.all(np.abs(decoded[k] - x) <= bound * np.abs(x) + 2**-25)  # + subnormals


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("block", [0, 64])
def test_quantize_within_one_level(bits: int, block: int) -> None:
    spec = f"quantize:{bits}" + (f":{block}" if block else "")
    _, decoded = roundtrip(spec)
    for k, x in UPDATE.items():
        flat, out = x.reshape(-1), decoded[k].reshape(-1)
        size = block or len(flat)
        for start in range(0, len(flat), size):
            chunk = flat[start : start + size]
            step = (chunk.max() - chunk.min()) / (2**bits - 1)
            assert np.all(np.abs(out[start : start + size] - chunk) <= step * (1 + 1e-5) + 1e-7)
            assert out[start : start + size].min() >= chunk.min() - 1e-6  # stays in [lo, hi]


def test_stochastic_quantization_is_unbiased() -> None:
    """Mean of N independent 2-bit encodings -> x, within 5 standard errors for every value.

    Each decoded value is one of the two levels around x, so its variance is at most
    step**2 / 4 and the mean of N has standard error at most step / (2 sqrt(N)).
    """
    x = {"w": RNG.uniform(-1, 1, 500).astype(np.float32)}
    codec, n = parse_codec("quantize:2"), 400
    total = np.zeros(500)
    for seed in range(n):
        payload, _ = codec.encode(x, seed=seed)
        total += codec.decode(payload, {"w": (500,)})["w"]
    step = (x["w"].max() - x["w"].min()) / 3
    assert np.max(np.abs(total / n - x["w"])) <= 5 * step / (2 * math.sqrt(n))
    deterministic = np.round((x["w"] - x["w"].min()) / step) * step + x["w"].min()
    assert np.max(np.abs(total / n - x["w"])) < np.max(np.abs(deterministic - x["w"]))


def test_sign_sends_sign_times_mean_magnitude() -> None:
    _, decoded = roundtrip("sign")
    for k, x in UPDATE.items():
        expected = np.where(x >= 0, 1, -1) * np.abs(x).mean()
        assert np.allclose(decoded[k], expected, rtol=1e-6)


@pytest.mark.parametrize("amount", ["0.05", "7"])
def test_topk_keeps_exactly_the_largest_entries(amount: str) -> None:
    _, decoded = roundtrip(f"topk:{amount}")
    for k, x in UPDATE.items():
        k_kept = int(amount) if "." not in amount else math.ceil(float(amount) * x.size)
        largest = set(np.argsort(-np.abs(x.reshape(-1)))[:k_kept])
        kept = set(np.flatnonzero(decoded[k].reshape(-1)))
        assert kept == largest
        assert np.array_equal(decoded[k].reshape(-1)[list(kept)], x.reshape(-1)[list(kept)])


def test_global_topk_ranks_all_tensors_together() -> None:
    _, decoded = roundtrip("topk:0.02:global")
    flat = np.concatenate([v.reshape(-1) for v in UPDATE.values()])
    k = math.ceil(0.02 * flat.size)
    threshold = np.sort(np.abs(flat))[-k]
    kept = np.concatenate([v.reshape(-1) for v in decoded.values()])
    assert np.count_nonzero(kept) == k
    assert np.all(np.abs(kept[kept != 0]) >= threshold)


def test_randk_sends_no_positions_and_the_server_finds_them() -> None:
    payload_r, decoded = roundtrip("randk:0.05", seed=9)
    payload_t, _ = roundtrip("topk:0.05", seed=9)
    assert len(payload_r) < len(payload_t)  # values only, no positions
    for k, x in UPDATE.items():
        kept = np.flatnonzero(decoded[k].reshape(-1))
        assert len(kept) == math.ceil(0.05 * x.size)
        assert np.array_equal(decoded[k].reshape(-1)[kept], x.reshape(-1)[kept])
    _, other = roundtrip("randk:0.05", seed=10)
    assert not np.array_equal(np.flatnonzero(other["fc.weight"]), np.flatnonzero(decoded["fc.weight"]))


def test_payload_size_is_the_formula() -> None:
    """fp16, dense: header + per tensor (ndim, dims, dtype, mode, count, kind, bits, block)
    + 2n, + the 4-byte checksum."""
    payload, _ = roundtrip("fp16")

    def varint_len(n: int) -> int:
        return len(encode_varints(np.array([n], dtype=np.uint64)))

    header = 3 + 1 + 1 + varint_len(4) + len("fp16") + 8
    body = varint_len(len(UPDATE))
    for x in UPDATE.values():
        body += varint_len(x.ndim) + sum(varint_len(d) for d in x.shape)
        body += 1 + 1 + varint_len(x.size) + 1 + 1 + varint_len(0) + 2 * x.size
    assert len(payload) == header + body + CHECKSUM_BYTES


def test_sparse_positions_take_the_cheaper_form() -> None:
    dense_ish = TensorCode(shape=(1000,), values=np.ones(600, np.float32),
                           indices=np.sort(
                               RNG.choice(1000, 600, replace=False)))
    sparse = TensorCode(shape=(100000,), values=np.ones(10, np.float32),
                        indices=np.sort(RNG.choice(100000, 10, replace=False)))
    assert _indices(dense_ish)[0] == INDEX_BITMAP
    assert _indices(sparse)[0] == INDEX_VARINT
    assert len(_indices(sparse)) < 40  # about 3 bytes a position, not 12.5 KB of bitmap


@pytest.mark.parametrize("spec", ["topk:0.01,quantize:2,error_feedback",
                                  "topk:0.05,cluster:3,error_feedback"])
def test_error_feedback_loses_nothing_over_rounds(spec: str) -> None:
    """sum of what was sent + the final residual == sum of the true updates."""
    codec = parse_codec(spec)
    residual, sent_total = None, {k: np.zeros_like(v) for k, v in UPDATE.items()}
    for step in range(6):
        update = {k: v * (1 + step) for k, v in UPDATE.items()}
        payload, residual = codec.encode(update, seed=step, residual=residual)
        sent = codec.decode(payload, TEMPLATE)
        sent_total = {k: sent_total[k] + sent[k] for k in sent}
    for k, v in UPDATE.items():
        assert np.allclose(sent_total[k] + residual[k], v * sum(range(1, 7)), atol=1e-4)
    assert parse_codec("topk:0.01").encode(UPDATE, seed=0)[1] is None  # no state without EF


def test_compressed_chain_beats_100x() -> None:
    payload, _ = roundtrip("topk:0.01,quantize:4,error_feedback")
    dense = sum(v.nbytes for v in UPDATE.values())
    assert dense / len(payload) > 100


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("quantize:4,topk:0.1", "sparsify first"),
        ("topk:0.1,randk:0.1", "both choose which values to send"),
        ("fp16,quantize:4", "both code the values"),
        ("zlib,topk:0.1", "must come last"),
        ("error_feedback", "needs a lossy stage"),
        ("topk:0.1,error_feedback,ef", "appears twice"),
        ("quantize:0", "from 1 to 8"),
        ("topk:2.5", "fraction in (0, 1) or a whole count"),
        ("randk:1.5", "fraction in (0, 1)"),
        ("gzip", "is not known"),
        ("topk:0.1;quantize:4", "stages are separated by commas"),
        ("topk", "write it as topk:A[:global]"),
        ("quantize:four", "'four' is not a whole number; write it as quantize:B[:N]"),
        ("zlib:10", "write it as zlib[:L], L a level 0..9"),
    ],
)
def test_invalid_chains_are_refused_when_built(spec: str, message: str) -> None:
    with pytest.raises(CodecError, match=re.escape(message)):
        parse_codec(spec)


def test_chain_accepts_stage_objects_and_reports_its_spec() -> None:
    from smallfed.codec import Quantize, TopK

    built = chain(TopK(0.01), Quantize(4), "error_feedback", "zlib:9")
    assert built.spec == "topk:0.01,quantize:4,error_feedback,zlib:9"
    assert parse_codec(built.spec).spec == built.spec


# --- hostile payloads ------------------------------------------------------------
GOOD, _ = roundtrip("topk:0.05,quantize:4,zlib")
CODEC = parse_codec("topk:0.05,quantize:4,zlib")


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (GOOD[:-7], "checksum mismatch"),
        (reseal(GOOD[:-7]), "truncated"),
        (b"XYZ" + GOOD[3:], "bad magic"),
        (GOOD[:3] + bytes([9]) + GOOD[4:], "format version 9"),
        (GOOD + b"\x00", "checksum mismatch"),
        (seal(GOOD[:-CHECKSUM_BYTES] + b"\x00"), "left over"),
        (b"", "truncated"),
        (GOOD[:6], "truncated"),
    ],
)
def test_broken_payloads_are_rejected_with_a_reason(payload: bytes, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        CODEC.decode(payload, TEMPLATE)


def test_payload_of_another_codec_or_model_is_rejected() -> None:
    with pytest.raises(PayloadError, match="encoded with codec 'topk:0.05,quantize:4,zlib:6'"):
        parse_codec("topk:0.01,quantize:4,zlib").decode(GOOD, TEMPLATE)
    with pytest.raises(PayloadError, match=r"shape \[16, 1, 3, 3\], the model's is \[8, 1, 3, 3\]"):
        CODEC.decode(GOOD, {**TEMPLATE, "conv.weight": (8, 1, 3, 3)})
    with pytest.raises(PayloadError, match="holds 3 tensors, the model has 2"):
        CODEC.decode(GOOD, {"conv.weight": (16, 1, 3, 3), "conv.bias": (16,)})


def test_nan_and_zip_bombs_are_rejected() -> None:
    bad = {**UPDATE, "conv.bias": np.full(16, np.nan, np.float32)}
    payload, _ = parse_codec("fp16").encode(bad, seed=0)
    with pytest.raises(PayloadError, match="conv.bias: decodes to NaN or infinity"):
        parse_codec("fp16").decode(payload, TEMPLATE)
    spec = b"zlib:6"
    bomb = seal(b"SFU" + bytes([FORMAT_VERSION, 1, len(spec)]) + spec + struct.pack("<Q", 0)
                + zlib.compress(b"\x00" * 10_000_000))
    with pytest.raises(PayloadError, match="expands past the model's size"):
        parse_codec("zlib").decode(bomb, TEMPLATE)


def test_bit_packing_and_varints_round_trip() -> None:
    for bits in range(1, 9):
        codes = RNG.integers(0, 2**bits, 1001).astype(np.uint8)
        assert np.array_equal(unpack_codes(pack_codes(codes, bits), 1001, bits), codes)
    numbers = np.array([0, 1, 127, 128, 16383, 16384, 2**40], dtype=np.uint64)
    assert np.array_equal(decode_varints(encode_varints(numbers), len(numbers)), numbers)
    with pytest.raises(ValueError, match="expected 8 varints"):
        decode_varints(encode_varints(numbers), 8)


def test_empty_tensors_pass_through_every_chain() -> None:
    update = {"empty": np.zeros((0, 4), np.float32), "w": np.ones(10, np.float32)}
    for spec in ("topk:0.5", "randk:0.5", "quantize:4", "sign", "topk:3:global,fp16", "cluster:4"):
        _, decoded = roundtrip(spec, update)
        assert decoded["empty"].shape == (0, 4)


def test_cluster_payload_is_indices_plus_codebook() -> None:
    """cluster:k, dense: per tensor k float32 shared values + ceil(log2 k)-bit indices."""
    for k in (2, 3, 16, 256):
        spec = f"cluster:{k}"
        payload, decoded = roundtrip(spec)
        bits = max(1, math.ceil(math.log2(k)))

        def varint_len(n: int) -> int:
            return len(encode_varints(np.array([n], dtype=np.uint64)))

        header = 3 + 1 + 1 + varint_len(len(spec)) + len(spec) + 8
        body = varint_len(len(UPDATE))
        for x in UPDATE.values():
            body += varint_len(x.ndim) + sum(varint_len(d) for d in x.shape)
            body += 1 + 1 + varint_len(x.size) + 1 + 1 + varint_len(k)
            body += 4 * k + (x.size * bits + 7) // 8
        assert len(payload) == header + body + CHECKSUM_BYTES
        for name, values in decoded.items():  # only codebook values come out
            assert len(np.unique(values)) <= k


def test_cluster_beats_uniform_levels_of_the_same_bits() -> None:
    """k-means puts levels where the values are: lower error than 4-bit uniform levels."""
    _, clustered = roundtrip("cluster:16")
    _, uniform = roundtrip("quantize:4")
    error = {name: sum(float(np.sum((d[k] - UPDATE[k]) ** 2)) for k in UPDATE)
             for name, d in (("cluster", clustered), ("uniform", uniform))}
    assert error["cluster"] < 0.5 * error["uniform"]


def test_cluster_index_outside_the_codebook_is_rejected() -> None:
    update = {"w": np.arange(8, dtype=np.float32)}
    codec = parse_codec("cluster:3")  # 2-bit indices: the value 3 fits the bits, not k
    payload, _ = codec.encode(update, seed=0)
    forged = seal(payload[:-CHECKSUM_BYTES - 2] + bytes([0xFF, 0xFF]))
    with pytest.raises(PayloadError, match="outside a codebook of 3"):
        codec.decode(forged, {"w": (8,)})


# --- the checksum ------------------------------------------------------------------
# A real update of about 10k values: the payloads are small (a few hundred bytes), so
# every one of their bits is flipped, one at a time.
FLIP_RNG = np.random.default_rng(2024)
FLIP_UPDATE = {"w": FLIP_RNG.normal(0, 0.01, (100, 80)).astype(np.float32),
               "b": FLIP_RNG.normal(0, 0.01, (2000,)).astype(np.float32)}
FLIP_TEMPLATE = {k: v.shape for k, v in FLIP_UPDATE.items()}


@pytest.mark.parametrize("spec", ["topk:0.01,quantize:4", "topk:0.01:global,sign",
                                  "topk:0.01,quantize:4,error_feedback,zlib"])
def test_every_single_bit_flip_is_refused(spec: str) -> None:
    codec = parse_codec(spec)
    payload, _ = codec.encode(FLIP_UPDATE, seed=5)
    codec.decode(payload, FLIP_TEMPLATE)  # the intact payload decodes
    reasons = set()
    for bit in range(8 * len(payload)):
        flipped = bytearray(payload)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(PayloadError) as refused:
            codec.decode(bytes(flipped), FLIP_TEMPLATE)
        reasons.add(str(refused.value).split(" (")[0].split(";")[0])
    # Magic and version bits have their own reasons; every other bit is the checksum's.
    assert reasons == {"checksum mismatch", "not a smallfed update",
                       *{f"wire format version {FORMAT_VERSION ^ (1 << i)}" for i in range(8)}}


def test_the_checksum_is_verified_before_the_header_is_parsed() -> None:
    """A bit flipped in the flags, the codec name or the seed: checksum, not another reason."""
    payload, _ = parse_codec("topk:0.01,quantize:4").encode(FLIP_UPDATE, seed=5)
    for at in (4, 5, 6, 12):  # flags, len(spec), spec, seed
        broken = payload[:at] + bytes([payload[at] ^ 0x80]) + payload[at + 1 :]
        with pytest.raises(PayloadError, match="^checksum mismatch"):
            parse_codec("topk:0.01,quantize:4").decode(broken, FLIP_TEMPLATE)


def test_an_old_version_payload_is_refused_with_both_versions_and_the_fix() -> None:
    """Version 1 had the same layout without the checksum trailer."""
    payload, _ = parse_codec("topk:0.01,quantize:4").encode(FLIP_UPDATE, seed=5)
    old = payload[:3] + bytes([1]) + payload[4:-CHECKSUM_BYTES]
    with pytest.raises(PayloadError) as refused:
        parse_codec("topk:0.01,quantize:4").decode(old, FLIP_TEMPLATE)
    message = str(refused.value)
    assert message.startswith("wire format version 1; this smallfed (")
    assert f"reads wire format version {FORMAT_VERSION} only" in message
    assert "run the same smallfed version on the server and on every client" in message


def test_the_checksum_costs_four_bytes_and_the_payload_still_round_trips() -> None:
    codec = parse_codec("topk:0.01,quantize:4")
    payload, _ = codec.encode(FLIP_UPDATE, seed=5)
    assert zlib.crc32(payload[:-CHECKSUM_BYTES]).to_bytes(4, "little") == payload[-4:]
    assert reseal(payload) == payload and CHECKSUM_BYTES == 4
    decoded = codec.decode(payload, FLIP_TEMPLATE)
    for name, x in FLIP_UPDATE.items():
        kept = np.flatnonzero(decoded[name])
        assert len(kept) == math.ceil(0.01 * x.size)
        assert set(kept) == set(np.argsort(-np.abs(x.reshape(-1)))[: len(kept)])
