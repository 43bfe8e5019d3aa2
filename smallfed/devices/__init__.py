"""Simulated devices: profiles, a population mix, memory needs, and simulated time."""

from smallfed.devices.clock import Arrival, ClientTime, RoundClock
from smallfed.devices.population import (
    profile_of,
    training_flops_per_sample,
    training_memory_bytes,
)
from smallfed.devices.profiles import PROFILES, DeviceProfile, parse_mix, register

__all__ = ["PROFILES", "Arrival", "ClientTime", "DeviceProfile", "RoundClock", "parse_mix", "profile_of",
           "register", "training_flops_per_sample", "training_memory_bytes"]
