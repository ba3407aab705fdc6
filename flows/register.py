"""Register stage: each search target's exported model as a version of its registered model (`model_name`: one per
target, so that each has its own versions, champion and promotion), tagged, then promotion within that model.

The export must come from the current targets/<target>/retrain/model.pt (the digest the export recorded in model.onnx
and its metrics.json): otherwise the stage fails, registering nothing. An ONNX file registered before (same digest, tag
onnx_digest) keeps its version: a rerun after an interruption adds none.

Tags: arch (Arch.tag()), git_commit, data_hash, input_shape, class_names_digest (together what versions must share
to be compared), params_hash, test_accuracy, onnx_test_accuracy, max_abs_diff, atol, onnx_digest.
Writes outputs/register/<target>/registration.json (version, aliases, the promotion decision).
"""
from __future__ import annotations

import flows.app  # noqa: F401 - first: the environment before Prefect and MLflow read it, and the schema

# isort: split

import json
from pathlib import Path

from prefect import flow

from dna.errors import needed
from flows import artifacts
from flows.entry import cli, step_run
from flows.hashes import data_hash, git_commit, params_hash
from flows.registry import (
    ONNX_DIGEST_TAG,
    comparability_tags,
    latest_version,
    log_onnx_model,
    logged_model,
    model_name,
    promote,
    register_version,
    registered_version,
)
from flows.steps import registration

SAMPLE_IMAGES = 8


def current_export(paths) -> dict:
    """The export's metrics, once model.onnx and metrics.json are known to be exported from the current
    retrain/model.pt; StageFailure (nothing registered) if either records another checkpoint or none."""
    from dna.checkpoint import checkpoint_digest
    from dna.errors import StageFailure
    from dna.export import CHECKPOINT_DIGEST, read_metadata

    exported = json.loads(needed(paths.export_metrics, "export").read_text())
    model = checkpoint_digest(paths.model)
    stale = [str(path) for path, source in ((paths.onnx, read_metadata(paths.onnx).get(CHECKPOINT_DIGEST)),
                                            (paths.export_metrics, exported.get(CHECKPOINT_DIGEST)))
             if source != model]
    if stale:
        raise StageFailure(f"{' and '.join(stale)}: not exported from the current {paths.model} (retrained since, "
                           f"or the export did not finish); run the export stage again before registering")
    return exported


def arch_tag(run) -> str:
    """The exported network's architecture tag: as the export recorded it in model.onnx, else read from the
    search's file (which imports timm, to check it)."""
    from dna.export import read_metadata

    recorded = read_metadata(run.paths.onnx).get("arch")
    if recorded:
        return recorded
    from dna.arch import Arch

    return Arch.load(run.paths.arch).tag()


def logged_model_uri(client, record_file: Path, onnx_digest: str) -> str | None:
    """The export stage's logged model, if it is in this tracking store and holds the ONNX file of this digest."""
    from mlflow.exceptions import MlflowException

    if not record_file.is_file():
        return None
    record = json.loads(record_file.read_text())
    if record.get("onnx_digest") != onnx_digest:
        return None
    try:
        client.get_logged_model(record["model_id"])
    except (MlflowException, KeyError):
        return None
    return record["model_uri"]


def register_model(params_file: str | Path = "params.yaml", overrides: dict | None = None,
                   target: str | None = None) -> dict:
    """Register one search target's exported model (None: the first target's) and promote it within that target's
    model (MLflow only: what `dna register`, dvc.yaml's register stage, runs); returns the registry's decision, also
    written to register/<target>/registration.json."""
    from mlflow.tracking import MlflowClient

    from dna.checkpoint import atomic_write_text, file_digest

    with step_run("register", params_file, overrides, target=target) as step:
        params, run, mlrun = step.params, step.run, step.mlrun
        name = model_name(params.mlflow.registered_model, run.paths.target)
        metric = params.mlflow.promote_metric
        exported = current_export(run.paths)
        retrained = json.loads(needed(run.paths.retrain_metrics, "retrain").read_text())
        client = MlflowClient(mlrun.uri)
        onnx_digest = file_digest(run.paths.onnx)
        version = registered_version(client, name, onnx_digest)
        if version is not None:  # registered before (a rerun): the same version, promoted again
            model_uri = client.get_model_version(name, str(version)).tags.get("model_uri")
        else:
            model_uri = logged_model_uri(client, logged_model(run.paths), onnx_digest)
            if model_uri is None:  # exported under another tracking store, or logged from another file: log it here
                model_uri = log_onnx_model(run.paths.onnx, run.data.images("test", SAMPLE_IMAGES).numpy()).model_uri
            tags = {"arch": arch_tag(run), "git_commit": git_commit(), "params_hash": params_hash(params),
                    **comparability_tags(run.paths.onnx, data_hash(params, run.paths.splits)),
                    "test_accuracy": retrained["test_accuracy"], "onnx_test_accuracy": exported["onnx_test_accuracy"],
                    "max_abs_diff": exported["max_abs_diff"], "atol": exported["atol"], "opset": exported["opset"],
                    "params": retrained["params"], "macs": retrained["macs"], "model_uri": model_uri,
                    ONNX_DIGEST_TAG: onnx_digest}
            version = register_version(client, name, model_uri, tags)
        result = promote(client, name, version, metric, reinstate=False)
        mlrun.metrics({"version": version, "promoted": int(result.promoted)})
        mlrun.tags({"dna.registered_model": name, "dna.registered_version": str(version),
                    "dna.promotion": result.reason})
    record = result.to_dict() | {"latest_version": latest_version(client, name), "model_uri": model_uri,
                                 "promoted": int(result.promoted)}
    record["target"] = run.paths.target
    atomic_write_text(registration(run.paths), json.dumps(record, indent=2, sort_keys=True) + "\n")
    print(result.summary())
    return record


@flow(name="dna-register")
def register_flow(params_file: str = "params.yaml", overrides: dict | None = None, target: str | None = None) -> dict:
    record = register_model(params_file, overrides, target)
    name = record["name"]
    artifacts.markdown(f"registration-{record['target']}".replace("_", "-"), "\n".join([
        f"### {name} version {record['version']}", "",
        f"**{'champion' if record['promoted'] else 'not promoted'}**: {record['reason']}",
        "", f"champion now: version {record['champion']}", "", f"load it with `models:/{name}@champion`"]) + "\n",
        "model registry decision")
    return record


STEP = register_flow  # what the pipeline flow runs for this step (flows/steps.py)


def main(argv: list[str] | None = None) -> int:
    return cli(STEP, __doc__, argv, step="register")


if __name__ == "__main__":
    from dna.command_gc import start

    start()
    raise SystemExit(main())
