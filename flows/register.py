"""Register stage: the exported model as a new version of mlflow.registered_model, tagged, then promotion.

Tags: arch (Arch.tag()), git_commit, data_hash, input_shape, class_names_digest (together what versions must share
to be compared), params_hash, test_accuracy, onnx_test_accuracy, max_abs_diff, atol.
Writes outputs/register/registration.json (version, aliases, the promotion decision).
"""
from __future__ import annotations

import json
from pathlib import Path

from prefect import flow

from flows import artifacts
from flows.entry import cli, step_run
from flows.hashes import data_hash, git_commit, params_hash
from flows.registry import comparability_tags, latest_version, log_onnx_model, promote, register_version

SAMPLE_IMAGES = 8


def arch_tag(run, record_file: Path) -> str:
    """The exported network's architecture tag: as the export stage recorded it, else read from the search's file
    (which imports timm, to check it)."""
    if record_file.is_file() and json.loads(record_file.read_text()).get("arch"):
        return json.loads(record_file.read_text())["arch"]
    from dna.arch import Arch

    return Arch.load(run.paths.arch).tag()


def logged_model_uri(client, record_file: Path) -> str | None:
    """The export stage's logged model, if it is in this tracking store."""
    from mlflow.exceptions import MlflowException

    if not record_file.is_file():
        return None
    record = json.loads(record_file.read_text())
    try:
        client.get_logged_model(record["model_id"])
    except (MlflowException, KeyError):
        return None
    return record["model_uri"]


@flow(name="dna-register")
def register_flow(params_file: str = "params.yaml", overrides: dict | None = None) -> dict:
    from mlflow.tracking import MlflowClient

    from dna.checkpoint import atomic_write_text

    with step_run("register", params_file, overrides) as step:
        params, run, mlrun = step.params, step.run, step.mlrun
        name, metric = params.mlflow.registered_model, params.mlflow.promote_metric
        exported = json.loads((run.paths.export_dir / "metrics.json").read_text())
        retrained = json.loads((run.paths.retrain_dir / "metrics.json").read_text())
        client = MlflowClient(mlrun.uri)
        model_uri = logged_model_uri(client, run.paths.export_dir / "logged_model.json")
        if model_uri is None:  # exported under another tracking store: log it again here
            model_uri = log_onnx_model(run.paths.onnx, run.data.images("test", SAMPLE_IMAGES).numpy()).model_uri
        tags = {"arch": arch_tag(run, run.paths.export_dir / "logged_model.json"), "git_commit": git_commit(),
                **comparability_tags(run.paths.onnx, data_hash(params, run.paths.splits)),
                "params_hash": params_hash(params),
                "test_accuracy": retrained["test_accuracy"], "onnx_test_accuracy": exported["onnx_test_accuracy"],
                "max_abs_diff": exported["max_abs_diff"], "atol": exported["atol"], "opset": exported["opset"],
                "params": retrained["params"], "macs": retrained["macs"], "model_uri": model_uri}
        version = register_version(client, name, model_uri, tags)
        result = promote(client, name, version, metric)
        mlrun.metrics({"version": version, "promoted": int(result.promoted)})
        mlrun.tags({"dna.registered_model": name, "dna.registered_version": str(version),
                    "dna.promotion": result.reason})
    record = result.to_dict() | {"latest_version": latest_version(client, name), "model_uri": model_uri,
                                 "promoted": int(result.promoted)}
    out = run.paths.root / "register"
    atomic_write_text(out / "registration.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
    artifacts.markdown("registration", "\n".join([
        f"### {name} version {version}", "",
        f"**{'champion' if result.promoted else 'not promoted'}**: {result.reason}",
        "", f"champion now: version {result.champion}", "", f"load it with `models:/{name}@champion`"]) + "\n",
        "model registry decision")
    print(result.summary())
    return record


def main(argv: list[str] | None = None) -> int:
    return cli(lambda path, sets: register_flow(path, sets), __doc__, argv, step="register")


if __name__ == "__main__":
    raise SystemExit(main())
