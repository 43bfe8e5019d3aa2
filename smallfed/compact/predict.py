"""Run an exported model in onnxruntime on images or tabular rows, as a device would.

For an image model, inputs are a folder of images (PNG, JPEG, BMP, PGM: read with
Pillow, converted to the model's channels) or an ``.npy`` array of shape
(N, C, H, W) or (N, H, W), with pixel intensities in [0, 1] (uint8 arrays are
divided by 255). For a model of F tabular features, inputs are an ``.npy`` array or
a ``.csv`` file (comma-separated, an optional header row) of shape (N, F), with the
features as the dataset holds them before normalisation. Sizes must match the
model's input: a device gets what it was trained for, so nothing is resized.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from smallfed.compact.export import run_onnx
from smallfed.config import ConfigError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".gif", ".tif", ".tiff"}


def model_input_shape(model: str | Path) -> tuple[int, ...]:
    """One sample's shape the ONNX model expects: (C, H, W) or (F,)."""
    if not Path(model).is_file():
        raise ConfigError(f"--model {model}: no such file; export one with `smallfed export`")
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    return tuple(int(d) for d in shape[1:])


def read_inputs(source: str | Path, shape: tuple[int, ...]) -> tuple[list[str], np.ndarray]:
    """(names, float32 inputs of shape (N, *shape)); ConfigError naming what is wrong."""
    source = Path(source)
    if len(shape) == 1:
        return read_rows(source, shape[0])
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ConfigError(f"--input {source}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        images = [_read_image(p, shape) for p in files]  # type: ignore[arg-type]
        return [p.name for p in files], np.stack(images)
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


def read_rows(source: Path, features: int) -> tuple[list[str], np.ndarray]:
    """(names, float32 (N, features)) from an .npy or .csv file, for a tabular model."""
    if source.suffix == ".npy" and source.is_file():
        rows = np.load(source, allow_pickle=False)
    elif source.suffix == ".csv" and source.is_file():
        rows = _read_csv(source)
    else:
        raise ConfigError(f"--input {source}: the model takes rows of {features} features; "
                          f"give an .npy or .csv file of shape (N, {features})")
    if rows.ndim != 2 or rows.shape[1] != features or not np.issubdtype(rows.dtype, np.number):
        raise ConfigError(f"--input {source}: shape {tuple(rows.shape)}, the model takes "
                          f"(N, {features})")
    return [f"{source.name}[{i}]" for i in range(len(rows))], rows.astype(np.float32)


def _read_csv(path: Path) -> np.ndarray:
    """Numbers separated by commas, one row a sample; a first row of names is skipped."""
    with path.open() as fh:
        first = fh.readline().split(",")
    header = not all(_is_number(cell) for cell in first)
    try:
        return np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float32, skiprows=int(header))
    except ValueError as err:
        raise ConfigError(f"--input {path}: not a CSV of numbers ({err})") from err


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


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
