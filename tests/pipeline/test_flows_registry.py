"""The model registry: promotion rules, the promote CLI, loading the champion and racing promotions, each on a
SQLite MLflow store and on a team's tracking server (a real `mlflow server` whose backend store is a PostgreSQL
database of its own, with artifacts proxied to a folder; skipped, saying why, where PostgreSQL is not reachable).

The rules are exercised on small hand-built linear ONNX models; a real exported student is promoted to champion and
served in test_serve.py."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from pipeline_support import run_python, tiny_raw, write_params
from server_support import BIN, background, free_port, postgres_database, postgres_url, query, wait_answering

from flows.registry import CHALLENGER, CHAMPION, PROMOTION_TAG, log_onnx_model, promote, promote_cli, register_version

NAME = "dna-student"
# what registration tags a version with to say what it can be compared with (flows.registry.comparability_tags)
DATA = {"data_hash": "digits-0", "input_shape": "1x4x4", "class_names_digest": "digits"}


def linear_onnx(path, weights: np.ndarray, bias: np.ndarray):
    """A real ONNX classifier with the exported model's interface: images (N,1,4,4) -> logits (N,10)."""
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["images"], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "W", "b"], ["logits"], transB=1)],
        "linear",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(weights.astype(np.float32), "W"),
         numpy_helper.from_array(bias.astype(np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free loopback port, its backend store a new PostgreSQL database, artifacts served from
    a folder (--artifacts-destination). Yields the tracking URI, the database name and the artifact folder."""
    import os

    with postgres_database("mlflow") as database:
        root = tmp_path_factory.mktemp("mlflow-server")
        port, log = free_port(), root / "server.log"
        env = dict(os.environ) | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner: 2 cores here
        with background([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                         "--backend-store-uri", postgres_url(database, "psycopg2"),
                         "--artifacts-destination", str(root / "artifacts")], root, env, log) as server:
            wait_answering(f"http://127.0.0.1:{port}/health", server, log)
            yield f"http://127.0.0.1:{port}", database, root / "artifacts"


@pytest.fixture(params=["sqlite", "postgresql-server"])
def registry(request, tmp_path):
    """A fresh tracking store and registry (a SQLite file, or the PostgreSQL-backed server with this test's model
    removed), and a function that registers a version with given tags."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from flows.tracking import ensure_experiment

    if request.param == "sqlite":
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    else:
        uri = request.getfixturevalue("mlflow_server")[0]
        if MlflowClient(uri).search_registered_models(f"name = '{NAME}'"):
            MlflowClient(uri).delete_registered_model(NAME)
    mlflow.set_tracking_uri(uri)
    experiment = ensure_experiment(uri, "dna", tmp_path)
    client = MlflowClient(uri)
    sample = np.random.default_rng(0).normal(size=(4, 1, 4, 4)).astype(np.float32)

    def add(accuracy: float, max_abs_diff: float = 1e-7, atol: float = 1e-4, seed: int = 0, **data: str) -> int:
        """`data`: the comparability tags that differ from DATA (data_hash, input_shape, class_names_digest)."""
        rng = np.random.default_rng(seed)
        path = linear_onnx(tmp_path / f"model_{seed}.onnx", rng.normal(size=(10, 16)), rng.normal(size=10))
        with mlflow.start_run(experiment_id=experiment):
            info = log_onnx_model(path, sample)
        return register_version(client, NAME, info.model_uri, {"test_accuracy": accuracy, "max_abs_diff": max_abs_diff,
                                                               "atol": atol, "arch": f"linear-{seed}", **DATA, **data})

    return client, add, uri, tmp_path


def champion(client) -> int:
    return int(client.get_model_version_by_alias(NAME, CHAMPION).version)


def test_comparability_tags_are_read_from_the_exported_graph(tmp_path):
    from flows.registry import comparability_tags

    path = linear_onnx(tmp_path / "m.onnx", np.eye(10, 16), np.zeros(10))
    assert comparability_tags(path, "d1") == {"data_hash": "d1", "input_shape": "1x4x4"}  # no class names: no key
    tagged = []
    for names in (list("0123456789"), list("abcdefghij")):
        model = onnx.load(str(path))
        helper.set_model_props(model, {"class_names": json.dumps(names)})
        onnx.save(model, str(path))
        tagged.append(comparability_tags(path, "d1"))
    assert tagged[0]["class_names_digest"] != tagged[1]["class_names_digest"]
    assert all(tags.keys() == {"data_hash", "input_shape", "class_names_digest"} for tags in tagged)


def test_promotes_better_versions_and_refuses_worse_ties_and_parity_failures(registry):
    client, add, _, _ = registry
    first = promote(client, NAME, add(0.80, seed=1), "test_accuracy")
    assert first.promoted and first.previous_champion is None and "no champion yet" in first.reason
    assert champion(client) == 1

    better = promote(client, NAME, add(0.90, seed=2), "test_accuracy")
    assert better.promoted and better.previous_champion == 1 and champion(client) == 2

    worse = promote(client, NAME, add(0.85, seed=3), "test_accuracy")
    assert not worse.promoted and "does not beat champion version 2" in worse.reason
    assert champion(client) == 2
    assert int(client.get_model_version_by_alias(NAME, CHALLENGER).version) == 3
    assert client.get_model_version(NAME, "3").tags[PROMOTION_TAG].startswith("refused: ")

    tie = promote(client, NAME, add(0.90, seed=4), "test_accuracy")
    assert not tie.promoted and champion(client) == 2

    unfaithful = promote(client, NAME, add(0.99, max_abs_diff=1e-2, seed=5), "test_accuracy")
    assert not unfaithful.promoted and "fails ONNX parity" in unfaithful.reason and champion(client) == 2
    assert int(client.get_model_version_by_alias(NAME, CHALLENGER).version) == 4  # no alias for a failed version

    again = promote(client, NAME, 2, "test_accuracy")
    assert again.promoted and again.reason == "already the champion" and champion(client) == 2


def test_only_versions_trained_on_the_champions_data_are_compared_with_it(registry):
    """A 1.00 model of other data (data digest, input shape or class names) does not replace a 0.91 champion: it
    is refused, saying why, and gets no alias; a version without the comparability record is refused too."""
    client, add, _, _ = registry
    assert promote(client, NAME, add(0.91, seed=1), "test_accuracy").promoted
    for seed, other in enumerate(({"data_hash": "digits-1"}, {"input_shape": "3x4x4"},
                                  {"class_names_digest": "letters"}), start=2):
        result = promote(client, NAME, add(1.00, seed=seed, **other), "test_accuracy")
        (tag, value), = other.items()
        assert not result.promoted and result.champion == 1 and champion(client) == 1
        assert "not comparable with champion version 1" in result.reason and f"{tag} {value}" in result.reason
        assert int(client.get_model_version_by_alias(NAME, CHALLENGER).version) == 1
        assert client.get_model_version(NAME, str(seed)).tags[PROMOTION_TAG] == f"refused: {result.reason}"
    unrecorded = add(1.00, seed=5)
    client.delete_model_version_tag(NAME, str(unrecorded), "data_hash")
    result = promote(client, NAME, unrecorded, "test_accuracy")
    assert not result.promoted and "no comparability record" in result.reason and champion(client) == 1

    # a version of other data tagged a candidate (by a registry without this rule) is still not compared
    client.set_model_version_tag(NAME, "2", "dna.candidate", "true")
    better = promote(client, NAME, add(0.95, seed=6), "test_accuracy")
    assert better.promoted and champion(client) == 6 == better.champion


def test_a_champion_registered_without_a_comparability_record_must_be_withdrawn_first(registry):
    """A registry from before comparability tags: its champion is compared with nothing, until it is withdrawn."""
    from flows.registry import withdraw

    client, add, _, _ = registry
    assert promote(client, NAME, add(0.80, seed=1), "test_accuracy").promoted
    client.delete_model_version_tag(NAME, "1", "class_names_digest")
    refused = promote(client, NAME, add(0.90, seed=2), "test_accuracy")
    assert not refused.promoted and "champion version 1 has no comparability record" in refused.reason
    assert champion(client) == 1
    assert withdraw(client, NAME, 1, "test_accuracy") is None
    assert promote(client, NAME, 2, "test_accuracy").promoted and champion(client) == 2


def test_parity_is_judged_at_the_registrys_tolerance_not_the_versions_own(registry):
    """max_abs_diff 5e-3 passes an export run with atol 1e-2 (params allow it) but not the registry: refused, no
    alias; and a version tagged a candidate under the old rule does not take champion later."""
    client, add, _, _ = registry
    assert promote(client, NAME, add(0.80, seed=1), "test_accuracy").promoted
    loose = promote(client, NAME, add(0.99, max_abs_diff=5e-3, atol=1e-2, seed=2), "test_accuracy")
    assert not loose.promoted and "fails ONNX parity: max_abs_diff 0.005 > 0.0001" in loose.reason
    assert champion(client) == 1 and int(client.get_model_version_by_alias(NAME, CHALLENGER).version) == 1
    client.set_model_version_tag(NAME, "2", "dna.candidate", "true")
    assert promote(client, NAME, add(0.85, seed=3), "test_accuracy").promoted and champion(client) == 3


class InterruptedAliasMoves:
    """An MlflowClient that is interrupted when it moves an alias: what a crash at that moment leaves behind."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, attr):
        return getattr(self._client, attr)

    def set_registered_model_alias(self, name, alias, version):
        raise KeyboardInterrupt(f"interrupted before {alias} moved to version {version}")


@pytest.mark.reliability
def test_an_interrupted_withdraw_leaves_a_champion_and_finishes_when_run_again(registry):
    from flows.registry import withdraw

    client, add, _, _ = registry
    for accuracy, seed in ((0.70, 1), (0.90, 2), (0.80, 3)):
        promote(client, NAME, add(accuracy, seed=seed), "test_accuracy")
    with pytest.raises(KeyboardInterrupt):
        withdraw(InterruptedAliasMoves(client), NAME, 2, "test_accuracy")
    assert champion(client) == 2  # still a champion: the alias never went missing
    assert withdraw(client, NAME, 2, "test_accuracy") == 3 and champion(client) == 3


def test_promote_cli_exit_codes(registry, capsys):
    client, add, uri, tmp_path = registry
    params = write_params(tmp_path / "params.yaml", tiny_raw(tracking_uri=uri))
    assert promote_cli(params, None) == 2  # no versions yet
    assert "has no versions" in capsys.readouterr().err
    add(0.5, seed=1)
    add(0.4, seed=2)
    assert promote_cli(params, 1) == 0 and champion(client) == 1
    assert promote_cli(params, None) == 1  # newest is version 2, which is worse
    assert "version 2: not promoted" in capsys.readouterr().out and champion(client) == 1
    assert promote_cli(params, 7) == 2
    assert promote_cli(params, withdrawn=1) == 0 and champion(client) == 2  # rolled back to the remaining one
    assert "version 1 withdrawn; champion now: version 2" in capsys.readouterr().out


def test_champion_loads_and_runs_in_onnx_runtime_in_a_fresh_process(registry):
    client, add, uri, tmp_path = registry
    promote(client, NAME, add(0.7, seed=1), "test_accuracy")
    promote(client, NAME, add(0.9, seed=2), "test_accuracy")  # champion: the seed-2 weights
    rng = np.random.default_rng(2)
    weights, bias = rng.normal(size=(10, 16)), rng.normal(size=10)
    images = np.linspace(-1, 1, 3 * 16, dtype=np.float32).reshape(3, 1, 4, 4)
    code = f"""
import json, numpy as np, mlflow, onnxruntime as ort
mlflow.set_tracking_uri({uri!r})
proto = mlflow.onnx.load_model("models:/{NAME}@champion")
session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
images = np.linspace(-1, 1, 3 * 16, dtype=np.float32).reshape(3, 1, 4, 4)
logits = session.run(["logits"], {{"images": images}})[0]
pyfunc = mlflow.pyfunc.load_model("models:/{NAME}@champion").predict(images)
pyfunc = pyfunc["logits"] if isinstance(pyfunc, dict) else np.asarray(pyfunc)
print(json.dumps({{"logits": logits.tolist(), "pyfunc": np.asarray(pyfunc).tolist()}}))
"""
    done = run_python(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    expected = images.reshape(3, 16) @ weights.T.astype(np.float32) + bias.astype(np.float32)
    np.testing.assert_allclose(np.array(out["logits"]), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.array(out["pyfunc"]), expected, rtol=1e-4, atol=1e-4)


class SlowAliasReads:
    """An MlflowClient whose reads of the champion alias take `delay` seconds: what a slow network or a busy
    server does to two promotions that run at once, made certain."""

    def __init__(self, client, delay: float):
        self._client, self._delay = client, delay

    def __getattr__(self, attr):
        return getattr(self._client, attr)

    def get_model_version_by_alias(self, name, alias):
        import time

        found = self._client.get_model_version_by_alias(name, alias)
        time.sleep(self._delay)
        return found


@pytest.mark.reliability
@pytest.mark.parametrize("slow_one", ["better", "worse"])
def test_racing_promotions_leave_champion_on_the_better_version(registry, slow_one):
    """Champion v1 (0.70); v2 (0.90) and v3 (0.80) are promoted at the same time from two threads, one of them
    reading the champion slowly: whichever finishes last, champion ends on v2. (v3 may be champion for a moment,
    when it settles before v2 is a candidate; its decision then says it beat v1, which it did.)"""
    import threading

    client, add, _, _ = registry
    promote(client, NAME, add(0.70, seed=1), "test_accuracy")
    better, worse = add(0.90, seed=2), add(0.80, seed=3)
    delays = {better: 0.6 if slow_one == "better" else 0.0, worse: 0.6 if slow_one == "worse" else 0.0}
    results, start = {}, threading.Barrier(2)

    def run(version):
        start.wait()
        results[version] = promote(SlowAliasReads(client, delays[version]), NAME, version, "test_accuracy")

    threads = [threading.Thread(target=run, args=(v,)) for v in (better, worse)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert champion(client) == better and results[better].promoted
    if not results[worse].promoted:
        assert f"does not beat champion version {better}" in results[worse].reason


@pytest.mark.reliability
def test_promoting_twice_is_harmless_and_a_withdrawn_champion_hands_over_to_the_next_best(registry):
    from flows.registry import withdraw

    client, add, _, _ = registry
    for accuracy, seed in ((0.70, 1), (0.90, 2), (0.80, 3)):
        promote(client, NAME, add(accuracy, seed=seed), "test_accuracy")
    assert champion(client) == 2
    again = promote(client, NAME, 3, "test_accuracy")
    assert not again.promoted and champion(client) == 2
    assert withdraw(client, NAME, 2, "test_accuracy") == 3 and champion(client) == 3  # roll back the 0.90 model
    assert not promote(client, NAME, add(0.75, seed=4), "test_accuracy").promoted  # 0.90 no longer counts
    assert champion(client) == 3


def test_the_team_server_keeps_the_registry_in_postgresql_and_the_models_in_its_artifact_folder(mlflow_server):
    """What the server-parametrised tests above rely on: versions and aliases are rows of the server's PostgreSQL
    database, and a logged model's files land under --artifacts-destination."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from flows.tracking import ensure_experiment

    uri, database, artifacts = mlflow_server
    client = MlflowClient(uri)
    name = "dna-student-storage-check"
    mlflow.set_tracking_uri(uri)
    experiment = ensure_experiment(uri, "dna-storage-check")
    sample = np.zeros((2, 1, 4, 4), np.float32)
    with mlflow.start_run(experiment_id=experiment):
        info = log_onnx_model(linear_onnx(artifacts.parent / "m.onnx", np.eye(10, 16), np.zeros(10)), sample)
    version = register_version(client, name, info.model_uri, {"test_accuracy": 0.5, "max_abs_diff": 0.0,
                                                              "atol": 1e-4, "arch": "linear", **DATA})
    assert promote(client, name, version, "test_accuracy").promoted
    assert query(database, f"SELECT version FROM model_versions WHERE name = '{name}'") == [(version,)]
    assert sorted(query(database, f"SELECT alias, version FROM registered_model_aliases WHERE name = '{name}'")) == [
        (CHALLENGER, version), (CHAMPION, version)]
    assert [p.name for p in artifacts.rglob("model.onnx")], f"no model.onnx under {artifacts}"
