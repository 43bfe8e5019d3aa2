"""The stages of an update codec. Each turns a list of :class:`TensorCode` into another.

A stage is small and does one thing (optax's transforms are the model): ``encode``
takes the tensors and an explicit random generator, ``decode`` undoes what can be
undone (dequantise, widen 16-bit floats, regenerate seeded indices). Sparsifiers keep
values and their positions; the chain turns the result back into dense tensors.

Error bounds, per value kept (``x`` the input, ``x'`` the decoded value):

* ``fp16``: relative error at most 2**-11 in fp16's normal range; ``bf16``: 2**-8.
* ``quantize:b``: ``|x' - x| <= (hi - lo) / (2**b - 1)`` for the block's range
  [lo, hi], and ``E[x'] = x`` (stochastic rounding is unbiased).
* ``sign``: ``x' = sign(x) * mean|x|`` over the tensor (biased; use error feedback).
* ``cluster:k``: ``x'`` is the nearest of the tensor's k shared values (1-D k-means:
  each value moves to its cluster's mean; biased, use error feedback).
* ``topk`` / ``randk``: kept values exact, dropped ones zero (use error feedback).

Every stage class registers itself under its codec-string name
(:func:`register_stage`), so a stage of your own, in your own module, is one class
(see :class:`Stage` for the contract).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

import numpy as np

KINDS = ("f32", "f16", "bf16", "q", "sign", "cb")


@dataclass
class TensorCode:
    """One tensor on its way through the chain: its kept values and where they go."""

    shape: tuple[int, ...]
    values: np.ndarray
    indices: np.ndarray | None = None  # flat positions of ``values``; None means dense
    seeded: bool = False  # positions follow from the payload's seed (randk): not sent
    kind: str = "f32"  # how ``values`` are stored: one of KINDS
    bits: int = 32  # quantize: bits per code
    block: int = 0  # quantize: values per scale block (0: the whole tensor); cluster: k
    scales: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def count(self) -> int:
        """How many values are kept."""
        return self.size if self.indices is None and not self.seeded else len(self.values)

    def dense(self) -> np.ndarray:
        """The full float32 tensor (zeros where nothing was kept)."""
        if self.kind != "f32":
            raise ValueError(f"cannot densify {self.kind} values; decode them first")
        if self.indices is None:
            return self.values.reshape(self.shape)
        out = np.zeros(self.size, dtype=np.float32)
        out[self.indices] = self.values
        return out.reshape(self.shape)


class Stage:
    """One step of a codec chain; subclass it and :func:`register_stage` it to add one.

    The contract a stage keeps, since the wire format (:mod:`smallfed.codec.wire`)
    carries only what a :class:`TensorCode` holds:

    * ``encode`` returns one TensorCode per input, same order and ``shape`` (the
      server checks shapes against its model). It may drop values (``indices``:
      sorted unique flat positions; or ``seeded=True``, positions that ``decode``
      regenerates from ``seed``, not sent) and store them as one of ``KINDS``:
      ``f32`` (float32), ``f16`` (float16), ``bf16`` (uint16 bit patterns), ``q``
      (uint8 codes of ``bits`` 1..8, ``block`` values per scale block or 0 for one
      block, two float32 ``scales`` lo/hi per block), ``sign`` (1-bit codes, one
      scale) or ``cb`` (codes of ``bits`` bits into ``block`` <= 256 float32 ``scales``).
      Nothing else reaches the server: parameters a decoder needs go in the stage's
      ``spec`` (the server builds its chain from the same codec string) or in ``scales``.
    * ``decode`` undoes ``encode`` from that alone (and ``seed``), ending in ``f32``.
    * ``check`` says why tensors read from the wire cannot be this stage's output,
      so ``decode`` can trust their layout (a client may be hostile).
    * ``role`` places it in the chain: ``"transform"`` changes float32 values and
      keeps them float32 (clip, scale, rotate); ``"sparsify"`` chooses values
      (at most one); ``"values"`` changes how they are stored (at most one, and
      the last stage). ``lossy`` says whether error feedback has anything to correct.
    * ``downlink``: whether it may code the model the server broadcasts, the whole
      model rather than a delta. Sparsifiers and sign would destroy it: False by
      default, so a new stage is refused there until it says otherwise.
    * ``from_args`` builds the stage from the words after its name in the codec
      string (``"clip:1.5"`` gives ``["1.5"]``); ``usage`` is that form, for errors.
    * It keeps no state between calls (randomness comes from ``rng`` and ``seed``):
      a parsed chain is cached and shared by every client in a process.
    * It sees the update and nothing else, which keeps privacy intact: under
      user-level DP the server clips every decoded update (the bound holds whatever
      a stage does to the norm); under DP-SGD the update is already private and a
      stage is post-processing.
    """

    name: str = ""  # set by register_stage
    usage: str = ""  # the written form, e.g. "topk:A[:global]"; the name if empty
    role: str = "transform"
    lossy: bool = True
    downlink: bool = False

    @classmethod
    def from_args(cls, args: list[str]) -> Stage:
        """The stage from its written arguments; ValueError saying the accepted form."""
        if args:
            raise ValueError(f"takes no arguments; write it as {cls.usage or cls.name}")
        return cls()

    @property
    def spec(self) -> str:
        """The stage as written in a codec string."""
        return self.name

    def encode(
        self, codes: list[TensorCode], rng: np.random.Generator, seed: int
    ) -> list[TensorCode]:
        raise NotImplementedError

    def decode(self, codes: list[TensorCode], seed: int) -> list[TensorCode]:
        return codes

    def check(self, codes: list[TensorCode]) -> str | None:
        """Why decoded-from-the-wire tensors cannot have come from this stage, or None.

        The wire format describes each tensor itself; this makes sure that description
        is what this stage produces before :meth:`decode` relies on it.
        """
        return None


S = TypeVar("S", bound=type[Stage])
STAGES: dict[str, type[Stage]] = {}
RESERVED = ("error_feedback", "ef", "zlib", "none")  # chain-level words of a codec string
ROLES = ("transform", "sparsify", "values")


def register_stage(name: str) -> Callable[[S], S]:
    """Make a Stage class usable in codec strings under ``name`` (it sets ``cls.name``)."""
    if not name or name in RESERVED or any(ch in name for ch in ":, "):
        raise ValueError(f"stage name {name!r}: must be non-empty, without ':', ',' or "
                         f"spaces, and not one of {', '.join(RESERVED)}")

    def add(cls: S) -> S:
        if cls.role not in ROLES:
            raise ValueError(f"stage {name}: role {cls.role!r} must be one of {', '.join(ROLES)}")
        cls.name = name
        STAGES[name] = cls
        return cls

    return add


def parse_number(text: str, kind: type[int] | type[float], usage: str) -> int | float:
    """``int(text)`` or ``float(text)``, with an error that shows the written form."""
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a {'whole number' if kind is int else 'number'}; "
                         f"write it as {usage}") from None


def check_layout(codes: list[TensorCode], kind: str, bits: int, block: int = 0) -> str | None:
    """The common check of value stages: every tensor's values stored as ``kind``."""
    for i, c in enumerate(codes):
        if (c.kind, c.bits, c.block) != (kind, bits, block):
            return (f"tensor {i}: {c.kind} values of {c.bits} bits (block {c.block}), "
                    f"the codec sends {kind} of {bits} bits (block {block})")
        if kind in ("q", "sign") and len(c.scales) == 0 and c.count:
            return f"tensor {i}: no scales"
    return None


