"""A real exported student: the export stage on the tiny project (accuracy batch by batch, class names from the
data), promoted to champion in a SQLite registry, and served by `mlflow models serve` on loopback."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path

import numpy as np
import pytest
from pipeline_support import clone_project, retrain_smallest_student
from torch.utils.data import Dataset

NAME = "dna-student"
DIGITS = [str(i) for i in range(10)]


class CountedImages(Dataset):
    """A split whose images are counted while alive: `peak` is the most held at one time."""

    def __init__(self, base: Dataset):
        self.base, self.alive, self.peak = base, 0, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        image, label = self.base[i]
        image = image.clone()
        self.alive += 1
        self.peak = max(self.peak, self.alive)
        weakref.finalize(image, self._release)
        return image, label

    def _release(self):
        self.alive -= 1


@pytest.fixture(scope="module")
def exported(tiny_project, tmp_path_factory):
    """The export stage run on a retrained student of the tiny space, its test split counted while it ran."""
    from dna.config import load_params
    from dna.pipeline import Run, stage_export

    root = clone_project(tiny_project, tmp_path_factory.mktemp("serve"))
    run = Run(load_params(root / "params.yaml", {"outputs": str(root / "outputs")}))
    retrain_smallest_student(run)
    counted = run.data.test = CountedImages(run.data.test)
    metrics = stage_export(run)
    return run, metrics, counted


@pytest.mark.slow
def test_export_stage_evaluates_the_test_split_batch_by_batch(exported):
    from dna.export import onnx_predict, read_metadata

    run, metrics, counted = exported
    test = counted.base
    assert 0 < counted.peak < len(test), "the whole test split was held in memory at once"
    from dna.pipeline import EVAL_BATCH_SIZE

    assert counted.peak <= EVAL_BATCH_SIZE < len(test)
    images = np.stack([test[i][0].numpy() for i in range(len(test))])
    labels = np.array([int(test[i][1]) for i in range(len(test))])
    expected = int((onnx_predict(run.paths.onnx, images).argmax(axis=1) == labels).sum()) / len(test)
    assert metrics["onnx_test_accuracy"] == pytest.approx(expected, abs=1e-12)
    assert json.loads(run.paths.splits.read_text())["class_names"] == DIGITS
    assert json.loads(read_metadata(run.paths.onnx)["class_names"]) == DIGITS
    from dna.checkpoint import checkpoint_digest  # what registration checks the export against

    assert read_metadata(run.paths.onnx)["checkpoint_digest"] == metrics["checkpoint_digest"] \
        == checkpoint_digest(run.paths.model)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def stop(server: subprocess.Popen) -> None:
    """SIGINT to the server's process group (uvicorn and its workers), SIGKILL if it is still there after 15 s."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)


def serve(uri: str, model_uri: str, log: Path, ready_within: float = 180) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri,
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + ready_within
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow models serve exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if http(f"{base}/ping", timeout=2)[0] == 200:
                return server, base
        except OSError:
            pass
        time.sleep(0.5)
    stop(server)
    raise AssertionError(f"mlflow models serve not ready within {ready_within} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_real_student_promoted_to_champion_is_served_with_probabilities_and_classes(exported, tmp_path):
    """The exported student is logged and registered, promoted through flows.registry.promote (no champion yet,
    parity passed), and `mlflow models serve -m models:/dna-student@champion` answers per image its logits,
    class probabilities and predicted class; the logged model has the class names and an input example."""
    import mlflow
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    from dna.export import onnx_predict
    from flows.registry import CHAMPION, comparability_tags, log_onnx_model, promote, register_version
    from flows.tracking import ensure_experiment

    run, metrics, _ = exported
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = ensure_experiment(uri, "dna", tmp_path)
    client = MlflowClient(uri)
    sample = np.stack([run.data.test[i][0].numpy() for i in range(8)])
    with mlflow.start_run(experiment_id=experiment):
        info = log_onnx_model(run.paths.onnx, sample)
    retrained = json.loads((run.paths.retrain_dir / "metrics.json").read_text())
    version = register_version(client, NAME, info.model_uri, {
        "test_accuracy": retrained["test_accuracy"], "max_abs_diff": metrics["max_abs_diff"], "atol": metrics["atol"],
        **comparability_tags(run.paths.onnx, "digits")})
    result = promote(client, NAME, version, "test_accuracy")
    assert result.promoted and "no champion yet" in result.reason
    assert int(client.get_model_version_by_alias(NAME, CHAMPION).version) == version

    images = sample[:5]
    server, base = serve(uri, f"models:/{NAME}@{CHAMPION}", tmp_path / "serve.log")
    try:
        status, body = http(f"{base}/invocations", {"inputs": images.tolist()})
    finally:
        stop(server)
    assert status == 200, body
    answer = json.loads(body)["predictions"]
    assert sorted(answer) == ["class_index", "logits", "probabilities"], body[:300]
    logits = onnx_predict(run.paths.onnx, images)
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    np.testing.assert_array_equal(np.array(answer["class_index"]), logits.argmax(axis=1))
    np.testing.assert_allclose(np.array(answer["probabilities"]).sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.array(answer["probabilities"]), probabilities, atol=1e-6)
    np.testing.assert_allclose(np.array(answer["logits"]), logits, atol=1e-5)

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@{CHAMPION}", dst_path=str(tmp_path / "dl")))
    logged = Model.load(local)
    assert logged.metadata["class_names"] == DIGITS
    assert logged.saved_input_example_info is not None
    np.testing.assert_array_equal(logged.load_input_example(local), sample[:2])
    assert [o["name"] for o in logged.signature.outputs.to_dict()] == ["logits", "probabilities", "class_index"]
