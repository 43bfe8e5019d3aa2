"""The compact model zoo, with parameter counts and fp32 sizes.

Every factory takes ``(input_shape, num_classes)`` so the same name builds the model
for 8x8 digits and 28x28 MNIST; ``input_shape`` is one sample's shape, (C, H, W) for
images or (F,) for tabular features (the CNNs need images, ``mlp`` takes either).
Bring your own model by naming a ``package.module:function`` with that signature
as the ``model`` key, or add it to the zoo with ``@register``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from smallfed.config import ConfigError
from smallfed.models.scatter import Scattering2D
from smallfed.plugins import load_object

ModelFactory = Callable[[tuple[int, ...], int], nn.Module]
MODELS: dict[str, ModelFactory] = {}


def register(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Add a factory to the zoo under ``name``."""

    def add(factory: ModelFactory) -> ModelFactory:
        MODELS[name] = factory
        return factory

    return add


def image_shape(model: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(C, H, W) of image inputs; a ConfigError for tabular ones, which a CNN cannot take."""
    if len(input_shape) != 3:
        raise ConfigError(f"model: {model} takes images (C, H, W), the dataset's samples have "
                          f"shape {tuple(input_shape)}; use mlp or a model of your own")
    return input_shape  # type: ignore[return-value]


@register("cnn-tiny")
def cnn_tiny(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two 3x3 conv blocks (16, 32 channels) with GroupNorm, then 64 hidden units.

    GroupNorm, not BatchNorm: its statistics are per sample, so Opacus's per-sample
    gradients stay exact, and FedAvg has no running statistics to average.
    About 106k parameters on 28x28 inputs.
    """
    return _cnn_tiny("cnn-tiny", input_shape, num_classes, nn.ReLU)


def _cnn_tiny(name: str, input_shape: tuple[int, ...], num_classes: int,
              activation: Callable[[], nn.Module]) -> nn.Module:
    channels, height, width = image_shape(name, input_shape)
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), nn.GroupNorm(4, 16), activation(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(8, 32), activation(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (height // 4) * (width // 4), 64), activation(),
        nn.Linear(64, num_classes),
    )


@register("cnn-seed")
def cnn_seed(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The project's reference CNN: Conv2d 32 3x3, ReLU, MaxPool 2, Dense 128, ReLU, Dense 10.

    693,962 parameters (2.78 MB fp32) on 28x28 inputs.
    """
    channels, height, width = image_shape("cnn-seed", input_shape)
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(32 * ((height - 2) // 2) * ((width - 2) // 2), 128), nn.ReLU(),
        nn.Linear(128, num_classes),
    )


class SharedBlockCNN(nn.Module):
    """A stem conv, then ONE conv block applied ``depth`` times (its weights shared across
    depth, as ALBERT shares its layers), global average pooling and a linear head.

    Depth costs compute, not parameters: about 10k parameters at any depth (32
    channels), a tenth of cnn-tiny. GroupNorm, so Opacus can train it; Opacus adds up
    the per-sample gradients of the block's every use.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int,
                 channels: int = 32, depth: int = 3) -> None:
        super().__init__()
        self.depth = depth
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], channels, 3, padding=1),
                                  nn.GroupNorm(8, channels), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1),
                                   nn.GroupNorm(8, channels), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(channels, num_classes)
        # Halve the map after the stem and after each use of the block while it is at
        # least 4 wide: the block runs on small maps, so depth stays cheap in compute.
        side, self.pool_after = min(input_shape[1:]), []
        for _ in range(depth + 1):
            self.pool_after.append(side >= 4)
            side = side // 2 if side >= 4 else side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.pool_after[0]:
            x = self.pool(x)
        for pool in self.pool_after[1:]:
            x = self.block(x)
            if pool:
                x = self.pool(x)
        return self.head(x.mean(dim=(2, 3)))


