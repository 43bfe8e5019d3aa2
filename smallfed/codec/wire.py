"""The payload: a versioned binary format, and a decoder that trusts nothing.

Layout (format version 2; integers are LEB128 varints unless a width is given)::

    "SFU" | version u8 | flags u8 (bit 0: body is zlib) | len(spec) | spec (utf-8)
    | seed u64 little-endian | body | crc32 u32 little-endian

    body: n_tensors, then per tensor:
        ndim | dims... | dtype u8 (0 = float32)
        | index mode u8 (0 dense, 1 bitmap, 2 delta varints, 3 seeded) | count
        | [bitmap: ceil(size / 8) bytes] [varints: len(bytes), then the gaps]
        | kind u8 (0 f32, 1 f16, 2 bf16, 3 quantized, 4 sign, 5 codebook) | bits u8
        | block (quantized: values per block; codebook: its size k)
        | scales (float32; 2 per block for quantized, 1 for sign, k for codebook)
        | values (their size follows from count, kind and bits)

The spec names the stage list, so a payload says how it was made; the server
refuses one whose spec differs from the run's codec. Positions of a sparse tensor
are written the cheaper way, chosen per tensor: a bitmap (size / 8 bytes) or the
gaps between positions as varints.

Every length is checked against the bytes present and against the model the server
expects; anything off raises :class:`PayloadError` with the reason.

The checksum (new in version 2; otherwise the layout is version 1's) is the CRC-32
of every byte before it: header and body as sent (compressed, under zlib). The
decoder reads magic and version, then verifies the checksum before it parses
anything else, so a flipped bit never reaches the parser. Without it a
single flipped bit in a quantised scale or a sparse position decoded into an update
up to ~1e37 times too large. CRC-32 (``zlib.crc32``, C speed, 4 bytes, stored after
the bytes it covers as Ethernet and zip do) detects every single-bit error, every
burst of up to 32 bits, every 2-bit error in payloads up to 512 MB and every 3-bit
error up to about 11 KB, and any other corruption with probability 1 - 2**-32: the
faults of a buggy client, a bad cast or a memory error on a device (TLS already
guards the network). A cryptographic hash would detect no more of these accidents
and cost more bytes and time. A checksum is not a MAC: a hostile client simply
computes it over its forged payload, so it proves nothing about who made the update
or whether its values are sane. The server bounds those separately (the decoder's
checks here, then the server's norm bound and its other reply checks).

The version is checked before the checksum so that a payload of another smallfed
release is refused with a message that says so, not as corruption.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence

import numpy as np

from smallfed import __version__
from smallfed.codec import bits as bitcode
from smallfed.codec.stages import KINDS, TensorCode

MAGIC = b"SFU"
FORMAT_VERSION = 2
CHECKSUM_BYTES = 4  # the crc32 trailer
FLAG_ZLIB = 1
INDEX_DENSE, INDEX_BITMAP, INDEX_VARINT, INDEX_SEEDED = range(4)
VALUE_BYTES = {"f32": 4, "f16": 2, "bf16": 2}


class PayloadError(ValueError):
    """A payload that cannot be decoded into the expected update; the message says why."""


def pack(spec: str, seed: int, codes: Sequence[TensorCode], zlib_level: int | None) -> bytes:
    """The payload for ``codes``, made by the chain ``spec`` with random ``seed``."""
    body = bytearray(_varint(len(codes)))
    for code in codes:
        body += _varint(len(code.shape)) + b"".join(_varint(d) for d in code.shape)
        body.append(0)  # dtype: float32, the only one updates come in
        body += _indices(code)
        body.append(KINDS.index(code.kind))
        body.append(code.bits)
        body += _varint(code.block)
        body += code.scales.astype("<f4").tobytes()
        body += _values(code)
    flags = 0
    if zlib_level is not None:
        body, flags = bytearray(zlib.compress(bytes(body), zlib_level)), FLAG_ZLIB
    name = spec.encode()
    header = MAGIC + bytes([FORMAT_VERSION, flags]) + _varint(len(name)) + name
    return seal(bytes(header + struct.pack("<Q", seed) + body))


def seal(unsealed: bytes) -> bytes:
    """``unsealed`` followed by its CRC-32, the last step of :func:`pack`.

    Tests and fuzzers also use it to hand the parser altered payloads that pass the
    checksum, as a hostile client always can: the checksum catches accidents only.
    """
    return bytes(unsealed) + struct.pack("<I", zlib.crc32(unsealed))


def reseal(payload: bytes) -> bytes:
    """``payload`` with its last four bytes replaced by the checksum of the others."""
    return seal(payload[:-CHECKSUM_BYTES])


def unpack(payload: bytes, shapes: Sequence[tuple[int, ...]]) -> tuple[str, int, list[TensorCode]]:
    """(spec, seed, tensors) of a payload that must hold tensors of exactly ``shapes``."""
    reader = _Reader(payload)
    if reader.take(3) != MAGIC:
        raise PayloadError("not a smallfed update (bad magic bytes)")
    version = reader.take(1)[0]
    if version != FORMAT_VERSION:
        raise PayloadError(
            f"wire format version {version}; this smallfed ({__version__}) reads wire format "
            f"version {FORMAT_VERSION} only. The sender runs another smallfed version: run "
            "the same smallfed version on the server and on every client")
    if reader.remaining < CHECKSUM_BYTES + 1:
        raise PayloadError(f"truncated: {len(payload)} bytes, too short for a payload")
    covered = memoryview(payload)[:-CHECKSUM_BYTES]
    stored = struct.unpack("<I", payload[-CHECKSUM_BYTES:])[0]
    computed = zlib.crc32(covered)
    if stored != computed:
        raise PayloadError(
            f"checksum mismatch (crc32 {stored:#010x} at the end of the payload, "
            f"{computed:#010x} computed over the {len(covered)} bytes before it): the payload "
            "was truncated, corrupted or altered after it was encoded")
    reader = _Reader(covered, start=reader.pos)
    flags = reader.take(1)[0]
    if flags & ~FLAG_ZLIB:
        raise PayloadError(f"unknown flags {flags:#04x}")
    try:
        spec = reader.take(reader.varint(limit=1024)).decode()
    except UnicodeDecodeError as err:
        raise PayloadError("codec name is not UTF-8") from err
    seed = struct.unpack("<Q", reader.take(8))[0]
    body = reader.rest()
    if flags & FLAG_ZLIB:
        body = _inflate(body, limit=sum(16 * math.prod(s) + 256 for s in shapes) + 256)
    reader = _Reader(body)
    count = reader.varint(limit=2**20)
    if count != len(shapes):
        raise PayloadError(f"holds {count} tensors, the model has {len(shapes)}")
    codes = [_tensor(reader, tuple(shape), i) for i, shape in enumerate(shapes)]
    if reader.remaining:
        raise PayloadError(f"{reader.remaining} bytes left over after the last tensor")
    return spec, seed, codes


# --- writing -------------------------------------------------------------------
def _varint(n: int) -> bytes:
    """One LEB128 number; header fields are few, so plain Python beats numpy here."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _indices(code: TensorCode) -> bytes:
    if code.seeded:
        return bytes([INDEX_SEEDED]) + _varint(len(code.values))
    if code.indices is None:
        return bytes([INDEX_DENSE]) + _varint(code.size)
    gaps = bitcode.encode_varints(bitcode.indices_to_gaps(code.indices))
    as_bitmap = (code.size + 7) // 8
    head = _varint(len(code.indices))
    if as_bitmap <= len(gaps) + len(_varint(len(gaps))):
        return bytes([INDEX_BITMAP]) + head + bitcode.bitmap(code.indices, code.size)
    return bytes([INDEX_VARINT]) + head + _varint(len(gaps)) + gaps


