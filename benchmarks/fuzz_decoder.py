"""Fuzz the payload decoder at volume: random bytes and mutated valid payloads.

The property is the one tests/test_codec_fuzz.py checks with hypothesis: the decoder
returns finite tensors of the model's shapes or raises PayloadError; any other
exception is a bug and is printed with the input that caused it.

Payloads end with a CRC-32 of their other bytes. Three in four mutated payloads are
resealed (their checksum recomputed, as a hostile client would) so that they reach
the parser; the fourth must be refused, and one that decodes is counted as a miss.
Random byte strings are half raw, half given a valid magic, version and checksum.

    python benchmarks/fuzz_decoder.py [--inputs 200000] [--seed 0]
    python benchmarks/fuzz_decoder.py --quick     # 5,000 inputs, a few seconds
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from smallfed.codec import PayloadError, parse_codec
from smallfed.codec.wire import FORMAT_VERSION, MAGIC, reseal, seal

CODECS = ["topk:0.05,quantize:4,zlib", "randk:0.1,fp16", "sign", "topk:0.2,quantize:3:32",
          "topk:30:global,bf16", "topk:0.01,quantize:4,error_feedback", "none"]


def mutate(payload: bytes, rng: np.random.Generator) -> bytes:
    data = bytearray(payload)
    for _ in range(int(rng.integers(1, 5))):
        at = int(rng.integers(0, len(data) + 1))
        action = rng.integers(0, 4)
        if action == 0 and at < len(data):
            data[at] ^= 1 << int(rng.integers(0, 8))
        elif action == 1:
            del data[at : at + int(rng.integers(1, 17))]
        elif action == 2:
            data[at:at] = rng.bytes(int(rng.integers(1, 9)))
        elif at < len(data):
            data[at] = int(rng.integers(0, 256))
    return bytes(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=200_000)
    parser.add_argument("--quick", action="store_true", help="5,000 inputs, not written out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/fuzz_decoder.json")
    args = parser.parse_args()
    if args.quick:
        args.inputs = 5_000
    rng = np.random.default_rng(args.seed)
    update = {"a": rng.normal(size=(8, 1, 3, 3)).astype(np.float32),
              "b": rng.normal(size=(8,)).astype(np.float32),
              "c": rng.normal(size=(32, 40)).astype(np.float32)}
    template = {k: v.shape for k, v in update.items()}
    codecs = {spec: parse_codec(spec) for spec in CODECS}
    payloads = {spec: c.encode(update, seed=1)[0] for spec, c in codecs.items()}
    counts = {"inputs": 0, "rejected": 0, "rejected_by_checksum": 0, "decoded": 0,
              "unsealed_mutations": 0, "unsealed_missed": 0, "bugs": 0}
    start = time.perf_counter()
    for i in range(args.inputs):
        spec = CODECS[i % len(CODECS)]
        unsealed = False
        if i % 5 == 0:
            data = rng.bytes(int(rng.integers(0, 400)))
            if i % 10 == 0:
                data = seal(MAGIC + bytes([FORMAT_VERSION]) + data)
        else:
            data = mutate(payloads[spec], rng)
            unsealed = i % 4 == 0 and data != payloads[spec]
            if not unsealed and len(data) >= 4:
                data = reseal(data)
        counts["inputs"] += 1
        counts["unsealed_mutations"] += unsealed
        try:
            out = codecs[spec].decode(data, template)
            assert {k: v.shape for k, v in out.items()} == template
            assert all(np.isfinite(v).all() for v in out.values())
            counts["decoded"] += 1
            counts["unsealed_missed"] += unsealed
        except PayloadError as err:
            counts["rejected"] += 1
            counts["rejected_by_checksum"] += str(err).startswith("checksum mismatch")
        except Exception as err:  # noqa: BLE001 - finding these is the point
            counts["bugs"] += 1
            print(f"BUG with {spec!r}: {type(err).__name__}: {err}\n  input: {data.hex()}")
    counts["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(counts))
    if not args.quick:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(counts, indent=2) + "\n")
    if counts["bugs"] or counts["unsealed_missed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
