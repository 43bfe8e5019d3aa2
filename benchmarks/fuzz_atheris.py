"""Coverage-guided fuzzing of the payload decoder with atheris (libFuzzer for Python).

Optional: `pip install atheris`. Seeds the corpus with valid payloads of several
codecs; any exception but PayloadError, or a non-finite or misshapen result, is a
crash that libFuzzer reports with the input.

The first input byte picks the codec; when its top bit is set the rest is resealed
(its CRC-32 trailer recomputed, as a hostile client would) so that mutations reach
the parser behind the checksum instead of all stopping at it.

    python benchmarks/fuzz_atheris.py -runs=200000
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    import numpy as np

    from smallfed.codec import PayloadError, parse_codec
    from smallfed.codec.wire import CHECKSUM_BYTES, reseal

CODECS = ["topk:0.05,quantize:4,zlib", "randk:0.1,fp16", "sign", "topk:0.2,quantize:3:32",
          "topk:30:global,bf16", "none"]
RNG = np.random.default_rng(0)
UPDATE = {"a": RNG.normal(size=(8, 1, 3, 3)).astype(np.float32),
          "b": RNG.normal(size=(8,)).astype(np.float32),
          "c": RNG.normal(size=(32, 40)).astype(np.float32)}
TEMPLATE = {k: v.shape for k, v in UPDATE.items()}
CHAINS = [parse_codec(spec) for spec in CODECS]


def one_input(data: bytes) -> None:
    if not data:
        return
    codec = CHAINS[(data[0] & 0x7F) % len(CHAINS)]  # first byte picks the codec
    payload = data[1:]
    if data[0] & 0x80 and len(payload) >= CHECKSUM_BYTES:
        payload = reseal(payload)
    try:
        update = codec.decode(payload, TEMPLATE)
    except PayloadError:
        return
    assert {k: v.shape for k, v in update.items()} == TEMPLATE
    assert all(np.isfinite(v).all() for v in update.values())


def main() -> None:
    corpus = Path(tempfile.mkdtemp(prefix="smallfed-fuzz-"))
    for i, codec in enumerate(CHAINS):
        payload = codec.encode(UPDATE, seed=1)[0]
        (corpus / f"seed{i}").write_bytes(bytes([i]) + payload)
        (corpus / f"seed{i}-resealed").write_bytes(bytes([0x80 | i]) + payload)
    atheris.Setup([sys.argv[0], *sys.argv[1:], str(corpus)], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
