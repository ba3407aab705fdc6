"""The DVC pipeline end to end on the tiny configuration, driven by the pipeline flow in this process: every step,
then again (nothing runs), then an experiment on a retraining parameter that reruns only retrain and what follows;
`dvc repro` after the flow finds everything up to date, and the flow after `dvc repro` runs nothing. A DVC remote (a
local folder) takes a run's data and checkpoints with `dvc push` and gives them back with `dvc pull`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from pipeline_support import git_dvc_project, run_python

from dna.arch import Arch
from flows.steps import STAGES

pytestmark = pytest.mark.slow  # about three minutes: eight stage processes, then three


def dvc(repo, *args) -> str:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git + DVC repository with the project's dvc.yaml, flows, core code and the tiny params.yaml."""
    return git_dvc_project(tmp_path_factory.mktemp("dvc-repo"))


@pytest.fixture(scope="module")
def runs(prefect_api, repo):
    """Three pipeline flow runs: reproduce, reproduce again, then an experiment with retrain.train.lr changed."""
    from flows.pipeline import pipeline_flow

    outputs = repo / "outputs"
    first = pipeline_flow(str(repo))
    kept = {p: os.stat(outputs / p).st_mtime_ns
            for p in ("data/splits.json", "teacher/teacher.pt", "distill/block_0.pt", "search/arch.yaml",
                      "retrain/model.pt", "export/model.onnx")}
    second = pipeline_flow(str(repo))
    third = pipeline_flow(str(repo), overrides={"retrain.train.lr": 0.004})
    after = {p: os.stat(outputs / p).st_mtime_ns for p in kept}
    return first, second, third, kept, after


def test_first_repro_runs_every_stage_in_order(runs, repo):
    first = runs[0]
    assert first["ran"] == STAGES and first["skipped"] == []
    assert (repo / "dvc.lock").is_file()
    assert first["metrics"]["register"]["version"] == 1 and first["metrics"]["register"]["champion"] == 1
    assert first["metrics"]["export"]["max_abs_diff"] <= 1e-4


def test_second_repro_runs_nothing(runs, repo):
    second = runs[1]
    assert second["ran"] == [] and second["skipped"] == STAGES
    assert "up to date" in dvc(repo, "status")
    assert "Data and pipelines are up to date" in dvc(repo, "repro")  # the flow recorded every step as DVC would


def test_a_retraining_parameter_reruns_only_retrain_and_what_follows(runs, repo):
    _, _, third, kept, after = runs
    assert third["ran"] == ["retrain", "figures", "export", "register"]
    assert third["skipped"] == ["data", "teacher", "distill", "profile", "search"]
    for path in ("data/splits.json", "teacher/teacher.pt", "distill/block_0.pt", "search/arch.yaml"):
        assert after[path] == kept[path], f"{path} was rewritten"
    for path in ("retrain/model.pt", "export/model.onnx"):
        assert after[path] != kept[path], f"{path} was not rebuilt"
    assert third["metrics"]["register"]["version"] == 2
    shown = json.loads(dvc(repo, "exp", "show", "--json"))
    saved = next(exp["revs"][0]["data"] for base in shown for exp in base["experiments"] or []
                 if exp["revs"][0]["name"] == third["experiment"])  # a DVC experiment: its params and metrics
    assert saved["params"]["params.yaml"]["data"]["retrain"]["train"]["lr"] == 0.004
    assert saved["metrics"]["outputs/export/metrics.json"]["data"] == third["metrics"]["export"]


