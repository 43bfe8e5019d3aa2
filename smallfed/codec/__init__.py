"""Update compression: an update codec is a chain of stages (see chain.py).

Add a stage of your own by subclassing :class:`Stage` and decorating it with
``@register_stage("name")``; the :class:`Stage` docstring states its contract.
"""

from smallfed.codec.chain import (
    Chain,
    CodecError,
    chain,
    check_downlink,
    encoding_seed,
    parse_codec,
    parse_stage,
    stage_forms,
)
from smallfed.codec.stages import (
    KINDS,
    STAGES,
    BF16,
    FP16,
    Cast16,
    Cluster,
    Quantize,
    RandK,
    Sign,
    Stage,
    TensorCode,
    TopK,
    register_stage,
)
from smallfed.codec.wire import FORMAT_VERSION, PayloadError

__all__ = [
    "BF16",
    "FORMAT_VERSION",
    "FP16",
    "KINDS",
    "STAGES",
    "Cast16",
    "Chain",
    "Cluster",
    "CodecError",
    "PayloadError",
    "Quantize",
    "RandK",
    "Sign",
    "Stage",
    "TensorCode",
    "TopK",
    "chain",
    "check_downlink",
    "encoding_seed",
    "parse_codec",
    "parse_stage",
    "register_stage",
    "stage_forms",
]
