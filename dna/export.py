"""ONNX export with metadata, checker validation and an onnxruntime parity check."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from dna.checkpoint import staged_file

INPUT_NAME = "images"
OUTPUT_NAME = "logits"


@dataclass(frozen=True)
class ExportReport:
    path: Path
    max_abs_diff: float
    opset: int
    num_images: int


class ParityError(RuntimeError):
    """ONNX Runtime outputs differ from the PyTorch model by more than the tolerance."""

    def __init__(self, message: str, max_abs_diff: float):
        super().__init__(message)
        self.max_abs_diff = max_abs_diff


def export_onnx(
    model: torch.nn.Module,
    images: torch.Tensor,
    path: str | Path,
    metadata: dict[str, str],
    atol: float = 1e-4,
    opset: int = 18,
) -> ExportReport:
    """Export ``model`` (in eval mode) to a single self-contained ONNX file at ``path``.

    The file only appears at ``path`` once the checker and the parity check on two
    batch sizes have passed. On a parity failure any previous file at ``path`` is
    removed too, so a stale export cannot be mistaken for this one.
    """
    path = Path(path)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        # Exporting with batch 1 would specialise the batch dimension, so probe with >= 2.
        probe = images.detach().cpu().float()
        if len(probe) == 1:
            probe = torch.cat([probe, probe])
        program = torch.onnx.export(
            model,
            (probe.to(_device(model)),),
            f=None,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
        proto = program.model_proto
        onnx.helper.set_model_props(
            proto, {**{p.key: p.value for p in proto.metadata_props}, **metadata}
        )

        with staged_file(path) as tmp:
            onnx.save(proto, tmp, save_as_external_data=False)
            onnx.checker.check_model(str(tmp))
            session = _session(tmp)
            diff = max(_max_abs_diff(model, session, batch) for batch in (probe, probe[:1]))
            if not diff <= atol:  # also catches NaN
                path.unlink(missing_ok=True)
                raise ParityError(
                    f"ONNX export {path}: max abs diff {diff:.3g} exceeds atol {atol:.3g}",
                    diff,
                )
    finally:
        for m, training in modes.items():
            m.training = training

    opset_used = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return ExportReport(path=path, max_abs_diff=diff, opset=opset_used, num_images=len(images))


def _max_abs_diff(model: torch.nn.Module, session: ort.InferenceSession, batch: torch.Tensor) -> float:
    with torch.no_grad():
        expected = model(batch.to(_device(model))).float().cpu().numpy()
    actual = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0]
    if actual.shape != expected.shape:
        return float("inf")
    return float(np.max(np.abs(actual - expected), initial=0.0))


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def _session(path: str | Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def read_metadata(path: str | Path) -> dict[str, str]:
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def onnx_predict(path: str | Path, images: np.ndarray) -> np.ndarray:
    session = _session(path)
    return session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images, dtype=np.float32)})[0]
