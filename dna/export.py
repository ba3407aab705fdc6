"""ONNX export with metadata, checker validation and an onnxruntime parity check.

The exported graph answers, per image, the model's `logits`, the class `probabilities` (softmax over the classes)
and the predicted `class_index` (int64); the class names it was trained on are in its metadata (`class_names`,
a JSON list indexed by class_index).
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch

from dna.checkpoint import staged_file
from dna.errors import DetectedFault

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
PROBABILITIES = "probabilities"
CLASS_INDEX = "class_index"
OUTPUT_NAMES = (OUTPUT_NAME, PROBABILITIES, CLASS_INDEX)
CHECKPOINT_DIGEST = "checkpoint_digest"  # metadata: the digest of the checkpoint the graph was exported from


@dataclass(frozen=True)
class ExportReport:
    path: Path
    max_abs_diff: float
    opset: int
    num_images: int


class ParityError(RuntimeError, DetectedFault):
    """ONNX Runtime outputs differ from the PyTorch model by more than the tolerance."""
    fails_alike = True

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
    class_names: list[str] | None = None,
    exporter: str = "torchscript",
) -> ExportReport:
    """Export ``model`` (in eval mode) to a single self-contained ONNX file at ``path``.

    The graph's outputs are OUTPUT_NAMES; ``class_names`` (one per logit) go into the
    metadata as a JSON list. The file only appears at ``path`` once the checker and the
    parity check (logits and probabilities, on two batch sizes) have passed. On a parity
    failure any previous file at ``path`` is removed too, so a stale export cannot be
    mistaken for this one.

    ``exporter`` names torch's ONNX exporter (EXPORTERS): "torchscript" (opsets up to 20; a tenth of the time for these
    networks: benchmarks/export_speed.py) or "dynamo" (torch.export-based, torch's default).
    """
    path = Path(path)
    if class_names is not None:
        metadata = {**metadata, "class_names": json.dumps([str(n) for n in class_names])}
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        # Exporting with batch 1 would specialise the batch dimension, so probe with >= 2.
        probe = images.detach().cpu().float()
        if len(probe) == 1:
            probe = torch.cat([probe, probe])
        proto = EXPORTERS[exporter](model, probe.to(_device(model)), opset)
        add_prediction_outputs(proto)
        if class_names is not None:
            _check_class_count(model, probe, len(class_names))
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


def _torchscript(model: torch.nn.Module, probe: torch.Tensor, opset: int) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # deprecated since torch 2.9, not removed
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # the parity check below tells
        torch.onnx.export(model, (probe,), buffer, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


def _dynamo(model: torch.nn.Module, probe: torch.Tensor, opset: int) -> onnx.ModelProto:
    return torch.onnx.export(model, (probe,), f=None, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                             opset_version=opset, dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},),
                             verbose=False).model_proto


# torch's ONNX exporters: the graph of `model` at `probe` (batch >= 2), its batch dimension dynamic
EXPORTERS: dict[str, Callable[[torch.nn.Module, torch.Tensor, int], onnx.ModelProto]] = {
    "torchscript": _torchscript, "dynamo": _dynamo}
TORCHSCRIPT_MAX_OPSET = 20


def add_prediction_outputs(proto: onnx.ModelProto) -> None:
    """Append `probabilities` (Softmax of the logits over classes) and `class_index` (their ArgMax, int64, one per
    image) to the graph's outputs, after `logits`."""
    graph = proto.graph
    (logits,) = [o for o in graph.output if o.name == OUTPUT_NAME]
    taken = {name for node in graph.node for name in node.output} | {v.name for v in graph.input}
    if taken & {PROBABILITIES, CLASS_INDEX}:
        raise ValueError(f"the exported graph already has a value named {PROBABILITIES!r} or {CLASS_INDEX!r}")
    graph.node.extend([
        onnx.helper.make_node("Softmax", [OUTPUT_NAME], [PROBABILITIES], name="dna_probabilities", axis=1),
        onnx.helper.make_node("ArgMax", [OUTPUT_NAME], [CLASS_INDEX], name="dna_class_index", axis=1, keepdims=0),
    ])
    probabilities = onnx.ValueInfoProto()
    probabilities.CopyFrom(logits)
    probabilities.name = PROBABILITIES
    batch = logits.type.tensor_type.shape.dim[0]
    index = onnx.helper.make_tensor_value_info(CLASS_INDEX, onnx.TensorProto.INT64,
                                               [batch.dim_param or batch.dim_value or None])
    graph.output.extend([probabilities, index])


def _check_class_count(model: torch.nn.Module, probe: torch.Tensor, count: int) -> None:
    with torch.no_grad():
        width = model(probe[:1].to(_device(model))).shape[1]
    if width != count:
        raise ValueError(f"{count} class names for a model with {width} outputs")


def _max_abs_diff(model: torch.nn.Module, session: ort.InferenceSession, batch: torch.Tensor) -> float:
    """The largest difference of logits and probabilities from PyTorch's; inf when a shape differs or class_index
    is not the argmax of the logits."""
    with torch.no_grad():
        logits = model(batch.to(_device(model))).float().cpu()
    expected = (logits.numpy(), torch.softmax(logits, dim=1).numpy())
    actual = session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch.numpy()})
    if any(a.shape != e.shape for a, e in zip(actual, expected)) or actual[2].shape != (len(batch),) \
            or not np.array_equal(actual[2], actual[0].argmax(axis=1)):
        return float("inf")
    return max(float(np.max(np.abs(a - e), initial=0.0)) for a, e in zip(actual, expected))


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def _session(path: str | Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def read_metadata(path: str | Path) -> dict[str, str]:
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def input_shape(path: str | Path) -> str:
    """The graph's input shape per image, e.g. "1x28x28" (a symbolic dimension by its name)."""
    model = onnx.load(str(path), load_external_data=False)
    (images,) = [i for i in model.graph.input if i.name == INPUT_NAME]
    dims = images.type.tensor_type.shape.dim[1:]
    return "x".join(str(d.dim_value) if d.HasField("dim_value") else d.dim_param or "?" for d in dims)


def class_names(path: str | Path) -> list[str] | None:
    """The class names recorded at export (by class_index), or None for an export without them."""
    names = read_metadata(path).get("class_names")
    return json.loads(names) if names is not None else None


def onnx_outputs(path: str | Path, images: np.ndarray) -> dict[str, np.ndarray]:
    """Every output of the graph by name (logits, probabilities, class_index for an export of this module)."""
    session = _session(path)
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {INPUT_NAME: np.ascontiguousarray(images, dtype=np.float32)})
    return dict(zip(names, values))


def onnx_predict(path: str | Path, images: np.ndarray) -> np.ndarray:
    """The logits."""
    session = _session(path)
    return session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images, dtype=np.float32)})[0]


def onnx_accuracy(path: str | Path, batches) -> float:
    """Top-1 accuracy of the ONNX model in ONNX Runtime over (images, labels) batches (a DataLoader), one batch
    in memory at a time."""
    session = _session(path)
    correct = total = 0
    for images, labels in batches:
        feed = {INPUT_NAME: np.ascontiguousarray(np.asarray(images), dtype=np.float32)}
        predicted = session.run([OUTPUT_NAME], feed)[0].argmax(axis=1)
        correct += int((predicted == np.asarray(labels)).sum())
        total += len(labels)
    return correct / max(total, 1)
