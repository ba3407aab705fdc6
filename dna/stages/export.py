"""The export stage: the retrained network in ONNX, checked against PyTorch."""
from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from dna.checkpoint import checkpoint_digest, write_json
from dna.context import EVAL_BATCH_SIZE
from dna.errors import needed
from dna.locks import locked

if TYPE_CHECKING:
    from dna.spaces.context import SpaceContext

log = logging.getLogger(__name__)


@locked("export", per_target=True)
def stage_export(run: SpaceContext) -> dict:
    """Export the retrained student to ONNX (with the class names of the data and the digest of retrain/model.pt),
    check parity, and measure its test accuracy in ONNX Runtime batch by batch.

    The previous export's files go first, so an export that fails or is interrupted leaves none that a later stage
    could take for this one's."""
    from dna.arch import Arch
    from dna.checkpoint import load_checkpoint
    from dna.export import CHECKPOINT_DIGEST, export_onnx, onnx_accuracy
    from dna.spaces.base import require

    require(run.space, "networks", "the export")
    for previous in (run.paths.export_metrics, run.paths.onnx):
        previous.unlink(missing_ok=True)
    # the digest before the weights: a model.pt replaced in between leaves the old digest, which registration refuses
    source = checkpoint_digest(run.paths.model)
    state = load_checkpoint(run.paths.model)
    arch = Arch.from_yaml(state["arch"])
    model = run.space.build(arch)
    model.load_state_dict(state["model"])
    retrain = json.loads(needed(run.paths.retrain_metrics, "retrain").read_text())
    images = run.data.images("test", 64)
    metadata = {"arch": arch.tag(), "arch_yaml": arch.to_yaml(), "test_accuracy": f"{retrain['test_accuracy']:.6f}",
                "params": str(retrain["params"]), "macs": str(retrain["macs"]),
                "input": json.dumps({"channels": run.data.in_chans, "size": run.data.image_size}),
                CHECKPOINT_DIGEST: source}
    report = export_onnx(model, images, run.paths.onnx, metadata, atol=run.params.export.atol,
                         opset=run.params.export.opset, class_names=run.data.class_names,
                         exporter=run.params.export.exporter)
    onnx_acc = onnx_accuracy(run.paths.onnx, run.data.loader("test", EVAL_BATCH_SIZE))
    metrics = {"max_abs_diff": report.max_abs_diff, "parity_images": report.num_images, "opset": report.opset,
               "onnx_test_accuracy": onnx_acc, "atol": run.params.export.atol, CHECKPOINT_DIGEST: source}
    write_json(run.paths.export_metrics, metrics)
    return metrics
