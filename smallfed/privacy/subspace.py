"""A shared random subspace: compression that helps differential privacy.

Each round the server draws a seed and every client of the round keeps the same
random ``subspace`` fraction of each tensor's coordinates (the positions follow from
the seed, so none cross the wire). The client trains as usual and sends only the k
values of its model delta at those positions; the server expands them back. Magnitude
top-k of a noised update keeps mostly noise and pays for noise in all d coordinates;
here the noise lands in the k coordinates that are sent, and nowhere else.

Why the privacy argument holds, mode by mode:

* **Sample-level DP-SGD.** Each per-sample gradient is projected onto the subspace
  (the coordinates outside are zeroed) before Opacus clips it, so the clip bounds the
  projected gradient's norm by C, and the sum of projected, clipped gradients has
  sensitivity C under add/remove of one record. Opacus adds N(0, (zC)^2) to every
  coordinate; the coordinates outside the subspace are then zeroed again before the
  optimizer steps, which is post-processing of the noised sum. What remains is the
  Gaussian mechanism on the k-dimensional projection with the same z, C, sample rate
  and steps: the accountant's inputs do not change. The positions depend only on the
  server's seed, never on data, so choosing them costs nothing.
* **User-level DP-FedAvg.** The server expands each client's k values to a d-vector
  that is zero outside the subspace, clips it to C (its norm is the k values' norm) and
  sums: one client moves the sum by at most C, and the sum is exactly zero outside the
  subspace whatever the data, so noise is needed only inside it. The noise of the
  same z is added to the k coordinates alone: the mechanism and the accounting are
  unchanged, and the noise's total size scales with sqrt(k), not sqrt(d).
* **Error feedback.** Under user-level DP it may carry the part of a client's update
  outside this round's subspace into later rounds: whatever a client sends, the server
  clips it to C before it counts, so the bound holds. Under DP-SGD the delta outside
  the subspace is exactly zero, so there is no residual to carry; a residual of other
  lossy stages (quantisation) is made of DP outputs, which is post-processing.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping

import numpy as np
from flwr.app import ConfigRecord

Masks = dict[str, np.ndarray]  # name -> boolean array of the tensor's shape: True = kept

FRACTION_KEY, SEED_KEY = "subspace-fraction", "subspace-seed"


def subspace_seed(seed: int, server_round: int) -> int:
    """The round's seed, drawn by the server from the run's seed (positions are public)."""
    return int(np.random.SeedSequence([seed, server_round, 17]).generate_state(1)[0])


def subspace_masks(fraction: float, seed: int, template: Mapping[str, tuple[int, ...]]
                   ) -> Masks:
    """The positions every client of the round keeps: ``fraction`` of each tensor, at
    least one coordinate, chosen by ``seed`` and the tensor's name."""
    masks = {}
    for name, shape in template.items():
        size = math.prod(shape)
        keep = min(size, max(1, math.ceil(fraction * size)))
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        mask = np.zeros(size, dtype=bool)
        mask[rng.choice(size, size=keep, replace=False)] = True
        masks[name] = mask.reshape(shape)
    return masks


def round_subspace(config: Mapping, template: Mapping[str, tuple[int, ...]]) -> Masks:
    """The subspace a train message's config names, or {} when it names none."""
    fraction = float(config.get(FRACTION_KEY, 0.0))  # type: ignore[arg-type]
    if fraction <= 0:
        return {}
    return subspace_masks(fraction, int(config[SEED_KEY]), template)  # type: ignore[arg-type]


def subspace_config(fraction: float, seed: int, server_round: int) -> ConfigRecord:
    """What a train message carries so that clients find the round's subspace."""
    return ConfigRecord({FRACTION_KEY: fraction, SEED_KEY: subspace_seed(seed, server_round)})


def combine(pruning: Masks, subspace: Masks) -> Masks:
    """The coordinates an update carries: unpruned and in the subspace."""
    if not subspace:
        return pruning
    return {k: (m & pruning[k]) if k in pruning else m for k, m in subspace.items()}
