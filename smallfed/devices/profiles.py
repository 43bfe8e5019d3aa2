"""Device profiles: how fast a device trains, how fast it talks, how often it is there.

The figures are representative public numbers, not measurements of any one device:
replace them with your fleet's (``register``). Each field says where it comes from.

* ``train_flops``: sustained FP32 training throughput, a tenth of the CPU's peak
  (peak = cores x clock x FP32 FLOP/cycle from the vendor's core specification;
  PyTorch training on a mobile CPU sustains roughly 5-15% of peak).
* ``uplink_bps``/``downlink_bps``/``latency_s``: for phones, Ookla's Speedtest Global
  Index (mobile medians, 2024: about 50 Mbit/s down, 10 Mbit/s up, 30 ms); budget
  phones on 4G a third of that. The Raspberry Pi on Wi-Fi 5, the IoT node on IEEE
  802.15.4 (250 kbit/s PHY rate).
* ``availability``: the chance a device is online and eligible in a round. Phones
  train only when idle, charging and on Wi-Fi (Bonawitz et al., "Towards Federated
  Learning at Scale", MLSys 2019), so about half; mains-powered boards almost always.
* ``memory_bytes``: what the app may use for training, not the device's total.
"""

from __future__ import annotations

from dataclasses import dataclass

GFLOP = 1e9
MBIT = 1e6
MB = 1 << 20


@dataclass(frozen=True)
class DeviceProfile:
    """One kind of device."""

    name: str
    train_flops: float  # sustained FP32 FLOP/s while training
    uplink_bps: float  # bits per second
    downlink_bps: float
    latency_s: float  # one way, per message
    availability: float  # probability of being online in a round
    memory_bytes: int  # what training may use

    def __post_init__(self) -> None:
        if min(self.train_flops, self.uplink_bps, self.downlink_bps) <= 0:
            raise ValueError(f"device {self.name}: throughputs must be > 0")
        if not 0 < self.availability <= 1 or self.latency_s < 0 or self.memory_bytes <= 0:
            raise ValueError(f"device {self.name}: availability in (0, 1], latency >= 0 "
                             "and memory > 0")


PROFILES: dict[str, DeviceProfile] = {}


def register(profile: DeviceProfile) -> DeviceProfile:
    """Make ``profile`` a name of the ``devices`` key (replacing one of the same name).

    A fleet of your own is one module of ``register(DeviceProfile(...))`` calls,
    imported before the Config that names them is built.
    """
    if not profile.name or any(ch in profile.name for ch in ":, "):
        raise ValueError(f"device {profile.name!r}: a name must be non-empty, without ':', "
                         "',' or spaces (the devices key reads NAME:SHARE,NAME:SHARE)")
    PROFILES[profile.name] = profile
    return profile


# Flagship phone: 1 big core used, Cortex-X3 class at 3.2 GHz, 4x128-bit FMA NEON
# pipes = 32 FP32 FLOP/cycle: ~100 GFLOP/s peak, a tenth sustained.
register(DeviceProfile("phone-high", 10 * GFLOP, 10 * MBIT, 50 * MBIT, 0.03, 0.5, 512 * MB))
# Budget phone: Cortex-A55 class at 2 GHz, 8 FP32 FLOP/cycle: 16 GFLOP/s peak.
register(DeviceProfile("phone-low", 1.5 * GFLOP, 3 * MBIT, 15 * MBIT, 0.06, 0.4, 128 * MB))
# Raspberry Pi 4: 4 x Cortex-A72 at 1.5 GHz, 8 FP32 FLOP/cycle: 48 GFLOP/s peak.
register(DeviceProfile("rpi4", 5 * GFLOP, 50 * MBIT, 100 * MBIT, 0.01, 0.95, 1024 * MB))
# Microcontroller-class node: Cortex-M7 at 480 MHz (STM32H7), 2 FP32 FLOP/cycle with
# FMA: ~1 GFLOP/s peak, a fifth sustained (no SIMD for floats); 1 MB of SRAM; IEEE
# 802.15.4 radio.
register(DeviceProfile("iot", 0.2 * GFLOP, 0.25 * MBIT, 0.25 * MBIT, 0.1, 0.7, 1 * MB))


def parse_mix(text: str) -> dict[str, float]:
    """``"phone-high:0.2,rpi4:0.8"`` -> shares; ValueError naming what is wrong."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, share = part.partition(":")
        if not sep:
            raise ValueError(f"{part!r}: write NAME:SHARE, for example rpi4:0.2")
        if name not in PROFILES:
            raise ValueError(f"{name!r} is not a device profile ({', '.join(PROFILES)})")
        try:
            mix[name] = float(share)
        except ValueError as err:
            raise ValueError(f"{part!r}: the share must be a number") from err
        if mix[name] <= 0:
            raise ValueError(f"{part!r}: the share must be > 0")
    if mix and abs(sum(mix.values()) - 1) > 1e-6:
        raise ValueError(f"shares add up to {sum(mix.values()):g}, not 1")
    return mix