def test_one_mlflow_run_per_pipeline_run_with_a_nested_run_per_stage_that_ran(runs, repo):
    from mlflow.tracking import MlflowClient

    from flows.tracking import nested_runs

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    for run in runs[:3]:
        parent = client.get_run(run["mlflow_run_id"])
        assert parent.info.run_name == "pipeline" and parent.info.status == "FINISHED"
        assert [r.info.run_name for r in nested_runs(client.tracking_uri, run["mlflow_run_id"])] == run["ran"]
    distill = next(r for r in nested_runs(client.tracking_uri, runs[0]["mlflow_run_id"])
                   if r.info.run_name == "distill")
    # blocks start at the same time on the task runner: their runs may start in either order
    assert sorted(r.info.run_name for r in nested_runs(client.tracking_uri, distill.info.run_id)) == ["block_0",
                                                                                                      "block_1"]
    version = client.get_model_version("dna-student", "2")
    for tag in ("arch", "data_hash", "params_hash", "test_accuracy", "max_abs_diff", "atol", "git_commit"):
        assert version.tags.get(tag), tag
    assert json.loads(version.tags["arch"])["stem"] == 16


def test_the_champion_from_the_pipeline_runs_in_onnx_runtime_in_a_fresh_process(runs, repo):
    registration = json.loads((repo / "outputs" / "register" / "registration.json").read_text())
    champion = registration["champion"]
    code = """
import json, numpy as np, onnxruntime as ort
from dna.config import load_params
from dna.export import onnx_predict
from dna.pipeline import Run
from flows.registry import load_champion
from flows.tracking import tracking_uri
params = load_params("params.yaml")
run = Run(params)
images = run.data.images("test", 16).numpy()
session = load_champion(tracking_uri(params), params.mlflow.registered_model)
logits = session.run(["logits"], {"images": images})[0]
exported = onnx_predict(run.paths.onnx, images)
print(json.dumps({"shape": list(logits.shape), "max_diff": float(np.abs(logits - exported).max())}))
"""
    done = run_python(code, repo)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["shape"] == [16, 10]
    if champion == registration["latest_version"]:  # the champion is the model now in outputs/export
        assert out["max_diff"] < 1e-5


def test_the_entry_point_on_an_unchanged_project_starts_nothing_and_reports_the_last_results(runs, repo, capsys):
    """`python -m flows.pipeline` (what `make run` runs) checks `dvc status` first: with every stage up to date it
    starts no Prefect flow run and no MLflow run, and still says where everything is."""
    from mlflow.tracking import MlflowClient

    from flows.pipeline import main

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dna").experiment_id
    before = len(client.search_runs([experiment], max_results=1000))
    assert main(["--project-dir", str(repo)]) == 0
    out = capsys.readouterr().out
    assert "every stage is up to date; nothing to run" in out
    assert "outputs/export/model.onnx" in out and "registry: dna-student version 2" in out
    assert len(client.search_runs([experiment], max_results=1000)) == before


def test_a_dvc_remote_restores_data_and_checkpoints_byte_for_byte(prefect_api, tmp_path, monkeypatch):
    """The data and teacher stages in a fresh git + DVC repository, `dvc remote add -d` a local folder, `dvc push`;
    then the cache and the cached outputs are wiped and `dvc pull` brings them back identical, the teacher's
    checkpoint included."""
    import hashlib
    import shutil
    from pathlib import Path

    repo = git_dvc_project(tmp_path / "repo")
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)  # the stages report to the session's test server
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    dvc(repo, "repro", "teacher")
    outputs = repo / "outputs"
    cached = ["data/splits.json", "teacher/teacher.pt"]
    before = {p: hashlib.sha256((outputs / p).read_bytes()).hexdigest() for p in cached}

    remote = tmp_path / "remote"
    dvc(repo, "remote", "add", "-d", "team", str(remote))
    pushed = dvc(repo, "push")
    assert "2 files pushed" in pushed, pushed
    for path in cached:
        (outputs / path).unlink()
    shutil.rmtree(repo / ".dvc" / "cache")
    assert "deleted" in dvc(repo, "status", "--with-deps", "teacher")

    pulled = dvc(repo, "pull", "--with-deps", "teacher")  # the stages that ran (the others have no outputs yet)
    assert "2 files fetched" in pulled and "2 files added" in pulled, pulled
    assert {p: hashlib.sha256((outputs / p).read_bytes()).hexdigest() for p in cached} == before
    assert "up to date" in dvc(repo, "status", "--with-deps", "teacher")
    assert "in sync" in dvc(repo, "status", "--cloud", "--with-deps", "teacher")