def _keep(k: int, size: int) -> int:
    """At least one value (of a non-empty tensor), at most all of them."""
    return min(size, max(1, k))


@register_stage("topk")
class TopK(Stage):
    """Keep the ``amount`` largest-magnitude values (a fraction < 1, or a count >= 1).

    Per tensor by default; ``global`` ranks all tensors' values together, so layers
    with larger updates keep more.
    """

    usage, role = "topk:A[:global]", "sparsify"

    @classmethod
    def from_args(cls, args: list[str]) -> TopK:
        if len(args) not in (1, 2) or args[1:] not in ([], ["global"]):
            raise ValueError(f"write it as {cls.usage}")
        return cls(parse_number(args[0], float, cls.usage), global_=len(args) == 2)

    def __init__(self, amount: float, global_: bool = False) -> None:
        if amount <= 0 or (amount >= 1 and amount != int(amount)):
            raise ValueError(
                f"topk: {amount} must be a fraction in (0, 1) or a whole count >= 1")
        self.amount, self.global_ = amount, global_

    @property
    def spec(self) -> str:
        amount = f"{int(self.amount)}" if self.amount >= 1 else f"{self.amount:g}"
        return f"topk:{amount}" + (":global" if self.global_ else "")

    def k_of(self, size: int) -> int:
        return _keep(int(self.amount) if self.amount >= 1 else math.ceil(self.amount * size), size)

    def encode(self, codes, rng, seed):  # type: ignore[no-untyped-def]
        if not self.global_:
            return [self._select(c, self.k_of(c.size)) for c in codes]
        flat = np.concatenate([np.abs(c.values) for c in codes])
        k = self.k_of(len(flat))
        chosen = np.sort(np.argpartition(flat, len(flat) - k)[len(flat) - k :])
        out, start = [], 0
        for c in codes:
            mine = chosen[(chosen >= start) & (chosen < start + c.size)] - start
            out.append(replace(c, values=c.values[mine], indices=mine))
            start += c.size
        return out

    def check(self, codes):  # type: ignore[no-untyped-def]
        if any(c.seeded or c.indices is None for c in codes):
            return "top-k tensors must carry their positions"
        if self.global_:
            total, size = sum(len(c.values) for c in codes), sum(c.size for c in codes)
            return None if total == self.k_of(size) else f"{total} values kept, top-k keeps {self.k_of(size)}"
        for i, c in enumerate(codes):
            if len(c.values) != self.k_of(c.size):
                return f"tensor {i}: {len(c.values)} values kept, top-k keeps {self.k_of(c.size)}"
        return None

    @staticmethod
    def _select(code: TensorCode, k: int) -> TensorCode:
        magnitude = np.abs(code.values)
        kept = np.sort(np.argpartition(magnitude, code.size - k)[code.size - k :])
        return replace(code, values=code.values[kept], indices=kept)


