"""Update compression: an update codec is a chain of stages (see chain.py)."""

from smallfed.codec.chain import Chain, CodecError, chain, encoding_seed, parse_codec, parse_stage
from smallfed.codec.stages import Cast16, Quantize, RandK, Sign, Stage, TensorCode, TopK
from smallfed.codec.wire import FORMAT_VERSION, PayloadError

__all__ = [
    "FORMAT_VERSION",
    "Cast16",
    "Chain",
    "CodecError",
    "PayloadError",
    "Quantize",
    "RandK",
    "Sign",
    "Stage",
    "TensorCode",
    "TopK",
    "chain",
    "encoding_seed",
    "parse_codec",
    "parse_stage",
]