def _values(code: TensorCode) -> bytes:
    if code.kind in ("q", "sign", "cb"):
        return bitcode.pack_codes(code.values, code.bits)
    dtype = {"f32": "<f4", "f16": "<f2", "bf16": "<u2"}[code.kind]
    return code.values.astype(dtype).tobytes()


# --- reading -------------------------------------------------------------------
class _Reader:
    """Bounds-checked reads from a byte string."""

    def __init__(self, data: bytes | memoryview, start: int = 0) -> None:
        self.data, self.pos = memoryview(data), start

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if n < 0 or n > self.remaining:
            raise PayloadError(f"truncated: needs {n} bytes at offset {self.pos}, "
                               f"{self.remaining} left")
        chunk = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return chunk

    def varint(self, limit: int) -> int:
        value, shift = 0, 0
        while True:
            byte = self.take(1)[0]
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
            if shift > 63:
                raise PayloadError(f"malformed number at offset {self.pos}")
        if value > limit:
            raise PayloadError(f"number {value} at offset {self.pos} exceeds {limit}")
        return value

    def rest(self) -> bytes:
        return self.take(self.remaining)


def _inflate(body: bytes, limit: int) -> bytes:
    """zlib-decompress at most ``limit`` bytes: a small payload cannot expand without bound."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(body, limit)
    except zlib.error as err:
        raise PayloadError(f"compressed body is corrupt ({err})") from err
    if inflater.unconsumed_tail or not inflater.eof:
        raise PayloadError("compressed body is truncated or expands past the model's size")
    if inflater.unused_data:
        raise PayloadError("bytes left over after the compressed body")
    return out


def _tensor(reader: _Reader, shape: tuple[int, ...], position: int) -> TensorCode:
    where = f"tensor {position}"
    ndim = reader.varint(limit=32)
    dims = tuple(reader.varint(limit=2**40) for _ in range(ndim))
    if dims != shape:
        raise PayloadError(f"{where}: shape {list(dims)}, the model's is {list(shape)}")
    if reader.take(1)[0] != 0:
        raise PayloadError(f"{where}: unknown dtype")
    size = math.prod(shape)
    mode = reader.take(1)[0]
    count = reader.varint(limit=size)
    indices, seeded = None, False
    try:
        if mode == INDEX_DENSE:
            if count != size:
                raise PayloadError(f"{where}: dense with {count} of {size} values")
        elif mode == INDEX_BITMAP:
            indices = bitcode.bitmap_to_indices(reader.take((size + 7) // 8), size, count)
        elif mode == INDEX_VARINT:
            raw = reader.take(reader.varint(limit=10 * size))
            indices = bitcode.gaps_to_indices(bitcode.decode_varints(raw, count), size)
        elif mode == INDEX_SEEDED:
            seeded = True
        else:
            raise PayloadError(f"{where}: unknown index mode {mode}")
        kind_code, bits = reader.take(1)[0], reader.take(1)[0]
        if kind_code >= len(KINDS):
            raise PayloadError(f"{where}: unknown value kind {kind_code}")
        kind = KINDS[kind_code]
        block = reader.varint(limit=2**32 if kind != "cb" else 256)
        blocks = -(-count // (block or max(count, 1)))
        n_scales = {"q": 2 * blocks, "sign": 1, "cb": block}.get(kind, 0)
        scales = np.frombuffer(reader.take(4 * n_scales), dtype="<f4").astype(np.float32)
        values = _read_values(reader, kind, bits, count, where)
    except ValueError as err:  # the bit-level decoders' complaints
        if isinstance(err, PayloadError):
            raise
        raise PayloadError(f"{where}: {err}") from err
    if not np.isfinite(scales).all():
        raise PayloadError(f"{where}: scales hold NaN or infinity")
    return TensorCode(shape=shape, values=values, indices=indices, seeded=seeded, kind=kind,
                      bits=bits, block=block, scales=scales)


def _read_values(reader: _Reader, kind: str, bits: int, count: int, where: str) -> np.ndarray:
    if kind in ("q", "sign", "cb"):
        if not 1 <= bits <= 8 or (kind == "sign" and bits != 1):
            raise PayloadError(f"{where}: {bits} bits is not valid for {kind} values")
        return bitcode.unpack_codes(reader.take((count * bits + 7) // 8), count, bits)
    dtype = {"f32": "<f4", "f16": "<f2", "bf16": "<u2"}[kind]
    values = np.frombuffer(reader.take(VALUE_BYTES[kind] * count), dtype=dtype)
    return values.astype({"f32": np.float32, "f16": np.float16, "bf16": np.uint16}[kind])
