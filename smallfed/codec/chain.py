"""``chain(...)``: stages composed into one codec, checked when built; error feedback.

A codec is written as a string of comma-separated stages, for example
``"topk:0.01,quantize:4,error_feedback,zlib"``:

=================  ===========================================================
``topk:A[:global]``  keep the A largest values (A a fraction < 1 or a count)
``randk:F``          keep a random fraction F; positions follow from a seed
``quantize:B[:N]``   B-bit stochastic quantisation (1..8), one scale per N values
``sign``             one bit a value, times the mean magnitude
``cluster:K``        each value an index into K shared values (1-D k-means), 2..256
``fp16`` ``bf16``    16-bit floats
``error_feedback``   keep what the lossy stages dropped and add it next round
``zlib[:L]``         lossless compression of the packed payload (level L)
=================  ===========================================================

Stages are separated by commas; a stage's arguments follow its name after colons.
Each name is a registered :class:`~smallfed.codec.stages.Stage` class
(``STAGES``; add your own with ``@register_stage``); ``error_feedback`` and
``zlib`` are properties of the chain itself.

Order rules, checked by :func:`chain`: at most one sparsifier and one value coder;
the value coder is the last stage, after the sparsifier (quantising values that
are then dropped wastes work and, for top-k, ranks quantisation noise) and after
any transform (which needs float32 values); ``zlib`` comes last;
``error_feedback`` (anywhere, once) needs a lossy stage. The state of error
feedback is explicit: :meth:`Chain.encode` takes the residual and returns the new one.
:func:`check_downlink` says whether a chain may code the broadcast model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from smallfed.codec.stages import STAGES, Stage, TensorCode, check_layout, parse_number
from smallfed.codec.wire import PayloadError, pack, unpack

Update = dict[str, np.ndarray]


class CodecError(ValueError):
    """A codec that cannot be built; the message names the stage and the fix."""


@dataclass(frozen=True)
class Chain:
    """Stages in order, whether error feedback is on, and the optional zlib level."""

    stages: tuple[Stage, ...]
    error_feedback: bool = False
    zlib_level: int | None = None

    @property
    def spec(self) -> str:
        parts = [s.spec for s in self.stages]
        if self.error_feedback:
            parts.append("error_feedback")
        if self.zlib_level is not None:
            parts.append(f"zlib:{self.zlib_level}")
        return ",".join(parts) or "none"

    @property
    def is_identity(self) -> bool:
        """True for the empty chain: updates travel as Flower's dense arrays, unencoded."""
        return not self.stages and self.zlib_level is None

    @property
    def lossy(self) -> bool:
        return any(s.lossy for s in self.stages)

    def encode(
        self, update: Mapping[str, np.ndarray], seed: int, residual: Update | None = None
    ) -> tuple[bytes, Update | None]:
        """(payload, new residual) for an update; ``residual`` is error feedback's state."""
        corrected = {k: np.asarray(v, dtype=np.float32) for k, v in update.items()}
        if self.error_feedback and residual:
            corrected = {k: v + residual[k] for k, v in corrected.items()}
        codes = [TensorCode(shape=tuple(v.shape), values=v.reshape(-1)) for v in corrected.values()]
        rng = np.random.default_rng(seed)
        for stage in self.stages:
            codes = stage.encode(codes, rng, seed)
        payload = pack(self.spec, seed, codes, self.zlib_level)
        if not self.error_feedback:
            return payload, None
        sent = self._dense(self._decode_codes(codes, seed), list(corrected))
        return payload, {k: corrected[k] - sent[k] for k in corrected}

    def decode(self, payload: bytes, template: Mapping[str, tuple[int, ...]]) -> Update:
        """The dense update in a payload that must match ``template`` (name -> shape).

        Raises :class:`PayloadError` for anything else: another codec, other shapes,
        truncation or corruption, or values that decode to NaN or infinity.
        """
        spec, seed, codes = unpack(payload, list(template.values()))
        if spec != self.spec:
            raise PayloadError(f"encoded with codec {spec!r}, this run uses {self.spec!r}")
        problem = self._check(codes)
        if problem:
            raise PayloadError(problem)
        update = self._dense(self._decode_codes(codes, seed), list(template))
        for name, values in update.items():
            if not np.isfinite(values).all():
                raise PayloadError(f"{name}: decodes to NaN or infinity")
        return update

    def _check(self, codes: list[TensorCode]) -> str | None:
        """Does every tensor look like what these stages produce? (The wire can lie.)"""
        roles = {s.role for s in self.stages}
        if "sparsify" not in roles and any(c.seeded or c.indices is not None for c in codes):
            return "sparse tensors, but the codec sends every value"
        if "values" not in roles:
            problem = check_layout(codes, "f32", 32)
            if problem:
                return problem
        return next((p for p in (s.check(codes) for s in self.stages) if p), None)

    def _decode_codes(self, codes: list[TensorCode], seed: int) -> list[TensorCode]:
        for stage in reversed(self.stages):
            codes = stage.decode(codes, seed)
        return codes

    @staticmethod
    def _dense(codes: Sequence[TensorCode], names: Sequence[str]) -> Update:
        return {name: code.dense() for name, code in zip(names, codes)}


