"""Federated magnitude pruning: the server picks the mask, clients train under it.

Each round the server prunes the global model to the schedule's sparsity with
``torch.nn.utils.prune`` (global unstructured L1 over every Conv/Linear weight, or
per-layer L2 structured over whole output channels; the classifier's rows are never
removed whole) and broadcasts the mask as packed bits. Pruned weights are exactly
zero and stay zero: masks only grow, because the zeros of the last round are the
smallest magnitudes of this one. Clients zero masked weights before every forward
pass and once after training, and send only the unmasked coordinates of their update
(:func:`compact`), so a pruned model's updates cost fewer bytes with any codec.

Sparsity follows Zhu and Gupta's cubic schedule (2017): from 0 at ``prune-start-round``
to ``prune-sparsity`` at ``prune-end-round``, fast first and gently at the end.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from torch import nn
from torch.nn.utils import parametrize, prune

from smallfed.config import Config, ConfigError

Masks = dict[str, np.ndarray]  # state-dict name -> bool array, True where the weight lives
MASK_RECORD = "smallfed-mask"


def schedule_end(cfg: Config) -> int:
    return cfg.prune_end_round or max(cfg.prune_start_round, cfg.num_server_rounds // 2)


def sparsity_at(cfg: Config, server_round: int) -> float:
    """The share of prunable weights that is zero in ``server_round``'s global model."""
    if cfg.prune == "none" or server_round < cfg.prune_start_round:
        return 0.0
    start, end = cfg.prune_start_round, schedule_end(cfg)
    progress = 1.0 if end <= start else min(1.0, (server_round - start) / (end - start))
    return cfg.prune_sparsity * (1.0 - (1.0 - progress) ** 3)


PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)


def prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(state-dict name of the weight, module) of every Conv and Linear layer."""
    return [(f"{name}.weight", module) for name, module in model.named_modules()
            if isinstance(module, PRUNABLE)]


def magnitude_masks(model: nn.Module, sparsity: float, structured: bool) -> Masks:
    """The masks torch's magnitude pruning gives ``model`` at ``sparsity`` (model unchanged)."""
    if sparsity <= 0:
        return {}
    if structured:
        return structured_masks(model, sparsity)
    layers = prunable(model)
    prune.global_unstructured([(m, "weight") for _, m in layers],
                              pruning_method=prune.L1Unstructured, amount=sparsity)
    masks = {}
    for name, module in layers:
        masks[name] = module.weight_mask.detach().numpy().astype(bool)
        prune.remove(module, "weight")
    return masks


def structured_masks(model: nn.Module, sparsity: float) -> Masks:
    """Whole output channels by L2 norm, layer by layer, and everything that dies with them.

    A pruned channel loses its weight row and its bias; when a GroupNorm follows, whole
    groups go (a group's statistics mix its channels) with their affine parameters; and
    the next layer loses the inputs it read from the channel (after a Flatten, the
    channel's block of inputs). The channel then outputs exactly zero, so export can
    drop it (:mod:`shrink`), and no update carries its weights. The classifier keeps
    every row. Layers are taken in registration order, the forward order of a
    Sequential model.
    """
    leaves = [(name, m) for name, m in model.named_modules() if not list(m.children())]
    layer_at = [i for i, (_, m) in enumerate(leaves) if isinstance(m, PRUNABLE)]
    masks: Masks = {}
    inputs: np.ndarray | None = None  # which inputs of the next layer are still alive
    for n, i in enumerate(layer_at):
        name, module = leaves[i]
        weight = module.weight
        last = n == len(layer_at) - 1
        after = leaves[i + 1] if i + 1 < len(leaves) else None
        norm = after if after is not None and isinstance(after[1], nn.GroupNorm) else None
        rows = (np.ones(weight.shape[0], dtype=bool) if last
                else _kept_rows(module, norm[1] if norm else None, sparsity))
        mask = np.broadcast_to(rows.reshape(-1, *[1] * (weight.dim() - 1)), weight.shape).copy()
        if inputs is not None:
            per_input = weight.shape[1] // len(inputs)  # > 1 after a Flatten: H x W each
            columns = np.repeat(inputs, per_input)
            mask &= columns.reshape(1, -1, *[1] * (weight.dim() - 2))
        if not mask.all():
            masks[f"{name}.weight"] = mask
        if not last:
            if module.bias is not None:
                masks[f"{name}.bias"] = rows.copy()
            if norm is not None and norm[1].affine:
                masks[f"{norm[0]}.weight"] = rows.copy()
                masks[f"{norm[0]}.bias"] = rows.copy()
        inputs = rows
    return masks


def _kept_rows(module: nn.Module, norm: nn.GroupNorm | None, sparsity: float) -> np.ndarray:
    out = module.weight.shape[0]
    if norm is None:  # torch's own structured pruning, one row at a time
        prune.ln_structured(module, "weight", amount=sparsity, n=2, dim=0)
        rows = module.weight_mask.detach().reshape(out, -1).any(dim=1).numpy()
        prune.remove(module, "weight")
        return rows
    # Whole GroupNorm groups, which torch's pruning has no method for: the L2 norm of
    # each group's filters, the weakest groups dropped, as ln_structured drops rows.
    size = out // norm.num_groups
    norms = module.weight.detach().reshape(norm.num_groups, -1).norm(dim=1)
    drop = round(sparsity * norm.num_groups)
    kept_groups = np.ones(norm.num_groups, dtype=bool)
    kept_groups[torch.argsort(norms)[:drop].numpy()] = False
    return np.repeat(kept_groups, size)


