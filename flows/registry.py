"""The MLflow model registry: logging the ONNX export, registering it as a version, and promotion by alias.

Promotion compares like with like. A version qualifies when it passes ONNX parity at the registry's one tolerance
(its max_abs_diff tag at most PARITY_ATOL, whatever tolerance its export ran with), has the configured metric, and
carries a comparability key (COMPARABLE_TAGS: the data's digest, the input shape, the class names' digest) equal to
the current champion's. A qualifying version gets the alias `challenger`, and `champion` moves to it if it beats
the champion on the metric (or there is no champion yet); otherwise the result says why, no alias moves for a
version that does not qualify, and champion stays where it is. Consumers load `models:/<name>@champion`.
"""
from __future__ import annotations

import flows.app  # noqa: F401 - first: the environment before Prefect and MLflow read it, and the schema

# isort: split

import hashlib
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

CHAMPION = "champion"
CHALLENGER = "challenger"
PROMOTION_TAG = "promotion"
CANDIDATE_TAG = "dna.candidate"
ONNX_DIGEST_TAG = "onnx_digest"  # the registered ONNX file's digest: registering it again finds this version
PARITY_ATOL = 1e-4  # the largest ONNX Runtime vs PyTorch difference a champion may have (export.atol allows more)
# Versions are compared only when these tags are equal: the same data (config and split), input shape and classes.
COMPARABLE_TAGS = ("data_hash", "input_shape", "class_names_digest")


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


def comparability_tags(onnx_path: str | Path, data_hash: str) -> dict[str, str]:
    """The tags that say what a version can be compared with: the data's digest, and the exported graph's input
    shape and class names (a digest of the JSON list its metadata holds; absent if it holds none)."""
    from dna.export import class_names, input_shape

    names = class_names(onnx_path)
    tags = {"data_hash": data_hash, "input_shape": input_shape(onnx_path)}
    if names is not None:
        tags["class_names_digest"] = hashlib.sha256(json.dumps(names).encode()).hexdigest()[:16]
    return tags


def comparability_key(tags: dict) -> tuple[str, ...] | None:
    """The values of COMPARABLE_TAGS, or None if any is missing (such a version is compared with nothing)."""
    key = tuple(tags.get(tag) for tag in COMPARABLE_TAGS)
    return None if None in key else key


def _differences(tags: dict, champion) -> str:
    theirs = champion.tags or {}
    return ", ".join(f"{tag} {tags.get(tag)} (champion: {theirs.get(tag)})" for tag in COMPARABLE_TAGS
                     if tags.get(tag) != theirs.get(tag))


def _passes_parity(tags: dict) -> bool:
    diff = _float(tags.get("max_abs_diff"))
    return diff is not None and diff <= PARITY_ATOL


