"""Export a run's global model to ONNX (fp32 or int8) that onnxruntime runs on a device.

The exported model takes pixel intensities in [0, 1], shape (N, C, H, W): the
dataset's normalisation is its first layer, so a device needs no smallfed code.
Structured-pruned channels are dropped first (:mod:`shrink`). int8 is onnxruntime's
static quantization (QDQ, per-channel int8 weights, uint8 activations) calibrated on
training-pool images, never on the held-out images the accuracy is measured on.

Every export checks itself on the held-out test set before the file is written:
fp32 must give torch's predictions (logits within ``FP32_TOLERANCE``); for int8 the
accuracy of both is reported, and a drop of more than ``INT8_TOLERANCE`` is warned
about (quantization-aware training, ``qat-rounds``, is the cure).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from smallfed.compact.sharing import codebook_bytes, shared_names
from smallfed.compact.shrink import shrink
from smallfed.config import Config, ConfigError
from smallfed.data import federated_data
from smallfed.flower.checkpoint import load
from smallfed.models import build_model, macs

FP32_TOLERANCE = 1e-3  # max |logit difference| between torch and onnxruntime
INT8_TOLERANCE = 0.01  # accuracy points an int8 model may lose before we warn
INPUT, OUTPUT = "pixels", "logits"


@dataclass(frozen=True)
class ExportReport:
    """What the exported model is and how it does on the held-out test set."""

    path: str
    precision: str
    file_bytes: int
    params: int
    nonzero_params: int
    macs: int
    test_images: int
    torch_accuracy: float
    onnx_accuracy: float
    prediction_agreement: float
    max_logit_difference: float
    # With share-weights: the shared layers as packed indices plus codebooks, which
    # ONNX has no type for (the file holds them dequantized, int8 with --int8).
    codebook_bytes: int | None = None


class Pixels(nn.Module):
    """(pixels - mean) / std: the dataset's normalisation, inside the model."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def to_onnx(model: nn.Module, input_shape: tuple[int, ...], path: Path) -> None:
    """torch's exporter (dynamo), one self-contained file, a dynamic batch dimension."""
    example = torch.zeros(2, *input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), str(path), input_names=[INPUT],
                          output_names=[OUTPUT], dynamic_shapes=({0: "batch"},), dynamo=True,
                          external_data=False, verbose=False)
    strip(path)


def strip(path: Path) -> None:
    """Drop what a device does not need: the exporter's per-node stack traces and names'
    documentation, and inferred shapes. They can be a third of a small model's file."""
    model = onnx.load(str(path))
    for node in model.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    del model.graph.value_info[:]
    del model.metadata_props[:]
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray) -> None:
    """onnxruntime static quantization: QDQ, per-channel int8 weights, uint8 activations."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(np.array_split(calibration, max(1, len(calibration) // 32)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT: batch}

    prepared = out.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(fp32), str(prepared))
        quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
    finally:
        prepared.unlink(missing_ok=True)
    strip(out)


def run_onnx(path: str | Path, pixels: np.ndarray, batch: int = 256) -> np.ndarray:
    """Logits from onnxruntime, as a device computes them (one CPU thread)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run([OUTPUT], {INPUT: pixels[i:i + batch]})[0]
                           for i in range(0, len(pixels), batch)])


def export_run(run_dir: str | Path, output: str | Path, int8: bool = False,
               calibration_images: int = 256) -> ExportReport:
    """Export the last global model of ``run_dir``; the file appears only if it checks out."""
    checkpoint = load(run_dir)
    output = Path(output)
    if output.suffix != ".onnx":
        raise ConfigError(f"--output {output}: name an .onnx file")
    cfg = Config.from_mapping(checkpoint.config)
    dataset = federated_data(cfg).dataset
    shape = dataset.input_shape
    model = build_model(cfg.model, shape, dataset.num_classes, cfg.seed)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in checkpoint.global_arrays.items()})
    model.eval()
    deployed = nn.Sequential(Pixels(dataset.pixel_mean, dataset.pixel_std), shrink(model, shape))
    test_pixels = (dataset.test_x * dataset.pixel_std + dataset.pixel_mean).numpy()
    with torch.no_grad():
        torch_logits = model(dataset.test_x).numpy()
    rng = np.random.default_rng(cfg.seed)
    pool = dataset.train_x[rng.permutation(len(dataset.train_x))[:calibration_images]]
    calibration = (pool * dataset.pixel_std + dataset.pixel_mean).numpy()

    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        fp32 = Path(tmp) / "model.onnx"
        to_onnx(deployed, shape, fp32)
        final = fp32
        if int8:
            final = Path(tmp) / "model.int8.onnx"
            quantize_int8(fp32, final, calibration)
        onnx_logits = run_onnx(final, test_pixels)
        difference = float(np.abs(onnx_logits - torch_logits).max())
        if not int8 and difference > FP32_TOLERANCE:
            raise RuntimeError(f"the ONNX model's logits differ from torch's by {difference:.2e} "
                               f"(> {FP32_TOLERANCE}); the file was not written")
        labels = dataset.test_y.numpy()
        report = ExportReport(
            path=str(output), precision="int8" if int8 else "fp32",
            file_bytes=final.stat().st_size,
            params=sum(p.numel() for p in deployed.parameters()),
            nonzero_params=int(sum((p != 0).sum() for p in deployed.parameters())),
            macs=macs(deployed, shape), test_images=len(labels),
            torch_accuracy=float((torch_logits.argmax(1) == labels).mean()),
            onnx_accuracy=float((onnx_logits.argmax(1) == labels).mean()),
            prediction_agreement=float((onnx_logits.argmax(1) == torch_logits.argmax(1)).mean()),
            max_logit_difference=difference,
            codebook_bytes=codebook_bytes(checkpoint.global_arrays, shared_names(model))
            if cfg.share_weights else None,
        )
        os.replace(final, output)
    output.with_suffix(".json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    if report.torch_accuracy - report.onnx_accuracy > INT8_TOLERANCE:
        warnings.warn(f"int8 accuracy {report.onnx_accuracy:.4f} is more than "
                      f"{INT8_TOLERANCE:.0%} below torch's {report.torch_accuracy:.4f}; "
                      "train the last rounds with qat-rounds", stacklevel=2)
    return report
