"""The MLflow model registry: logging the ONNX export, registering it as a version, and promotion by alias.

Every new version gets the alias `challenger`. The alias `champion` moves to it only if it passes ONNX parity
(its max_abs_diff tag is at most its atol tag, the export tolerance) and beats the current champion on the
configured metric (or there is no champion yet); otherwise the result says why and champion stays where it is.
Consumers load `models:/<name>@champion`.
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from typer import Option as typer_option

CHAMPION = "champion"
CHALLENGER = "challenger"
PROMOTION_TAG = "promotion"
CANDIDATE_TAG = "dna.candidate"


@dataclass(frozen=True)
class PromotionResult:
    name: str
    version: int
    promoted: bool
    reason: str
    metric: str
    value: float | None
    previous_champion: int | None
    previous_value: float | None

    @property
    def champion(self) -> int | None:
        """The champion version after the decision."""
        return self.version if self.promoted else self.previous_champion

    def summary(self) -> str:
        verdict = "promoted to champion" if self.promoted else "not promoted"
        return f"{self.name} version {self.version}: {verdict}: {self.reason}"

    def to_dict(self) -> dict:
        return asdict(self) | {"champion": self.champion}


def _float(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if not math.isnan(out) else None


def _by_alias(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def promote(client, name: str, version: int | str, metric: str) -> PromotionResult:
    """Give `version` the alias challenger; move champion to it if it passes parity and beats the champion.

    The version's tags carry what is compared: `max_abs_diff` and `atol` (ONNX parity) and `metric`. A version
    that passes parity and has the metric becomes a candidate (tag dna.candidate); champion then goes to the best
    candidate (the oldest among equals), re-checked after every move, so promotions that race end with champion on
    the best of them whatever their order. The decision is recorded on the version as the tag `promotion`.
    """
    version = int(version)
    candidate = client.get_model_version(name, str(version))  # raises if there is no such version
    client.set_registered_model_alias(name, CHALLENGER, str(version))
    tags = candidate.tags or {}
    value = _float(tags.get(metric))
    diff, atol = _float(tags.get("max_abs_diff")), _float(tags.get("atol"))
    current = _by_alias(client, name, CHAMPION)
    current_version = int(current.version) if current is not None else None
    current_value = _float((current.tags or {}).get(metric)) if current is not None else None

    def result(promoted: bool, reason: str) -> PromotionResult:
        client.set_model_version_tag(name, str(version), PROMOTION_TAG,
                                     ("champion: " if promoted else "refused: ") + reason)
        return PromotionResult(name, version, promoted, reason, metric, value, current_version, current_value)

    if current_version == version:
        return result(True, "already the champion")
    if diff is None or atol is None:
        return result(False, "no ONNX parity record (tags max_abs_diff and atol are required)")
    if not diff <= atol:
        return result(False, f"fails ONNX parity: max_abs_diff {diff:.3g} > atol {atol:.3g}")
    if value is None:
        return result(False, f"no {metric} tag to compare")
    client.set_model_version_tag(name, str(version), CANDIDATE_TAG, "true")
    champion, champion_value = settle_champion(client, name, metric)
    if champion != version:
        return result(False, f"{metric} {value:.4f} does not beat champion version {champion} ({champion_value:.4f})")
    if current is None:
        return result(True, f"no champion yet; {metric} {value:.4f}, parity max_abs_diff {diff:.3g} <= {atol:.3g}")
    against = f"{current_value:.4f}" if current_value is not None else "no recorded value"
    return result(True, f"{metric} {value:.4f} beats champion version {current_version} ({against}); "
                        f"parity max_abs_diff {diff:.3g} <= {atol:.3g}")


def candidate_values(client, name: str, metric: str) -> dict[int, float]:
    """Versions tagged dna.candidate=true (set only after parity passed) with a value of `metric`, by version."""
    versions = client.search_model_versions(f"name = '{name}'")
    values = {int(v.version): _float((v.tags or {}).get(metric)) for v in versions
              if (v.tags or {}).get(CANDIDATE_TAG) == "true"}
    return {v: x for v, x in values.items() if x is not None}


def settle_champion(client, name: str, metric: str, max_moves: int = 100) -> tuple[int, float]:
    """Point champion at the best candidate version and check again until nothing moved it in between.

    Candidates: candidate_values() and the current champion. Whoever moves the alias last re-reads every candidate
    afterwards, so the last check of all sees the final alias on the best candidate. A candidate tagged
    dna.candidate=withdrawn takes no part.
    """
    for _ in range(max_moves):
        values = candidate_values(client, name, metric)
        current = _by_alias(client, name, CHAMPION)
        current_tags = (current.tags or {}) if current is not None else {}
        if current is not None and current_tags.get(CANDIDATE_TAG) != "withdrawn" \
                and _float(current_tags.get(metric)) is not None:
            values.setdefault(int(current.version), _float(current_tags.get(metric)))
        if not values:
            raise RuntimeError(f"{name}: no version is a candidate for champion (none passed parity with a {metric})")
        best = max(values, key=lambda v: (values[v], -v))
        if current is not None and int(current.version) == best:
            return best, values[best]
        client.set_registered_model_alias(name, CHAMPION, str(best))
    raise RuntimeError(f"{name}: the champion alias kept moving under {max_moves} promotions; try again")


def withdraw(client, name: str, version: int | str, metric: str) -> int | None:
    """Take a version out of the running for champion (a rollback); champion moves to the best remaining candidate.
    Returns the champion afterwards (None if no candidate remains, the alias then removed)."""
    client.set_model_version_tag(name, str(version), CANDIDATE_TAG, "withdrawn")
    current = _by_alias(client, name, CHAMPION)
    if current is not None and int(current.version) == int(version):
        client.delete_registered_model_alias(name, CHAMPION)
    return settle_champion(client, name, metric)[0] if candidate_values(client, name, metric) else None


def latest_version(client, name: str) -> int | None:
    versions = client.search_model_versions(f"name = '{name}'")
    return max((int(v.version) for v in versions), default=None)


# logging and registering --------------------------------------------------------------------------------------------
def onnx_requirements() -> list[str]:
    import onnx
    import onnxruntime

    return [f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"]


def log_onnx_model(onnx_path: str | Path, sample, name: str = "model", example_images: int = 2):
    """Log an ONNX file to the active MLflow run as a model; returns its ModelInfo (model_uri: models:/<id>).

    `sample` is a small batch of real inputs (numpy); the signature is inferred from it and every output of the model
    (logits, probabilities, class_index for an export of dna.export), and its first `example_images` are the input
    example. The model's metadata carries the export's arch, accuracy, cost and class names (a list, by class_index).
    """
    import json

    import mlflow
    import numpy as np
    import onnx
    from mlflow.models import infer_signature

    from dna.export import onnx_outputs

    sample = np.ascontiguousarray(sample, dtype=np.float32)
    signature = infer_signature(sample, onnx_outputs(onnx_path, sample))
    proto = onnx.load(str(onnx_path))  # log_model rewrites the proto it is given: load a fresh one each time
    props = {p.key: p.value for p in proto.metadata_props}
    metadata = {k: v for k, v in props.items() if k in ("arch", "test_accuracy", "params", "macs")}
    if "class_names" in props:
        metadata["class_names"] = json.loads(props["class_names"])
    example = sample[:example_images] if example_images > 0 else None
    return mlflow.onnx.log_model(proto, name=name, signature=signature, input_example=example,
                                 pip_requirements=onnx_requirements(),
                                 onnx_execution_providers=["CPUExecutionProvider"], metadata=metadata)


def register_version(client, name: str, model_uri: str, tags: dict[str, str]) -> int:
    """A new version of the registered model `name` (created if needed) for model_uri, with tags."""
    import mlflow

    mlflow.set_tracking_uri(client.tracking_uri)
    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items() if v is not None})
    return int(version.version)


def load_champion(tracking_uri: str, name: str):
    """An ONNX Runtime session for models:/<name>@champion."""
    import mlflow
    import onnxruntime as ort

    mlflow.set_tracking_uri(tracking_uri)
    proto = mlflow.onnx.load_model(f"models:/{name}@{CHAMPION}")
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


# command line -------------------------------------------------------------------------------------------------------
def promote_cli(params_file: str | Path = "params.yaml", version: int | None = None,
                withdrawn: int | None = None) -> int:
    """`dna promote`: promote a version (default: the newest) of mlflow.registered_model by the rules above;
    with `withdrawn`, take that version out of the running instead (champion goes to the best remaining one).

    Prints one line; exit code 0 if it is the champion afterwards, 1 if it was refused, 2 on an error
    (bad config, no such model or version).
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from dna.config import ConfigError, load_params
    from flows.tracking import tracking_uri

    try:
        params = load_params(params_file, check_paths=False)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    name = params.mlflow.registered_model
    client = MlflowClient(tracking_uri(params))
    try:
        if version is None and withdrawn is None:
            version = latest_version(client, name)
            if version is None:
                print(f"error: registered model {name!r} has no versions in {client.tracking_uri}", file=sys.stderr)
                return 2
        if withdrawn is not None:
            now = withdraw(client, name, withdrawn, params.mlflow.promote_metric)
            print(f"{name} version {withdrawn} withdrawn; champion now: "
                  + (f"version {now}" if now is not None else "none (no candidate left)"))
            return 0
        result = promote(client, name, version, params.mlflow.promote_metric)
    except MlflowException as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0 if result.promoted else 1


def promote_command(
        params: Path = typer_option(Path("params.yaml"), "--params", "-p", help="params file"),
        version: Optional[int] = typer_option(None, "--version", "-v",
                                              help="registered version (default: the newest)"),
        withdraw: Optional[int] = typer_option(None, "--withdraw", metavar="VERSION",
                                               help="take a version out of the running for champion (rollback)")):
    """Alias a registered version `challenger`; move `champion` to it if it passes ONNX parity and beats the
    champion."""
    import typer

    raise typer.Exit(promote_cli(params, version, withdraw))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Promote a registered model version to champion if it qualifies.")
    parser.add_argument("--params", "-p", default="params.yaml")
    parser.add_argument("--version", "-v", type=int, default=None, help="version (default: the newest)")
    parser.add_argument("--withdraw", type=int, default=None, metavar="VERSION",
                        help="take a version out of the running for champion (a rollback)")
    args = parser.parse_args()
    raise SystemExit(promote_cli(args.params, args.version, args.withdraw))