def promote(client, name: str, version: int | str, metric: str, reinstate: bool = True) -> PromotionResult:
    """Give `version` the alias challenger and move champion to it if it qualifies and beats the champion (see
    the module's doc); a version withdrawn earlier is put back in the running unless `reinstate` is False.

    A qualifying version becomes a candidate (tag dna.candidate); champion then goes to the best candidate of its
    comparability key (the oldest among equals), re-checked after every move, so promotions that race end with
    champion on the best of them whatever their order. The decision is recorded on the version as the tag
    `promotion`.
    """
    version = int(version)
    candidate = client.get_model_version(name, str(version))  # raises if there is no such version
    tags = candidate.tags or {}
    value, diff, key = _float(tags.get(metric)), _float(tags.get("max_abs_diff")), comparability_key(tags)
    current = _by_alias(client, name, CHAMPION)
    current_version = int(current.version) if current is not None else None
    current_value = _float((current.tags or {}).get(metric)) if current is not None else None

    def result(promoted: bool, reason: str) -> PromotionResult:
        client.set_model_version_tag(name, str(version), PROMOTION_TAG,
                                     ("champion: " if promoted else "refused: ") + reason)
        return PromotionResult(name, version, promoted, reason, metric, value, current_version, current_value)

    if current_version == version:
        return result(True, "already the champion")
    if not reinstate and tags.get(CANDIDATE_TAG) == "withdrawn":
        return result(False, f"withdrawn from the running (`dna promote --version {version}` puts it back)")
    if diff is None:
        return result(False, "no ONNX parity record (the tag max_abs_diff is required)")
    if not _passes_parity(tags):
        return result(False, f"fails ONNX parity: max_abs_diff {diff:.3g} > {PARITY_ATOL:.3g}, the registry's "
                             f"tolerance")
    if key is None:
        return result(False, f"no comparability record (the tags {', '.join(COMPARABLE_TAGS)} are required)")
    if value is None:
        return result(False, f"no {metric} tag to compare")
    if current is not None and comparability_key(current.tags or {}) is None:
        return result(False, f"champion version {current_version} has no comparability record to compare with; "
                             f"`dna promote --withdraw {current_version}` lets a new champion start")
    if current is not None and comparability_key(current.tags or {}) != key:
        return result(False, f"not comparable with champion version {current_version}, trained on other data: "
                             f"{_differences(tags, current)}")
    client.set_registered_model_alias(name, CHALLENGER, str(version))
    client.set_model_version_tag(name, str(version), CANDIDATE_TAG, "true")
    champion, champion_value = settle_champion(client, name, metric, key)
    if champion != version:
        settled = client.get_model_version(name, str(champion))
        if comparability_key(settled.tags or {}) != key:  # another promotion, of other data, settled first
            return result(False, f"not comparable with champion version {champion}, trained on other data: "
                                 f"{_differences(tags, settled)}")
        return result(False, f"{metric} {value:.4f} does not beat champion version {champion} ({champion_value:.4f})")
    parity = f"parity max_abs_diff {diff:.3g} <= {PARITY_ATOL:.3g}"
    if current is None:
        return result(True, f"no champion yet; {metric} {value:.4f}, {parity}")
    against = f"{current_value:.4f}" if current_value is not None else "no recorded value"
    return result(True, f"{metric} {value:.4f} beats champion version {current_version} ({against}); {parity}")


def _qualifies(tags: dict, metric: str, key: tuple[str, ...]) -> bool:
    return _passes_parity(tags) and comparability_key(tags) == key and _float(tags.get(metric)) is not None


def candidate_values(client, name: str, metric: str, key: tuple[str, ...]) -> dict[int, float]:
    """Versions tagged dna.candidate=true that qualify with comparability key `key`, with their `metric`."""
    versions = client.search_model_versions(f"name = '{name}'")
    return {int(v.version): _float(v.tags[metric]) for v in versions
            if (v.tags or {}).get(CANDIDATE_TAG) == "true" and _qualifies(v.tags, metric, key)}


def settle_champion(client, name: str, metric: str, key: tuple[str, ...],
                    max_moves: int = 100) -> tuple[int, float | None]:
    """Point champion at the best candidate version of comparability key `key` and check again until nothing moved
    it in between; returns the champion and its metric.

    Candidates: candidate_values() and the current champion. Whoever moves the alias last re-reads every candidate
    afterwards, so the last check of all sees the final alias on the best candidate. A candidate tagged
    dna.candidate=withdrawn takes no part. A champion of another key stays (the caller refuses to compare with it).
    """
    for _ in range(max_moves):
        values = candidate_values(client, name, metric, key)
        current = _by_alias(client, name, CHAMPION)
        current_tags = (current.tags or {}) if current is not None else {}
        if current is not None and comparability_key(current_tags) != key:
            return int(current.version), _float(current_tags.get(metric))
        if current is not None and current_tags.get(CANDIDATE_TAG) != "withdrawn" \
                and _qualifies(current_tags, metric, key):
            values.setdefault(int(current.version), _float(current_tags.get(metric)))
        if not values:
            raise RuntimeError(f"{name}: no version is a candidate for champion (none passed parity with a {metric})")
        best = max(values, key=lambda v: (values[v], -v))
        if current is not None and int(current.version) == best:
            return best, values[best]
        client.set_registered_model_alias(name, CHAMPION, str(best))
    raise RuntimeError(f"{name}: the champion alias kept moving under {max_moves} promotions; try again")