@register_stage("randk")
class RandK(Stage):
    """Keep a random ``fraction`` of each tensor; positions come from the payload's seed.

    The server regenerates the positions from the seed, so none are sent. Values are
    not rescaled by d/k: this is the contractive (biased) form meant for error feedback.
    """

    usage, role = "randk:F", "sparsify"

    @classmethod
    def from_args(cls, args: list[str]) -> RandK:
        if len(args) != 1:
            raise ValueError(f"write it as {cls.usage}")
        return cls(parse_number(args[0], float, cls.usage))

    def __init__(self, fraction: float) -> None:
        if not 0 < fraction < 1:
            raise ValueError(f"randk: {fraction} must be a fraction in (0, 1)")
        self.fraction = fraction

    @property
    def spec(self) -> str:
        return f"randk:{self.fraction:g}"

    def positions(self, size: int, tensor: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng([seed, tensor])
        k = _keep(math.ceil(self.fraction * size), size)
        return np.sort(rng.choice(size, size=k, replace=False))

    def encode(self, codes, rng, seed):  # type: ignore[no-untyped-def]
        out = []
        for t, c in enumerate(codes):
            kept = self.positions(c.size, t, seed)
            out.append(replace(c, values=c.values[kept], indices=kept, seeded=True))
        return out

    def decode(self, codes, seed):  # type: ignore[no-untyped-def]
        return [replace(c, indices=self.positions(c.size, t, seed)) for t, c in enumerate(codes)]

    def check(self, codes):  # type: ignore[no-untyped-def]
        for i, c in enumerate(codes):
            k = _keep(math.ceil(self.fraction * c.size), c.size)
            if not c.seeded or len(c.values) != k:
                return f"tensor {i}: random-k sends {k} values at seeded positions"
        return None


class Cast16(Stage):
    """Store values as IEEE half precision (``fp16``) or bfloat16 (``bf16``)."""

    role, downlink = "values", True

    def __init__(self, fmt: str) -> None:
        if fmt not in ("fp16", "bf16"):
            raise ValueError(f"{fmt!r}: 16-bit floats are fp16 or bf16")
        self.name = fmt

    def encode(self, codes, rng, seed):  # type: ignore[no-untyped-def]
        if self.name == "fp16":
            return [replace(c, values=c.values.astype(np.float16), kind="f16", bits=16)
                    for c in codes]
        return [replace(c, values=to_bf16(c.values), kind="bf16", bits=16) for c in codes]

    def check(self, codes):  # type: ignore[no-untyped-def]
        return check_layout(codes, "f16" if self.name == "fp16" else "bf16", 16)

    def decode(self, codes, seed):  # type: ignore[no-untyped-def]
        out = []
        for c in codes:
            wide = (c.values.astype(np.float32) if c.kind == "f16"
                    else from_bf16(c.values))
            out.append(replace(c, values=wide, kind="f32", bits=32))
        return out


@register_stage("fp16")
class FP16(Cast16):
    """``fp16``: :class:`Cast16` as registered (a codec string names one format)."""

    def __init__(self) -> None:
        super().__init__("fp16")


@register_stage("bf16")
class BF16(Cast16):
    """``bf16``: :class:`Cast16` as registered."""

    def __init__(self) -> None:
        super().__init__("bf16")


def to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even."""
    raw = values.astype(np.float32).view(np.uint32)
    rounded = raw + np.uint32(0x7FFF) + ((raw >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def from_bf16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


@register_stage("quantize")
class Quantize(Stage):
    """Stochastic ``bits``-bit quantisation between each block's min and max.

    A value x in block [lo, hi] becomes one of 2**bits evenly spaced levels: the one
    below with probability (1 - frac), above with probability frac, where frac is x's
    position between them, so E[decoded] = x. Each block sends lo and hi (float32).
    It can move a value anywhere within [lo, hi] and so can grow an update's L2 norm
    (by at most sqrt(n) * (hi - lo) / (2**bits - 1)); a server that needs a norm bound
    must clip after decoding.
    """

    usage, role, downlink = "quantize:B[:N]", "values", True

    @classmethod
    def from_args(cls, args: list[str]) -> Quantize:
        if len(args) not in (1, 2):
            raise ValueError(f"write it as {cls.usage}")
        numbers = [int(parse_number(a, int, cls.usage)) for a in args]
        return cls(*numbers)

    def __init__(self, bits: int, block: int = 0) -> None:
        if not (isinstance(bits, int) and 1 <= bits <= 8):
            raise ValueError(f"quantize: bits {bits!r} must be a whole number from 1 to 8")
        if block < 0:
            raise ValueError(f"quantize: block {block} must be >= 1 (or 0 for per tensor)")
        self.bits, self.block = bits, block

    @property
    def spec(self) -> str:
        return f"quantize:{self.bits}" + (f":{self.block}" if self.block else "")

    def encode(self, codes, rng, seed):  # type: ignore[no-untyped-def]
        out = []
        levels = (1 << self.bits) - 1
        for c in codes:
            blocks = as_blocks(c.values.astype(np.float32), self.block)
            lo, hi = blocks.min(axis=1), blocks.max(axis=1)
            step = level_step(lo, hi, levels)
            position = (blocks - lo[:, None]) / step[:, None]
            noise = rng.random(blocks.shape, dtype=np.float32)
            quantized = np.clip(np.floor(position + noise), 0, levels).astype(np.uint8)
            scales = np.stack([lo, hi], axis=1).reshape(-1)
            out.append(replace(c, values=quantized.reshape(-1)[: len(c.values)], kind="q",
                               bits=self.bits, block=self.block, scales=scales))
        return out

    def check(self, codes):  # type: ignore[no-untyped-def]
        return check_layout(codes, "q", self.bits, self.block)

    def decode(self, codes, seed):  # type: ignore[no-untyped-def]
        out = []
        for c in codes:
            lo, hi = c.scales[0::2], c.scales[1::2]
            step = level_step(lo, hi, (1 << c.bits) - 1)
            blocks = as_blocks(c.values.astype(np.float32), c.block)
            values = (lo[:, None] + blocks * step[:, None]).reshape(-1)[: len(c.values)]
            out.append(replace(c, values=values, kind="f32", bits=32, block=0,
                               scales=np.zeros(0, np.float32)))
        return out


def as_blocks(values: np.ndarray, block: int) -> np.ndarray:
    """Values as rows of ``block`` (one row when 0), the last padded with its last value.

    Padding by repeating a real value leaves each block's min and max unchanged.
    """
    width = block if block else max(len(values), 1)
    rows = -(-len(values) // width)
    if rows * width != len(values):
        values = np.pad(values, (0, rows * width - len(values)), mode="edge")
    return values.reshape(rows, width)


def level_step(lo: np.ndarray, hi: np.ndarray, levels: int) -> np.ndarray:
    """Distance between quantisation levels; 1 where a block is constant (avoids 0/0)."""
    span = (hi - lo).astype(np.float32)
    return np.where(span > 0, span / np.float32(levels), np.float32(1)).astype(np.float32)


@register_stage("sign")
class Sign(Stage):
    """One bit a value: its sign, times the tensor's mean magnitude (scaled signSGD)."""

    role = "values"

    def encode(self, codes, rng, seed):  # type: ignore[no-untyped-def]
        out = []
        for c in codes:
            scale = np.float32(np.abs(c.values).mean()) if len(c.values) else np.float32(0)
            out.append(replace(c, values=(c.values >= 0).astype(np.uint8), kind="sign",
                               bits=1, scales=np.array([scale], np.float32)))
        return out

    def check(self, codes):  # type: ignore[no-untyped-def]
        return check_layout(codes, "sign", 1)

    def decode(self, codes, seed):  # type: ignore[no-untyped-def]
        out = []
        for c in codes:
            scale = c.scales[0]
            values = np.where(c.values.astype(bool), scale, -scale).astype(np.float32)
            out.append(replace(c, values=values, kind="f32", bits=32,
                               scales=np.zeros(0, np.float32)))
        return out


@register_stage("cluster")
class Cluster(Stage):
    """Parameter sharing: each value becomes an index into a codebook of ``k`` values.

    Per tensor, 1-D k-means (Lloyd's algorithm from quantile starting points) picks k
    shared values; the payload carries ceil(log2 k)-bit indices and the k float32
    values, FedZip's coding (Malekijoo et al. 2021) after top-k. Not scikit-learn's
    KMeans: in one dimension clusters are intervals of the sorted values, so
    assignment is a binary search between centroid midpoints, deterministic and
    several times faster on a model's worth of values.
    """

    usage, role, downlink = "cluster:K", "values", True

    @classmethod
    def from_args(cls, args: list[str]) -> Cluster:
        if len(args) != 1:
            raise ValueError(f"write it as {cls.usage}")
        return cls(int(parse_number(args[0], int, cls.usage)))

    def __init__(self, k: int, iterations: int = 10) -> None:
        if not (isinstance(k, int) and 2 <= k <= 256):
            raise ValueError(f"cluster: k {k!r} must be a whole number from 2 to 256")
        self.k, self.iterations = k, iterations
        self.bits = max(1, math.ceil(math.log2(k)))

    @property
    def spec(self) -> str:
        return f"cluster:{self.k}"

    def encode(self, codes, rng, seed):  # type: ignore[no-untyped-def]
        out = []
        for c in codes:
            codebook, index = kmeans_1d(c.values.astype(np.float32), self.k, self.iterations)
            out.append(replace(c, values=index, kind="cb", bits=self.bits, block=self.k,
                               scales=codebook))
        return out

    def check(self, codes):  # type: ignore[no-untyped-def]
        problem = check_layout(codes, "cb", self.bits, self.k)
        if problem:
            return problem
        for i, c in enumerate(codes):
            if len(c.values) and int(c.values.max()) >= self.k:
                return f"tensor {i}: index {int(c.values.max())} outside a codebook of {self.k}"
        return None

    def decode(self, codes, seed):  # type: ignore[no-untyped-def]
        return [replace(c, values=c.scales[c.values.astype(np.int64)].astype(np.float32),
                        kind="f32", bits=32, block=0, scales=np.zeros(0, np.float32))
                for c in codes]


def kmeans_1d(values: np.ndarray, k: int, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """(codebook of k float32, uint8 index of each value's centroid)."""
    if len(values) == 0:
        return np.zeros(k, np.float32), np.zeros(0, np.uint8)
    ordered = np.sort(values)
    centroids = np.quantile(ordered, (np.arange(k) + 0.5) / k).astype(np.float64)
    for _ in range(iterations):
        index = _nearest(centroids, values)
        sums = np.bincount(index, weights=values, minlength=k)
        counts = np.bincount(index, minlength=k)
        moved = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        moved.sort()  # keeps the midpoints of _nearest in order
        if np.array_equal(moved, centroids):
            break
        centroids = moved
    codebook = centroids.astype(np.float32)
    return codebook, _nearest(codebook.astype(np.float64), values).astype(np.uint8)


def _nearest(centroids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Index of the nearest of the sorted ``centroids`` for each value."""
    midpoints = (centroids[1:] + centroids[:-1]) / 2
    return np.searchsorted(midpoints, values, side="left")