@register("cnn-shared")
def cnn_shared(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """:class:`SharedBlockCNN`: 32 channels, one 3x3 block used 3 times (10,026 parameters)."""
    return SharedBlockCNN(image_shape("cnn-shared", input_shape), num_classes)


@register("mlp")
def mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """One hidden layer of 64 units: the smallest baseline, for images or tabular features."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(input_shape), 64), nn.ReLU(),
        nn.Linear(64, num_classes),
    )


# DP-friendly models: fixed scattering features (Tramer & Boneh, ICLR 2021) and tanh
# (Papernot et al., AAAI 2021). Sizes and MACs: tests/test_dp_models.py checks them.

def _scattering_norm(name: str, input_shape: tuple[int, ...]) -> tuple[Scattering2D, nn.Module]:
    """The fixed scattering front end and the GroupNorm over its channels.

    27 groups of 3 channels on 28x28 (81 channels), Tramer & Boneh's choice for MNIST;
    3 groups of 3 on 8x8 (9 channels, J=1). Affine: its 2 x channels parameters train.
    """
    scattering = Scattering2D(image_shape(name, input_shape))
    channels = scattering.out_channels
    groups = channels // 3 if channels % 3 == 0 else 1
    return scattering, nn.GroupNorm(groups, channels)


@register("scatter-linear")
def scatter_linear(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Scattering features (fixed), GroupNorm, a linear classifier: Tramer & Boneh's
    "ScatterNet + linear", 98.7%-class features for MNIST under DP at epsilon 3.

    The scattering (:mod:`smallfed.models.scatter`: J=2, L=8 on 28x28, 81 x 7 x 7
    features; J=1, 9 x 4 x 4 on 8x8) is fixed Morlet convolutions held in
    non-persistent buffers: no parameters, nothing in ``state_dict()``, so no bytes on
    the wire and nothing for DP-SGD to clip or noise. Only the GroupNorm and the linear
    layer train: 39,862 parameters on 28x28 (159 kB fp32), 1,468 on 8x8. MACs on 28x28:
    58,901,337 in the fixed scattering (counted by :func:`macs`, the hooks see its
    ``fixed_macs``), 39,690 in the linear layer. Exports to ONNX (plain Pad, Slice,
    Concat, Conv, Sqrt): a device runs it with onnxruntime alone.
    """
    scattering, norm = _scattering_norm("scatter-linear", input_shape)
    side = scattering.out_size
    return nn.Sequential(scattering, norm, nn.Flatten(),
                         nn.Linear(scattering.out_channels * side * side, num_classes))


@register("scatter-cnn")
def scatter_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Scattering features (fixed), GroupNorm, then a small tanh CNN: conv 3x3 to 32
    channels, tanh, max-pool 2, linear. Tramer & Boneh's "ScatterNet + CNN" shape,
    smaller (their MNIST head has more layers), with tanh as Papernot et al. advise
    for DP-SGD.

    26,412 parameters on 28x28 (106 kB fp32), 3,932 on 8x8; MACs on 28x28: 58,901,337 in
    the fixed scattering, 1,143,072 in the conv and 2,880 in the classifier (60.0M). No
    BatchNorm: Opacus's per-sample gradients stay exact. Exports to ONNX.
    """
    scattering, norm = _scattering_norm("scatter-cnn", input_shape)
    side = scattering.out_size // 2
    return nn.Sequential(scattering, norm,
                         nn.Conv2d(scattering.out_channels, 32, 3, padding=1), nn.Tanh(),
                         nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(32 * side * side, num_classes))


@register("cnn-tiny-tanh")
def cnn_tiny_tanh(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """cnn-tiny with tanh where it has ReLU, same layers and sizes (105,962 parameters,
    1,117,056 MACs on 28x28). Tempered sigmoids bound the activations, which keeps the
    per-sample gradient norms from exploding and so loses less to DP-SGD's clipping
    (Papernot et al., "Tempered sigmoid activations for deep learning with differential
    privacy", AAAI 2021).
    """
    return _cnn_tiny("cnn-tiny-tanh", input_shape, num_classes, nn.Tanh)


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, seed: int
) -> nn.Module:
    """A model from the zoo or from ``package.module:function``, initialised from ``seed``.

    An unknown name or an unloadable function is a ConfigError naming the fix.
    """
    if name in MODELS:
        factory = MODELS[name]
    elif ":" in name:
        factory = load_object(name, "model")
        if not callable(factory):
            raise ConfigError(f"model: {name!r} is not callable ({type(factory).__name__}); "
                              "name a function (input_shape, num_classes) -> torch.nn.Module")
    else:
        raise ConfigError(
            f"model: {name!r} is not in the zoo ({', '.join(MODELS)}) "
            "and is not a package.module:function"
        )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = factory(input_shape, num_classes)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: {name!r} returned {type(model).__name__}, "
                          "not a torch.nn.Module")
    return model


@dataclass(frozen=True)
class ModelReport:
    """What a model costs to hold and to send."""

    params: int
    fp32_bytes: int


def model_report(model: nn.Module) -> ModelReport:
    params = sum(p.numel() for p in model.parameters())
    return ModelReport(params=params, fp32_bytes=4 * params)


def macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one inference through Conv and Linear layers (dense),
    and through fixed front ends that state theirs as ``fixed_macs`` (the scattering's
    convolutions are functional, with no Conv2d module for a hook to see)."""
    total = 0

    def count(module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += module.in_features * module.out_features
        elif isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
            total += int(output[0].numel()) * per_output
        total += int(getattr(module, "fixed_macs", 0))

    _one_pass(model, input_shape, count)
    return total


def activation_count(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Values the leaf layers output for one sample: what training keeps for backward."""
    total = 0

    def count(module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        nonlocal total
        if not list(module.children()):
            total += int(output[0].numel())

    _one_pass(model, input_shape, count)
    return total


def _one_pass(model: nn.Module, input_shape: tuple[int, ...], hook: Callable) -> None:
    """One sample through ``model`` in eval mode with ``hook`` on every module's output."""
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
