"""Export stage: ONNX export with a parity check against PyTorch, logged to MLflow as an ONNX model.

Writes outputs/targets/<target>/export/ (model.onnx, metrics.json, logged_model.json: the logged model's URI and the
digest of the model.onnx it holds, for the register stage), after removing the previous export's.
"""
from __future__ import annotations

import flows.app  # noqa: F401 - first: the environment before Prefect and MLflow read it, and the schema

# isort: split

import json

from prefect import flow

from flows import artifacts
from flows.entry import cli, step_run
from flows.registry import log_onnx_model, logged_model

SAMPLE_IMAGES = 8


@flow(name="dna-export")
def export_flow(params_file: str = "params.yaml", overrides: dict | None = None, target: str | None = None) -> dict:
    """Export one search target's network (None: the first target's)."""
    from dna.checkpoint import atomic_write_text, file_digest
    from dna.export import read_metadata
    from dna.stages.export import stage_export

    with step_run("export", params_file, overrides, target=target) as step:
        run, mlrun = step.run, step.mlrun
        logged_model(run.paths).unlink(missing_ok=True)  # stage_export removes the other files of the last export
        metrics = step.task(stage_export, "export-onnx")(run)
        meta = read_metadata(run.paths.onnx)
        mlrun.metrics(metrics)
        mlrun.tags({"dna.arch": meta.get("arch")})
        mlrun.artifact(run.paths.export_metrics)
        info = log_onnx_model(run.paths.onnx, run.data.images("test", SAMPLE_IMAGES).numpy())
        record = {"model_uri": info.model_uri, "model_id": info.model_id, "run_id": mlrun.run_id,
                  "tracking_uri": mlrun.uri, "arch": meta.get("arch"), "onnx_digest": file_digest(run.paths.onnx)}
        atomic_write_text(logged_model(run.paths), json.dumps(record, indent=2) + "\n")
    logged = f"logged as `{info.model_uri}` (MLflow run `{mlrun.run_id}`)"
    artifacts.markdown(f"export-summary-{run.paths.target}".replace("_", "-"), artifacts.metrics_markdown(
        f"ONNX export of target {run.paths.target}", metrics, logged), "ONNX parity and accuracy in ONNX Runtime")
    return metrics | {"model_uri": info.model_uri}


STEP = export_flow  # what the pipeline flow runs for this step (flows/steps.py)


def main(argv: list[str] | None = None) -> int:
    return cli(STEP, __doc__, argv, step="export")


if __name__ == "__main__":
    from dna.command_gc import start

    start()
    raise SystemExit(main())