def parse_stage(text: str) -> Stage | str:
    """One stage from its string form; 'error_feedback' and 'zlib:L' come back as names."""
    name, *args = text.strip().split(":")
    try:
        if name in ("error_feedback", "ef"):
            if args:
                raise ValueError("takes no arguments; write it as error_feedback")
            return "error_feedback"
        if name == "zlib":
            level = int(parse_number(args[0], int, "zlib[:L]")) if len(args) == 1 else 6
            if len(args) > 1 or not 0 <= level <= 9:
                raise ValueError("write it as zlib[:L], L a level 0..9")
            return f"zlib:{level}"
        if name in STAGES:
            return STAGES[name].from_args(args)
    except ValueError as err:
        other_separator = any(ch in text.strip() for ch in "; |+")
        hint = "; stages are separated by commas" if other_separator else ""
        raise CodecError(f"codec stage {text!r}: {err}{hint}") from err
    raise CodecError(f"codec stage {text!r} is not known; {stage_forms()}")


def stage_forms() -> str:
    """The codec syntax in one sentence, from the registered stages."""
    forms = [cls.usage or name for name, cls in STAGES.items()]
    return (f"stages are separated by commas, each one of {', '.join(forms)}, "
            "error_feedback or zlib[:L]")


def chain(*stages: Stage | str) -> Chain:
    """Compose stages (objects or strings) into a :class:`Chain`, checking their order."""
    parsed = [parse_stage(s) if isinstance(s, str) else s for s in stages]
    real = [s for s in parsed if isinstance(s, Stage)]
    flags = [s for s in parsed if isinstance(s, str)]
    for role in ("sparsify", "values"):
        same = [s.spec for s in real if s.role == role]
        if len(same) > 1:
            raise CodecError(f"{' and '.join(same)} both {_ROLE[role]}; keep one")
    roles = [s.role for s in real]
    if "values" in roles and roles.index("values") != len(roles) - 1:
        coder, after = real[roles.index("values")], real[roles.index("values") + 1]
        if after.role == "sparsify":
            raise CodecError(
                f"{coder.spec} comes before {after.spec}; sparsify first, then code the "
                "values (for example topk:0.01,quantize:4)")
        raise CodecError(f"{after.spec} comes after {coder.spec}, which codes the values; "
                         f"put {after.spec} first: it works on float32 values")
    if flags.count("error_feedback") > 1:
        raise CodecError("error_feedback appears twice")
    zlibs = [i for i, s in enumerate(parsed) if isinstance(s, str) and s.startswith("zlib")]
    if len(zlibs) > 1 or (zlibs and zlibs[0] != len(parsed) - 1):
        raise CodecError("zlib compresses the packed payload, so it must come last, once")
    built = Chain(
        stages=tuple(real),
        error_feedback="error_feedback" in flags,
        zlib_level=int(parsed[zlibs[0]].split(":")[1]) if zlibs else None,
    )
    if built.error_feedback and not built.lossy:
        lossy = [name for name, cls in STAGES.items() if cls.lossy]
        raise CodecError(f"error_feedback needs a lossy stage to correct ({', '.join(lossy)})")
    return built


def check_downlink(codec: Chain) -> None:
    """Refuse a chain that may not code the model the server broadcasts.

    The broadcast is the whole model, not a delta: sparsifying or signing it (or
    carrying a residual of it) would destroy it. A stage says so itself (``downlink``).
    """
    bad = [s.spec for s in codec.stages if not s.downlink]
    bad += ["error_feedback"] if codec.error_feedback else []
    if bad:
        usable = [cls.usage or name for name, cls in STAGES.items() if cls.downlink]
        raise CodecError(
            f"{','.join(bad)!r} would sparsify or sign the model itself (the broadcast is "
            f"the whole model, not a delta); use {', '.join(usable)} or zlib")


_ROLE = {"sparsify": "choose which values to send", "values": "code the values"}


@lru_cache(maxsize=64)
def parse_codec(text: str) -> Chain:
    """A chain from its string form; '' or 'none' is the dense fp32 codec.

    Cached: clients and the server parse the run's codec string on every message, and a
    Chain is immutable (its stages keep no state between calls).
    """
    text = text.strip()
    if text in ("", "none"):
        return chain()
    return chain(*[part for part in text.split(",") if part.strip()])


def encoding_seed(seed: int, server_round: int, partition_id: int, downlink: bool) -> int:
    """The seed of one encoding, fixed by run seed, round, client and direction.

    Stochastic rounding and random-k positions then repeat exactly with the run's seed.
    """
    words = [seed, server_round, partition_id + 1, int(downlink)]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
