"""The server as layers: single-concern strategy wrappers around one Flower strategy.

:func:`build_strategy` stacks them in the order stated there; each layer's module says
what it does and why.
"""

from smallfed.flower.layers.base import (
    Layer,
    adopt,
    find,
    restore_stack,
    stack,
    stack_epsilon,
    stack_privacy,
    stack_state,
    stack_stats,
)
from smallfed.flower.layers.bound import BoundUpdates
from smallfed.flower.layers.build import build_strategy
from smallfed.flower.layers.clock import DeviceClock
from smallfed.flower.layers.decode import DecodeUpdates
from smallfed.flower.layers.project import ProjectModel
from smallfed.flower.layers.rollback import RollbackNonFinite
from smallfed.flower.layers.sampling import Partitions, PartitionSampling, RoundOffset
from smallfed.flower.layers.secure_agg import SecureAggregation
from smallfed.flower.layers.validate import (
    AdmitReplies,
    ClientReports,
    Quorum,
    ValidateReplies,
)

__all__ = [
    "AdmitReplies", "BoundUpdates", "ClientReports", "DecodeUpdates", "DeviceClock", "Layer",
    "PartitionSampling", "Partitions", "ProjectModel", "Quorum", "RollbackNonFinite",
    "RoundOffset", "SecureAggregation", "ValidateReplies", "adopt", "build_strategy", "find", "restore_stack",
    "stack", "stack_epsilon", "stack_privacy", "stack_state", "stack_stats",
]