def apply_masks(arrays: Mapping[str, np.ndarray], masks: Masks) -> dict[str, np.ndarray]:
    """``arrays`` with masked values set to exactly zero."""
    return {k: np.where(masks[k], v, 0).astype(v.dtype) if k in masks else v
            for k, v in arrays.items()}


def enforce_masks(model: nn.Module, masks: Masks) -> list[torch.utils.hooks.RemovableHandle]:
    """Zero masked parameters before every forward pass; return the hooks to remove.

    torch's prune re-parametrises ``weight`` as ``weight_orig * weight_mask``, which
    Opacus cannot compute per-sample gradients for; zeroing in place keeps the
    Parameter, so plain and DP-SGD training both work, and the forward pass always
    sees the masked weights (what prune's own pre-hook guarantees).
    """
    handles = []
    for name, mask in masks.items():
        module_name, _, param = name.rpartition(".")
        module, keep = model.get_submodule(module_name), torch.from_numpy(mask)

        def zero(mod: nn.Module, _inputs: object, param: str = param,
                 keep: torch.Tensor = keep) -> None:
            if parametrize.is_parametrized(mod, param):  # under QAT's fake quantization
                target = getattr(mod.parametrizations, param).original
            else:
                target = getattr(mod, param)
            with torch.no_grad():
                target.mul_(keep)

        handles.append(module.register_forward_pre_hook(zero))
    return handles


@contextmanager
def masked_training(model: nn.Module, masks: Masks) -> Iterator[None]:
    """Masks enforced during training, and applied once more after the last step."""
    handles = enforce_masks(model, masks)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, mask in masks.items():
                params[name].mul_(torch.from_numpy(mask))


def compact(update: Mapping[str, np.ndarray], masks: Masks) -> dict[str, np.ndarray]:
    """Only the unmasked coordinates of each masked tensor (1-D), the rest unchanged."""
    return {k: v[masks[k]] if k in masks else v for k, v in update.items()}


def expand(update: Mapping[str, np.ndarray], masks: Masks,
           shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Undo :func:`compact`: scatter the kept values back, zeros where masked."""
    out = {}
    for k, v in update.items():
        if k in masks:
            dense = np.zeros(shapes[k], dtype=v.dtype)
            dense[masks[k]] = v
            out[k] = dense
        else:
            out[k] = v
    return out


def compact_template(template: Mapping[str, tuple[int, ...]], masks: Masks
                     ) -> dict[str, tuple[int, ...]]:
    return {k: (int(masks[k].sum()),) if k in masks else shape for k, shape in template.items()}


def pack_masks(masks: Masks) -> dict[str, np.ndarray]:
    """Masks as packed bits (uint8), what the downlink carries: 1 bit a weight."""
    return {k: np.packbits(m.ravel()) for k, m in masks.items()}


def unpack_masks(packed: Mapping[str, np.ndarray], template: Mapping[str, tuple[int, ...]]
                 ) -> Masks:
    """Undo :func:`pack_masks`; ValueError if a mask does not fit the model's layout."""
    masks = {}
    for k, bits in packed.items():
        if k not in template:
            raise ValueError(f"mask for {k!r}, which the model does not have")
        size = int(np.prod(template[k]))
        if bits.dtype != np.uint8 or bits.size != (size + 7) // 8:
            raise ValueError(f"mask for {k!r}: {bits.size} bytes, expected {(size + 7) // 8}")
        masks[k] = np.unpackbits(bits, count=size).reshape(template[k]).astype(bool)
    return masks


def read_masks(content: RecordDict, template: Mapping[str, tuple[int, ...]]) -> Masks:
    """The masks a train message carries (none when the model is not pruned)."""
    record = content.array_records.get(MASK_RECORD)
    if record is None:
        return {}
    return unpack_masks({k: a.numpy() for k, a in record.items()}, template)


def mask_record(masks: Masks) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in pack_masks(masks).items()})


class ServerPruning:
    """The server's side: this round's masks from the global model and the schedule."""

    def __init__(self, cfg: Config, model: nn.Module) -> None:
        from smallfed.compact.shrink import can_shrink

        if cfg.prune == "structured" and not can_shrink(model):
            raise ConfigError(
                f"prune: structured pruning follows channels from layer to layer and needs "
                f"a plain nn.Sequential of Conv2d, Linear, GroupNorm, Flatten and activations; "
                f"{cfg.model!r} is not one (it may reuse a layer); use prune = 'unstructured'")
        self.cfg = cfg
        self.model = copy.deepcopy(model)  # scratch: loaded with the global model each round

    def masks_for(self, server_round: int, arrays: Mapping[str, np.ndarray]) -> Masks:
        sparsity = sparsity_at(self.cfg, server_round)
        if sparsity <= 0:
            return {}
        self.model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})
        return magnitude_masks(self.model, sparsity, self.cfg.prune == "structured")
