"""A 2D scattering transform (Mallat; kymatio's ``Scattering2D``) as fixed convolutions.

The scattering of Tramer & Boneh (ICLR 2021, "Differentially private learning needs
better features") is a wavelet transform, a modulus, a second wavelet transform, a
modulus and a low-pass filter, with Morlet wavelets at ``J`` scales and ``L``
orientations. Nothing in it is learned, so it costs no privacy: a model that trains a
small head on its features spends its whole budget on the head.

Why fixed convolutions, not kymatio. kymatio computes the transform with FFTs (circular
convolutions on a reflect-padded grid). A circular convolution is exactly a spatial
convolution of the circularly padded grid with the filter's inverse FFT, and
kymatio's subsampling in Fourier (periodisation) is exactly spatial subsampling, i.e.
a strided convolution. So the same transform is plain ``pad``, ``conv2d`` with
stride, ``sqrt`` and slicing: it exports to ONNX (opset 18) and onnxruntime runs it on
a device with no kymatio, no FFT operator and no scipy. Measured against kymatio 0.3.0
(``tests/test_dp_models.py``, ``benchmarks/dp_models.py``; 28x28, J=2, L=8, binary
strokes and uniform noise): with whole-grid kernels the largest difference is 9.5e-7 of
the largest coefficient, float32 rounding, at 90.2M multiply-accumulates per image. The
kernels are then truncated to the smallest square that keeps all but ``tail`` of each
filter's L1 mass; the error and the cost per ``tail``, measured:

    tail    max |diff| / max |kymatio|   MACs (28x28)
    0       9.5e-7                       90.2M   (whole grid, exact)
    1e-7    9.5e-7                       68.6M
    1e-6    1.1e-6                       58.9M   <- default
    1e-5    4.3e-6                       46.0M
    1e-4    7.4e-5                       34.7M
    1e-3    9.7e-4                       25.1M

so the default, 1e-6, is as exact as float32 allows and a third cheaper than the whole
grid (the j=1 wavelets keep 33x33 of the 36x36 taps, the j=0 ones and the low-pass 17x17;
the second-order j=1 wavelets, applied to 8 maps, are 45.2M of the 58.9M).
On 8x8 digits (J=1, 9 channels, 4x4 maps): 4.0e-7, 0.36M MACs.

kymatio itself is only a test dependency here: its filter bank is reproduced below
(``morlet_2d``, ``gabor_2d``, ``periodize_filter_fft``, same formulas, vectorised) and
checked against it. kymatio 0.3.0's ``kymatio.torch`` does not import with scipy >=
1.15 (its 3D module imports ``scipy.special.sph_harm``, since removed); its 2D
frontend ``kymatio.scattering2d.frontend.torch_frontend.ScatteringTorch2D`` does.

The filters are plain tensors held in non-persistent buffers: they are not
parameters, not in ``state_dict()``, so the front end adds zero bytes to a federated
update and nothing for Opacus to clip.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MODULUS_EPS = 1e-12  # keeps sqrt's gradient finite at 0 if an input ever needs one
TAIL = 1e-6  # L1 mass of a kernel its truncation may drop (module docstring: measured)


def scattering_scales(height: int, width: int) -> int:
    """J for an image of ``height`` x ``width``: 2 (Tramer & Boneh's, 81 channels on
    28x28, 7x7 maps) when both sides are at least 16, else 1 (9 channels; 8x8 digits
    give 4x4 maps, where J=2 would leave 2x2)."""
    return 2 if min(height, width) >= 16 else 1


def scattering_channels(J: int, L: int = 8) -> int:
    """Channels per input channel: 1 + J L + L^2 J (J - 1) / 2 (81 for J=2, L=8)."""
    return 1 + J * L + L * L * J * (J - 1) // 2


def padded_size(size: int, J: int) -> int:
    """kymatio's ``compute_padding``: the reflect-padded grid the transform runs on."""
    return ((size + 2 ** J) // 2 ** J + 1) * 2 ** J


def gabor_2d(M: int, N: int, sigma: float, theta: float, xi: float,
             slant: float = 1.0) -> np.ndarray:
    """kymatio's Gabor filter in space, periodised over 5 x 5 copies of the grid."""
    R = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]], np.float32)
    R_inv = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]],
                     np.float32)
    curv = R @ np.array([[1, 0], [0, slant * slant]]) @ R_inv / (2 * sigma * sigma)
    gab = np.zeros((M, N), np.complex128)
    for ex in range(-2, 3):
        for ey in range(-2, 3):
            xx, yy = np.mgrid[ex * M:M + ex * M, ey * N:N + ey * N]
            arg = (-(curv[0, 0] * xx * xx + (curv[0, 1] + curv[1, 0]) * xx * yy
                     + curv[1, 1] * yy * yy)
                   + 1j * (xx * xi * np.cos(theta) + yy * xi * np.sin(theta)))
            gab += np.exp(arg)
    return gab / (2 * 3.1415 * sigma * sigma / slant)  # kymatio's constant, kept as it is