def test_a_teacher_taken_as_it_is_reproduces_through_dvc(prefect_api, tiny_project, tmp_path, monkeypatch):
    """A teacher not trained here (source checkpoint, no epochs: as a pretrained timm teacher or a DNA+ round's)
    writes no training state; the teacher stage still reproduces, with its weights and a header-only history."""
    import shutil
    from pathlib import Path

    import pandas as pd
    import torch
    import yaml

    from dna.checkpoint import load_checkpoint

    repo = git_dvc_project(tmp_path / "repo")
    shutil.copy(tiny_project / "outputs" / "teacher" / "teacher.pt", repo / "trained.pt")
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["teacher"] |= {"source": "checkpoint", "checkpoint": "trained.pt", "train": raw["teacher"]["train"] | {
        "epochs": 0}}
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    dvc(repo, "repro", "teacher")
    teacher = repo / "outputs" / "teacher"
    assert not (teacher / "train_state.pt").exists()
    assert pd.read_csv(teacher / "history.csv").empty
    given, made = load_checkpoint(repo / "trained.pt")["model"], load_checkpoint(teacher / "teacher.pt")["model"]
    assert all(torch.equal(given[k], made[k]) for k in given)
    assert json.loads((teacher / "metrics.json").read_text())["epochs"] == 0


def test_a_teacher_free_supervision_over_a_transformer_space_reproduces_through_dvc(prefect_api, tmp_path, monkeypatch):
    """supervision ssl (DNA++) over a vision-transformer space through `dvc repro`: the teacher stage records that
    there is no teacher (the file the distill stage depends on), every stage runs, and the exported network, made
    of attention blocks, passes its parity check."""
    from pathlib import Path

    import yaml

    from dna.checkpoint import load_checkpoint

    repo = git_dvc_project(tmp_path / "repo")
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["supervision"] = {"kind": "ssl", "ensemble": 1}
    raw["space"] |= {"kind": "vit", "ops": ["mha_h2_e2", "mha_h4_e2_k3"]}
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    out = dvc(repo, "repro")
    assert all(f"Running stage '{stage}'" in out for stage in STAGES), out[-2000:]
    outputs = repo / "outputs"
    assert load_checkpoint(outputs / "teacher" / "teacher.pt") == {"teacher": None, "supervision": "ssl"}
    export = json.loads((outputs / "export" / "metrics.json").read_text())
    assert export["max_abs_diff"] <= export["atol"]
    arch = Arch.load(outputs / "search" / "arch.yaml")
    assert sum(layer.startswith("mha_") for stage in arch.stages for layer in stage) >= 2
    code = """
import json, numpy as np
from dna.config import load_params
from dna.export import onnx_predict, read_metadata
from dna.pipeline import Run
from flows.registry import load_champion
from flows.tracking import tracking_uri
params = load_params("params.yaml")
run = Run(params)
images = run.data.images("test", 8).numpy()
logits = load_champion(tracking_uri(params), params.mlflow.registered_model).run(["logits"], {"images": images})[0]
diff = float(np.abs(logits - onnx_predict(run.paths.onnx, images)).max())
print(json.dumps({"max_diff": diff, "arch": read_metadata(run.paths.onnx)["arch"]}))
"""
    done = run_python(code, repo)  # the registry's champion, in a fresh process, is the transformer just exported
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["max_diff"] < 1e-5 and Arch.from_dict(json.loads(out["arch"])) == arch
    assert "Data and pipelines are up to date" in dvc(repo, "repro")
    from flows.pipeline import pipeline_flow

    after = pipeline_flow(str(repo))  # the Prefect flow finds what `dvc repro` recorded
    assert after["ran"] == [] and after["skipped"] == STAGES


