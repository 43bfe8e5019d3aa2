"""Bit-level encodings in numpy: b-bit packing, LEB128 varints, bitmaps.

numpy has ``packbits`` for single bits but nothing for b-bit codes or varints, and
the update must be encoded in milliseconds on a phone-class CPU, so these are
vectorised rather than written as Python loops. Every decoder checks its input and
raises ``ValueError`` on malformed bytes; the wire format turns that into a
``PayloadError``.
"""

from __future__ import annotations

import numpy as np


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Pack integer codes in [0, 2**bits) into ``bits`` bits each (big-endian bit order)."""
    if bits > 8:
        return _pack_wide(codes, bits)
    codes = np.asarray(codes, dtype=np.uint8)
    if bits == 8:
        return codes.tobytes()
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, shifts beat bit planes
        per = 8 // bits
        padded = np.zeros(-(-len(codes) // per) * per, dtype=np.uint8)
        padded[: len(codes)] = codes
        shifts = np.arange(8 - bits, -1, -bits, dtype=np.uint8)
        return np.bitwise_or.reduce(padded.reshape(-1, per) << shifts, axis=1).astype(
            np.uint8).tobytes()
    planes = np.unpackbits(codes[:, None], axis=1)[:, 8 - bits :]
    return np.packbits(planes.reshape(-1)).tobytes()


def unpack_codes(data: bytes, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_codes` for ``count`` codes."""
    needed = (count * bits + 7) // 8
    if len(data) != needed:
        raise ValueError(f"{count} codes of {bits} bits need {needed} bytes, got {len(data)}")
    if bits > 8:
        return _unpack_wide(data, count, bits)
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return raw.copy()
    if 8 % bits == 0:
        shifts = np.arange(8 - bits, -1, -bits, dtype=np.uint8)
        mask = np.uint8((1 << bits) - 1)
        return ((raw[:, None] >> shifts) & mask).reshape(-1)[:count]
    flat = np.unpackbits(raw)[: count * bits].reshape(count, bits)
    padded = np.zeros((count, 8), dtype=np.uint8)
    padded[:, 8 - bits :] = flat
    return np.packbits(padded, axis=1).reshape(-1)


def _pack_wide(codes: np.ndarray, bits: int) -> bytes:
    """Codes of 9 to 64 bits (secure aggregation's integers), same bit order as below 8."""
    values = np.asarray(codes, dtype=np.uint64)
    if bits in (16, 32, 64):
        return values.astype(f">u{bits // 8}").tobytes()
    planes = np.unpackbits(values.astype(">u8").view(np.uint8).reshape(-1, 8), axis=1)
    return np.packbits(planes[:, 64 - bits:].reshape(-1)).tobytes()


def _unpack_wide(data: bytes, count: int, bits: int) -> np.ndarray:
    if bits in (16, 32, 64):
        return np.frombuffer(data, dtype=f">u{bits // 8}").astype(np.uint64)
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: count * bits].reshape(count, bits)
    padded = np.zeros((count, 64), dtype=np.uint8)
    padded[:, 64 - bits:] = flat
    return np.packbits(padded, axis=1).view(">u8").reshape(-1).astype(np.uint64)


def encode_varints(values: np.ndarray) -> bytes:
    """Unsigned LEB128: 7 bits a byte, high bit set on every byte but a number's last."""
    values = np.asarray(values, dtype=np.uint64)
    if values.size == 0:
        return b""
    lengths = np.ones(values.shape, dtype=np.int64)
    for k in range(1, 10):
        lengths += values >= (np.uint64(1) << np.uint64(7 * k))
    out = np.empty(int(lengths.sum()), dtype=np.uint8)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    for k in range(int(lengths.max())):
        has = lengths > k
        chunk = (values[has] >> np.uint64(7 * k)) & np.uint64(0x7F)
        more = (lengths[has] > k + 1).astype(np.uint8) << 7
        out[starts[has] + k] = chunk.astype(np.uint8) | more
    return out.tobytes()


def decode_varints(data: bytes, count: int) -> np.ndarray:
    """Exactly ``count`` LEB128 numbers from ``data``, which must hold nothing else."""
    raw = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(raw < 0x80)
    if len(ends) != count or (count and ends[-1] != len(raw) - 1) or (not count and len(raw)):
        raise ValueError(f"expected {count} varints in {len(raw)} bytes, found {len(ends)}")
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if count and lengths.max() > 9:
        raise ValueError("varint longer than 9 bytes")
    values = np.zeros(count, dtype=np.uint64)
    for k in range(int(lengths.max()) if count else 0):
        has = lengths > k
        values[has] |= (raw[starts[has] + k].astype(np.uint64) & np.uint64(0x7F)) << np.uint64(7 * k)
    return values


def indices_to_gaps(indices: np.ndarray) -> np.ndarray:
    """Sorted unique positions -> first position, then distance minus one to each next."""
    gaps = np.diff(indices, prepend=-1) - 1
    return gaps.astype(np.uint64)


def gaps_to_indices(gaps: np.ndarray, size: int) -> np.ndarray:
    if len(gaps) and gaps.max() >= size:
        raise ValueError(f"a gap of {int(gaps.max())} does not fit a tensor of {size} values")
    indices = np.cumsum(gaps.astype(np.int64) + 1) - 1
    if len(indices) and indices[-1] >= size:
        raise ValueError(f"index {int(indices[-1])} is outside a tensor of {size} values")
    return indices


def bitmap(indices: np.ndarray, size: int) -> bytes:
    mask = np.zeros(size, dtype=np.uint8)
    mask[indices] = 1
    return np.packbits(mask).tobytes()


def bitmap_to_indices(data: bytes, size: int, count: int) -> np.ndarray:
    if len(data) != (size + 7) // 8:
        raise ValueError(f"a bitmap of {size} positions needs {(size + 7) // 8} bytes, got {len(data)}")
    mask = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    if mask[size:].any():
        raise ValueError("bitmap has bits set past the tensor's end")
    indices = np.flatnonzero(mask[:size])
    if len(indices) != count:
        raise ValueError(f"bitmap marks {len(indices)} positions, header says {count}")
    return indices
