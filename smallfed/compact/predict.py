"""Run an exported model in onnxruntime on images, as a device would.

Inputs are a folder of images (PNG, JPEG, BMP, PGM: read with Pillow, converted to
the model's channels) or an ``.npy`` array of shape (N, C, H, W) or (N, H, W), with
pixel intensities in [0, 1] (uint8 arrays are divided by 255). Sizes must match the
model's input: a device gets what it was trained for, so nothing is resized.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from smallfed.compact.export import run_onnx
from smallfed.config import ConfigError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".gif", ".tif", ".tiff"}


def model_input_shape(model: str | Path) -> tuple[int, int, int]:
    """(C, H, W) the ONNX model expects."""
    if not Path(model).is_file():
        raise ConfigError(f"--model {model}: no such file; export one with `smallfed export`")
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    return tuple(int(d) for d in shape[1:])  # type: ignore[return-value]


def read_inputs(source: str | Path, shape: tuple[int, int, int]) -> tuple[list[str], np.ndarray]:
    """(names, pixels float32 (N, C, H, W) in [0, 1]); ConfigError naming what is wrong."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ConfigError(f"--input {source}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return [p.name for p in files], np.stack([_read_image(p, shape) for p in files])
    if source.suffix == ".npy" and source.is_file():
        array = np.load(source, allow_pickle=False)
        pixels = array / 255.0 if array.dtype == np.uint8 else array
        if pixels.ndim == 3 and shape[0] == 1:
            pixels = pixels[:, None]
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != shape:
            raise ConfigError(f"--input {source}: shape {tuple(array.shape)}, the model takes "
                              f"(N, {', '.join(map(str, shape))})")
        return [f"{source.name}[{i}]" for i in range(len(pixels))], pixels.astype(np.float32)
    raise ConfigError(f"--input {source}: expected a folder of images or an .npy file")


def _read_image(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    from PIL import Image

    channels, height, width = shape
    with Image.open(path) as image:
        image = image.convert("L" if channels == 1 else "RGB")
        if image.size != (width, height):
            raise ConfigError(f"{path.name}: {image.size[0]}x{image.size[1]} pixels, the model "
                              f"takes {width}x{height}")
        pixels = np.asarray(image, dtype=np.float32) / 255.0
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def predict(model: str | Path, source: str | Path) -> list[tuple[str, int, float]]:
    """(name, predicted class, its softmax probability) for every input."""
    names, pixels = read_inputs(source, model_input_shape(model))
    logits = run_onnx(model, pixels)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = shifted / shifted.sum(axis=1, keepdims=True)
    return [(n, int(p.argmax()), float(p.max())) for n, p in zip(names, probs)]