NEW_STAGE_MODULE = '''"""The calibrate stage: the chosen network's layers per stage."""
from __future__ import annotations

from dna.arch import Arch
from dna.checkpoint import write_json


def stage_calibrate(run) -> dict:
    stages = [len(stage) for stage in Arch.load(run.paths.arch).stages]
    write_json(run.paths.root / "calibrate" / "layers.json", {"stages": stages})
    metrics = {"layers": sum(stages)}
    write_json(run.paths.root / "calibrate" / "metrics.json", metrics)
    return metrics
'''
NEW_STAGE_ENTRY = '''    Stage("calibrate", "The chosen network's layers.", "dna.stages.calibrate:stage_calibrate",
          ("seed",), ("calibrate/layers.json",), metrics="calibrate/metrics.json", headline=("layers",),
          inputs=("search/arch.yaml",)),
'''
FLOW_RUN = """
import json
from flows.pipeline import pipeline_flow
result = pipeline_flow(".")
print(json.dumps({k: result.get(k) for k in ("ran", "metrics", "mlflow_run_id")}))
"""


def test_a_new_stage_is_one_module_plus_one_table_entry_and_runs_through_the_flow_and_dvc_repro(prefect_api,
                                                                                              tmp_path):
    """A copy of the project gets one module (dna/stages/calibrate.py) and one entry in the stage table, nothing else:
    its DVC files made by `python -m flows.dvc_files --write` hold the stage; the pipeline flow runs it after what it
    reads (the generic step flow, with an MLflow run and its metrics) and DVC records it; `dvc repro` after a change
    to its module reruns it and nothing else; the flow after that runs nothing."""
    repo = git_dvc_project(tmp_path / "repo")
    (repo / "dna" / "stages" / "calibrate.py").write_text(NEW_STAGE_MODULE)
    table = repo / "dna" / "stages" / "__init__.py"
    text = table.read_text()
    end = text.index("\n)\n", text.index("STAGES: tuple[Stage, ...] = (")) + 1
    table.write_text(text[:end] + NEW_STAGE_ENTRY + text[end:])
    env = {**os.environ, "PYTHONPATH": str(repo), "PREFECT_API_URL": prefect_api}  # the copy's dna, not this one

    def python(*args) -> str:
        done = subprocess.run([sys.executable, *args], cwd=repo, env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    python("-m", "flows.dvc_files", "--write")
    stage = __import__("yaml").safe_load((repo / "dvc.yaml").read_text())["stages"]["calibrate"]
    assert stage["cmd"] == "dna calibrate" and "dna/stages/calibrate.py" in stage["deps"]
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)

    first = json.loads(python("-c", FLOW_RUN).strip().splitlines()[-1])
    assert first["ran"] == [*STAGES[:-1], "calibrate", "register"]
    arch = Arch.load(repo / "outputs" / "search" / "arch.yaml")
    assert first["metrics"]["calibrate"] == {"layers": sum(len(stage) for stage in arch.stages)}
    assert "up to date" in python("-m", "dvc", "status", "dvc.yaml")  # the flow recorded it, its output cached

    with open(repo / "dna" / "stages" / "calibrate.py", "a") as module:
        module.write("# a change to the stage's own module\n")
    (repo / "outputs" / "calibrate" / "layers.json").unlink()
    repro = python("-m", "dvc", "repro")
    assert [line for line in repro.splitlines() if line.startswith("Running stage")] == ["Running stage 'calibrate':"]
    assert json.loads((repo / "outputs" / "calibrate" / "layers.json").read_text())["stages"] == \
        [len(stage) for stage in arch.stages]
    assert json.loads(python("-c", FLOW_RUN).strip().splitlines()[-1])["ran"] == []

    from mlflow.tracking import MlflowClient

    from flows.tracking import nested_runs

    runs = {r.info.run_name: r for r in nested_runs(f"sqlite:///{repo / 'mlflow.db'}", first["mlflow_run_id"])}
    assert runs["calibrate"].data.metrics["layers"] == first["metrics"]["calibrate"]["layers"]
    assert MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").list_artifacts(runs["calibrate"].info.run_id)