def withdraw(client, name: str, version: int | str, metric: str) -> int | None:
    """Take a version out of the running for champion (a rollback); returns the champion afterwards.

    A withdrawn champion hands over to the best remaining candidate comparable with it: the alias moves straight
    to that one, so an interruption leaves champion where it was (run withdraw again). With no such candidate the
    alias is removed and None returned."""
    client.set_model_version_tag(name, str(version), CANDIDATE_TAG, "withdrawn")
    current = _by_alias(client, name, CHAMPION)
    compared_with = current if current is not None else client.get_model_version(name, str(version))
    key = comparability_key(compared_with.tags or {})
    if key is not None and candidate_values(client, name, metric, key):
        return settle_champion(client, name, metric, key)[0]
    if current is not None and int(current.version) == int(version):
        client.delete_registered_model_alias(name, CHAMPION)
        return None
    return int(current.version) if current is not None else None


def latest_version(client, name: str) -> int | None:
    versions = client.search_model_versions(f"name = '{name}'")
    return max((int(v.version) for v in versions), default=None)


def registered_version(client, name: str, onnx_digest: str) -> int | None:
    """The version of `name` registered for the ONNX file with this digest (tag onnx_digest), if there is one."""
    versions = client.search_model_versions(f"name = '{name}'")
    return min((int(v.version) for v in versions if (v.tags or {}).get(ONNX_DIGEST_TAG) == onnx_digest),
               default=None)


# logging and registering --------------------------------------------------------------------------------------------
def onnx_requirements() -> list[str]:
    import onnx
    import onnxruntime

    return [f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"]


def logged_model(paths) -> Path:
    """The record of the ONNX model the export step logged to MLflow (its URI, run and digest), beside the export of
    a run's dna.paths.Paths: registration registers that model when it is of the same file."""
    return paths.export_dir / "logged_model.json"


def log_onnx_model(onnx_path: str | Path, sample, name: str = "model", example_images: int = 2):
    """Log an ONNX file to the active MLflow run as a model; returns its ModelInfo (model_uri: models:/<id>).

    `sample` is a small batch of real inputs (numpy); the signature is inferred from it and every output of the model
    (logits, probabilities, class_index for an export of dna.export), and its first `example_images` are the input
    example. The model's metadata carries the export's arch, accuracy, cost and class names (a list, by class_index).
    """
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
def model_name(registered_model: str, target: str) -> str:
    """The registered model of a search target: `<mlflow.registered_model>-<target>`, each with its own versions and
    champion; mlflow.registered_model itself for the target `default` (search.budgets' one target)."""
    from dna.paths import DEFAULT_TARGET

    return registered_model if target == DEFAULT_TARGET else f"{registered_model}-{target}"


def promote_cli(params_file: str | Path = "params.yaml", version: int | None = None,
                withdrawn: int | None = None, target: str | None = None) -> int:
    """`dna promote`: promote a version (default: the newest) of a search target's registered model (`model_name`;
    None: the first target's) by the rules above; with `withdrawn`, take that version out of the running instead
    (champion goes to the best remaining one).

    Prints one line; exit code 0 if it is the champion afterwards, 1 if it was refused, 2 on an error
    (bad config, no such model or version).
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from dna.config import load_params
    from dna.errors import ConfigError
    from flows.tracking import tracking_uri

    try:
        params = load_params(params_file, check_paths=False)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    targets = list(params.search.named_targets())
    if target is not None and target not in targets:
        print(f"error: --target {target}: the search targets are {', '.join(targets)}", file=sys.stderr)
        return 2
    name = model_name(params.mlflow.registered_model, target or targets[0])
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


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Promote a registered model version to champion if it qualifies.")
    parser.add_argument("--params", "-p", default="params.yaml")
    parser.add_argument("--version", "-v", type=int, default=None, help="version (default: the newest)")
    parser.add_argument("--withdraw", type=int, default=None, metavar="VERSION",
                        help="take a version out of the running for champion (a rollback)")
    args = parser.parse_args()
    raise SystemExit(promote_cli(args.params, args.version, args.withdraw))
