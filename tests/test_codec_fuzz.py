"""Fuzzing the decoder: whatever bytes arrive, it returns a valid update or a PayloadError.

Hypothesis draws random byte strings and mutations (bit flips, cuts, insertions) of
valid payloads of several codecs; ``derandomize`` makes the run repeatable.
benchmarks/fuzz_decoder.py runs the same property on many more inputs.

The payload ends with a CRC-32 of its other bytes, so a mutated payload stops at the
checksum. A hostile client recomputes it, so most inputs here are resealed (their
checksum made valid again) to reach the parser behind it; the others must be refused.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smallfed.codec import PayloadError, parse_codec
from smallfed.codec.wire import FORMAT_VERSION, MAGIC, reseal, seal

RNG = np.random.default_rng(7)
UPDATE = {
    "a": RNG.normal(size=(8, 1, 3, 3)).astype(np.float32),
    "b": RNG.normal(size=(8,)).astype(np.float32),
    "c": RNG.normal(size=(32, 40)).astype(np.float32),
}
TEMPLATE = {k: v.shape for k, v in UPDATE.items()}
CODECS = ["topk:0.05,quantize:4,zlib", "randk:0.1,fp16", "sign", "topk:0.2,quantize:3:32",
          "topk:30:global,bf16", "topk:0.1,cluster:3", "cluster:16", "none"]
PAYLOADS = {spec: parse_codec(spec).encode(UPDATE, seed=1)[0] for spec in CODECS}
FUZZ = settings(max_examples=300, deadline=None, derandomize=True)


def decodes_or_rejects(spec: str, payload: bytes) -> None:
    """The property: a PayloadError, or finite tensors of exactly the model's shapes."""
    try:
        update = parse_codec(spec).decode(payload, TEMPLATE)
    except PayloadError:
        return
    assert {k: v.shape for k, v in update.items()} == TEMPLATE
    assert all(np.isfinite(v).all() and v.dtype == np.float32 for v in update.values())


@FUZZ
@given(spec=st.sampled_from(CODECS), payload=st.binary(max_size=400))
def test_random_bytes(spec: str, payload: bytes) -> None:
    decodes_or_rejects(spec, payload)


@FUZZ
@given(spec=st.sampled_from(CODECS), payload=st.binary(max_size=400))
def test_random_bytes_behind_a_valid_header_and_checksum(spec: str, payload: bytes) -> None:
    decodes_or_rejects(spec, seal(MAGIC + bytes([FORMAT_VERSION]) + payload))


@FUZZ
@given(spec=st.sampled_from(CODECS), data=st.data(), hostile=st.booleans())
def test_mutated_payloads(spec: str, data: st.DataObject, hostile: bool) -> None:
    payload = bytearray(PAYLOADS[spec])
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "cut", "insert", "set"]))
        at = data.draw(st.integers(0, len(payload)))
        if action == "flip" and at < len(payload):
            payload[at] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "cut":
            del payload[at : at + data.draw(st.integers(1, 16))]
        elif action == "insert":
            payload[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif at < len(payload):
            payload[at] = data.draw(st.integers(0, 255))
    if hostile and len(payload) >= 4:
        decodes_or_rejects(spec, reseal(bytes(payload)))
    elif bytes(payload) != PAYLOADS[spec]:  # an accident: the checksum refuses it
        with pytest.raises(PayloadError):
            parse_codec(spec).decode(bytes(payload), TEMPLATE)


def test_valid_payloads_decode() -> None:
    for spec, payload in PAYLOADS.items():
        parse_codec(spec).decode(payload, TEMPLATE)