def morlet_2d(M: int, N: int, sigma: float, theta: float, xi: float,
              slant: float = 0.5) -> np.ndarray:
    """A Gabor filter minus its envelope times the constant that makes its mean zero."""
    wave = gabor_2d(M, N, sigma, theta, xi, slant)
    envelope = gabor_2d(M, N, sigma, theta, 0, slant)
    return wave - np.sum(wave) / np.sum(envelope) * envelope


def periodize_filter_fft(x: np.ndarray, res: int) -> np.ndarray:
    """kymatio's filter for the grid subsampled by 2**res: high frequencies masked out,
    then the spectrum periodised (summed over the 2**res x 2**res blocks)."""
    M, N = x.shape
    k = 2 ** res
    mask = np.ones(x.shape)
    start_x, len_x = int(M * 2 ** (-res - 1)), int(M * (1 - 2 ** (-res)))
    start_y, len_y = int(N * 2 ** (-res - 1)), int(N * (1 - 2 ** (-res)))
    mask[start_x:start_x + len_x, :] = 0
    mask[:, start_y:start_y + len_y] = 0
    return (x * mask).reshape(k, M // k, k, N // k).sum(axis=(0, 2))


@lru_cache(maxsize=8)
def filter_bank(M: int, N: int, J: int, L: int = 8) -> dict:
    """kymatio's ``filter_bank(M, N, J, L)``, in Fourier: ``psi[j][theta][res]`` and
    ``phi[res]``, each an (M / 2**res, N / 2**res) real array."""
    psi = []
    for j in range(J):
        per_angle = []
        for theta in range(L):
            signal = morlet_2d(M, N, 0.8 * 2 ** j, (int(L - L / 2 - 1) - theta) * np.pi / L,
                               3.0 / 4.0 * np.pi / 2 ** j, 4.0 / L)
            fourier = np.real(np.fft.fft2(signal))
            per_angle.append([periodize_filter_fft(fourier, res)
                              for res in range(min(j + 1, max(J - 1, 1)))])
        psi.append(per_angle)
    phi_fourier = np.real(np.fft.fft2(gabor_2d(M, N, 0.8 * 2 ** (J - 1), 0, 0)))
    return {"psi": psi, "phi": [periodize_filter_fft(phi_fourier, res) for res in range(J)]}


def correlation_kernel(fourier: np.ndarray, radius: int | None) -> tuple[np.ndarray, tuple]:
    """The cross-correlation weights whose circular application equals multiplying by
    ``fourier`` (a filter in Fourier on an M x N grid), and the circular padding
    (left, right, top, bottom) they need.

    Circular convolution: y[n] = sum_m h[m] x[n - m] with h = ifft2(fourier); conv2d
    correlates, y[n] = sum_t g[t] x[n + t], so g[t] = h[-t]. With ``radius`` None the
    kernel is the whole grid (t from -(M/2 - 1) to M/2: exact); else t in
    [-radius, radius] (the filter truncated).
    """
    h = np.fft.ifft2(fourier)
    M, N = h.shape

    def offsets(size: int) -> np.ndarray:
        if radius is None or 2 * radius + 1 >= size:
            return np.arange(-(size // 2 - 1), size // 2 + 1)
        return np.arange(-radius, radius + 1)

    ty, tx = offsets(M), offsets(N)
    g = h[np.ix_((-ty) % M, (-tx) % N)]
    return g, (-int(tx[0]), int(tx[-1]), -int(ty[0]), int(ty[-1]))


def truncation_radius(fouriers: list[np.ndarray], tail: float) -> int | None:
    """The smallest radius at which every filter of a bank keeps all but ``tail`` of its
    L1 mass (its spatial |h| summed); None (the whole grid, exact) when ``tail`` is 0 or
    no smaller square does."""
    if tail <= 0:
        return None
    size = fouriers[0].shape[0]
    full = [np.abs(correlation_kernel(f, None)[0]) for f in fouriers]
    centre = size // 2 - 1  # offset 0 in correlation_kernel's full layout
    for radius in range(1, (size - 1) // 2):
        lo, hi = centre - radius, centre + radius + 1
        if all(1 - a[lo:hi, lo:hi].sum() / a.sum() <= tail for a in full):
            return radius
    return None


class _Conv:
    """One fixed filter bank applied circularly with a stride: the plan, not the weights."""

    def __init__(self, name: str, pad: tuple[int, int, int, int], stride: int, grid: int,
                 taps: int, out_channels: int) -> None:
        self.name, self.pad, self.stride = name, pad, stride
        self.macs = (grid // stride) ** 2 * taps * out_channels  # per input map


class Scattering2D(nn.Module):
    """Fixed 2D scattering of (N, C, H, W) images into (N, C * K, H / 2**J, W / 2**J),
    K = 1 + J L + L^2 J (J-1) / 2 channels per input channel in kymatio's order (order 0,
    then order 1 by (j1, theta1), then order 2 by (j1, theta1, j2, theta2)).

    The same numbers as ``kymatio`` ``Scattering2D(J, (H, W), L)`` (max_order 2) with
    ``radius=None``; ``radius`` truncates every kernel to (2 radius + 1)^2 taps.
    ``fixed_macs`` counts the multiply-accumulates of its convolutions for one sample,
    which :func:`smallfed.models.macs` adds.
    """

    def __init__(self, input_shape: tuple[int, int, int], J: int | None = None, L: int = 8,
                 tail: float = TAIL) -> None:
        super().__init__()
        channels, height, width = input_shape
        if height != width:
            raise ValueError(f"scattering: square images only, got {height}x{width}")
        self.J = scattering_scales(height, width) if J is None else J
        self.L, self.size = L, height
        if 2 ** self.J > height:
            raise ValueError(f"scattering: J={self.J} needs images of at least {2 ** self.J} "
                             f"pixels, got {height}")
        J = self.J
        self.grid = grid = padded_size(height, J)
        self.reflect = ((grid - width) // 2, (grid - width + 1) // 2,
                        (grid - height) // 2, (grid - height + 1) // 2)
        bank = filter_bank(grid, grid, J, L)
        self.plans: dict[str, _Conv] = {}

        def add(name: str, fouriers: list[np.ndarray], stride: int, complex_: bool) -> None:
            radius = truncation_radius(fouriers, tail)
            kernels, pad = zip(*(correlation_kernel(f, radius) for f in fouriers))
            weights = []
            for kernel in kernels:  # real and imaginary parts as two output channels
                weights.append(kernel.real)
                if complex_:
                    weights.append(kernel.imag)
            weight = torch.tensor(np.stack(weights)[:, None], dtype=torch.float32)
            self.register_buffer(name, weight, persistent=False)
            size = fouriers[0].shape[0]
            self.plans[name] = _Conv(name, pad[0], stride, size, weight[0].numel(),
                                     weight.shape[0])

        add("phi0", [bank["phi"][0]], 2 ** J, False)
        for j1 in range(J):
            add(f"psi{j1}", [bank["psi"][j1][t][0] for t in range(L)], 2 ** j1, True)
            add(f"phi{j1}_low", [bank["phi"][j1]], 2 ** (J - j1), False)
            for j2 in range(j1 + 1, J):
                add(f"psi{j1}_{j2}", [bank["psi"][j2][t][j1] for t in range(L)],
                    2 ** (j2 - j1), True)
        self.out_channels = channels * scattering_channels(J, L)
        self.out_size = height // 2 ** J
        self.fixed_macs = channels * self._macs_per_map()

    def _macs_per_map(self) -> int:
        p, J, L = self.plans, self.J, self.L
        total = p["phi0"].macs
        for j1 in range(J):
            total += p[f"psi{j1}"].macs + L * p[f"phi{j1}_low"].macs
            for j2 in range(j1 + 1, J):
                total += L * p[f"psi{j1}_{j2}"].macs + L * L * p[f"phi{j2}_low"].macs
        return total

    def _conv(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """Circular correlation of (B, 1, n, n) maps with the bank ``name``, strided."""
        plan = self.plans[name]
        left, right, top, bottom = plan.pad
        # Circular padding as slices and concatenation: plain ONNX Slice / Concat.
        x = torch.cat([x[..., x.shape[-1] - left:], x, x[..., :right]], dim=-1)
        x = torch.cat([x[..., x.shape[-2] - top:, :], x, x[..., :bottom, :]], dim=-2)
        return F.conv2d(x, getattr(self, name), stride=plan.stride)

    @staticmethod
    def _modulus(x: torch.Tensor) -> torch.Tensor:
        """(B, 2L, n, n) real/imaginary pairs -> (B, L, n, n) moduli."""
        b, c, h, w = x.shape
        x = x.reshape(b, c // 2, 2, h, w)
        return torch.sqrt(x[:, :, 0] ** 2 + x[:, :, 1] ** 2 + MODULUS_EPS)

    def _unpad(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., 1:-1, 1:-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[0], x.shape[1]
        J, L, n = self.J, self.L, self.out_size
        x = x.reshape(batch * channels, 1, self.size, self.size)
        x = F.pad(x, self.reflect, mode="reflect")
        order0 = [self._unpad(self._conv(x, "phi0"))]
        order1, order2 = [], []
        for j1 in range(J):
            u1 = self._modulus(self._conv(x, f"psi{j1}"))  # (B, L, m, m)
            side = u1.shape[-1]
            folded = u1.reshape(-1, 1, side, side)
            order1.append(self._unpad(self._conv(folded, f"phi{j1}_low")).reshape(-1, L, n, n))
            for j2 in range(j1 + 1, J):
                u2 = self._modulus(self._conv(folded, f"psi{j1}_{j2}"))  # (B L, L, m', m')
                side2 = u2.shape[-1]
                s2 = self._unpad(self._conv(u2.reshape(-1, 1, side2, side2), f"phi{j2}_low"))
                order2.append((j1, j2, s2.reshape(-1, L, L, n, n)))
        # kymatio's order: all of order 1 (j1, theta1), then order 2 by (j1, theta1, j2, theta2)
        second = []
        for j1 in range(J):
            per_j2 = [s for a, _, s in order2 if a == j1]
            if per_j2:  # (B, L1, [j2 blocks of L2]) -> theta1 major, then j2, then theta2
                second.append(torch.cat(per_j2, dim=2).reshape(-1, L * L * len(per_j2), n, n))
        out = torch.cat(order0 + order1 + second, dim=1)
        return out.reshape(batch, self.out_channels, n, n)

    def extra_repr(self) -> str:
        return (f"J={self.J}, L={self.L}, size={self.size}, padded={self.grid}, "
                f"out=({self.out_channels}, {self.out_size}, {self.out_size}), "
                f"macs={self.fixed_macs:,}")
