"""The DVC pipeline end to end on the tiny configuration, driven by the pipeline flow in this process: every step,
then again (nothing runs), then an experiment on a retraining parameter that reruns only retrain and what follows;
`dvc repro` after the flow finds everything up to date, and the flow after `dvc repro` runs nothing. A DVC remote (a
local folder) takes a run's data and checkpoints with `dvc push` and gives them back with `dvc pull`."""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_support import git_dvc_project, run_python

from dna.arch import Arch
from flows.pipeline import pipeline_steps

pytestmark = pytest.mark.slow  # about five minutes: five pipeline runs, two search targets

TARGETS = {"small": {"macs": 140000}, "large": {"macs": 1000000}}  # the tiny space: 126k to 163k multiply-adds


def addresses(targets) -> list[str]:
    """Every step's DVC address in run order: `<step>@<target>` for each target's chain."""
    return [address for address, _ in pipeline_steps(1, list(targets))]


ONE = addresses(["default"])  # the tiny params: search.targets {default: ...}
TWO = addresses(TARGETS)


def dvc(repo, *args) -> str:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git + DVC repository with the project's dvc.yaml, flows, core code and the tiny params.yaml with two search
    targets."""
    import yaml

    repo = git_dvc_project(tmp_path_factory.mktemp("dvc-repo"))
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["search"]["targets"] = TARGETS
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    subprocess.run(["git", "commit", "-qam", "two targets"], cwd=repo, check=True)
    return repo


KEPT = ("data/splits.json", "teacher/teacher.pt", "distill/block_0.pt", "search/targets/small/arch.yaml",
        "targets/small/retrain/model.pt", "targets/small/export/model.onnx", "targets/large/retrain/model.pt",
        "targets/large/export/model.onnx")


@pytest.fixture(scope="module")
def runs(prefect_api, repo):
    """Five pipeline flow runs: reproduce, reproduce again, an experiment with retrain.train.lr changed, one that
    adds a third target, and one that changes the first target's budget."""
    from flows.pipeline import pipeline_flow

    outputs = repo / "outputs"

    def times():
        return {p: os.stat(outputs / p).st_mtime_ns for p in KEPT}

    first = pipeline_flow(str(repo))
    kept = times()
    began = datetime.datetime.now(datetime.timezone.utc)
    second = pipeline_flow(str(repo))
    second["window"] = (began, datetime.datetime.now(datetime.timezone.utc))
    third = pipeline_flow(str(repo), overrides={"retrain.train.lr": 0.004})
    after = times()
    fourth = pipeline_flow(str(repo), overrides={"search.targets.tiny": {"macs": 130000}})
    after_fourth = times()
    fifth = pipeline_flow(str(repo), overrides={"search.targets.small.macs": 150000})
    return first, second, third, kept, after, fourth, after_fourth, fifth


def test_first_repro_runs_every_stage_in_order_each_target_its_own_chain(runs, repo):
    first = runs[0]
    assert first["ran"] == TWO and first["skipped"] == []
    assert (repo / "dvc.lock").is_file()
    for target in TARGETS:
        registered = first["metrics"][f"register@{target}"]
        assert registered["version"] == 1 and registered["champion"] == 1
        assert registered["name"] == f"dna-student-{target}"  # one registered model per target
        assert first["metrics"][f"export@{target}"]["max_abs_diff"] <= 1e-4


def test_the_targets_chains_run_as_prefect_tasks_on_the_task_runner(runs):
    """Under Prefect each target's chain is one task (`target-<name>`) of the targets flow, each completed, the
    first run's once per target."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    names = [f"target-{t}" for t in TARGETS]
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=names)))
    done = [t for t in tasks if t.state is not None and t.state.is_completed()]
    assert sorted({t.name for t in done}) == sorted(names)
    assert len(done) >= 2 * len(names)  # the first run and the retraining change each ran every chain
    began, ended = runs[1]["window"]  # the run that found everything up to date started no chain
    assert not [t for t in tasks if t.created is not None and began <= t.created <= ended]


def test_second_repro_runs_nothing(runs, repo):
    second = runs[1]
    assert second["ran"] == [] and second["skipped"] == TWO
    assert "up to date" in dvc(repo, "status")
    assert "Data and pipelines are up to date" in dvc(repo, "repro")  # the flow recorded every step as DVC would


def test_a_retraining_parameter_reruns_only_retrain_and_what_follows(runs, repo):
    _, _, third, kept, after, *_ = runs
    chains = [a for a in TWO if "@" in a]
    assert third["ran"] == [*chains, "figures"]
    assert third["skipped"] == ["data", "teacher", "distill", "profile", "search"]
    for path in ("data/splits.json", "teacher/teacher.pt", "distill/block_0.pt", "search/targets/small/arch.yaml"):
        assert after[path] == kept[path], f"{path} was rewritten"
    for path in KEPT[4:]:
        assert after[path] != kept[path], f"{path} was not rebuilt"
    assert third["metrics"]["register@small"]["version"] == third["metrics"]["register@large"]["version"] == 2
    shown = json.loads(dvc(repo, "exp", "show", "--json"))
    saved = next(exp["revs"][0]["data"] for base in shown for exp in base["experiments"] or []
                 if exp["revs"][0]["name"] == third["experiment"])  # a DVC experiment: its params and metrics
    assert saved["params"]["params.yaml"]["data"]["retrain"]["train"]["lr"] == 0.004
    assert saved["metrics"]["outputs/targets/small/export/metrics.json"]["data"] == third["metrics"]["export@small"]


def test_a_target_added_to_a_finished_run_runs_only_its_own_chain(runs, repo):
    """A third target: the search (its params changed) rewrites the other targets' networks unchanged, so DVC
    reruns only the new target's retraining, export and registration (and the pictures)."""
    _, _, _, _, after, fourth, after_fourth, _ = runs
    assert fourth["ran"] == ["search", "retrain@tiny", "export@tiny", "register@tiny", "figures"]
    unsearched = [p for p in KEPT if not p.startswith("search/")]  # the search rewrote its files, alike
    assert {p: after_fourth[p] for p in unsearched} == {p: after[p] for p in unsearched}
    assert fourth["metrics"]["register@tiny"]["version"] == 1  # a model of its own
    assert fourth["metrics"]["register@small"]["version"] == 2  # the others' registrations as they were


def test_one_target_changed_reruns_only_its_chain(runs, repo):
    fifth = runs[7]
    assert fifth["ran"][0] == "search" and fifth["ran"][-1] == "figures"
    assert not [a for a in fifth["ran"] if a.endswith(("@large", "@tiny"))]
    assert set(fifth["ran"][1:-1]) <= {"retrain@small", "export@small", "register@small"}


def test_a_two_point_sweep_queued_in_dvc_distils_nothing_again(runs, repo):
    """`dvc exp run --queue --copy-paths outputs -S 'search.targets.small.macs=A,B'`, then `dvc queue start`, as a
    DVC user sweeps a budget over a committed run: two experiments, both in `dvc exp show` with their budgets, their
    accuracies and costs;
    neither reruns the teacher or the distillation (the run's outputs are copied into each experiment's workspace:
    the reports DVC does not cache among them), only the search and the small chain."""
    import time

    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "the run to sweep from"], cwd=repo, check=True)
    dvc(repo, "exp", "run", "--queue", "--copy-paths", "outputs", "-S", "search.targets.small.macs=132000,160000")
    dvc(repo, "queue", "start")
    deadline = time.monotonic() + 900
    while any(word in dvc(repo, "queue", "status") for word in ("Queued", "Running")):
        assert time.monotonic() < deadline, dvc(repo, "queue", "status")
        time.sleep(5)
    status = dvc(repo, "queue", "status")
    assert status.count("Success") == 2, status
    shown = json.loads(dvc(repo, "exp", "show", "--json"))
    swept, measured = {}, {}
    for base in shown:
        for exp in base["experiments"] or []:
            data = exp["revs"][0].get("data") or {}
            macs = (data.get("params") or {}).get("params.yaml", {}).get("data", {}).get("search", {}).get(
                "targets", {}).get("small", {}).get("macs")
            if macs in (132000, 160000):
                swept[macs] = exp["revs"][0]["name"]
                metrics = data.get("metrics") or {}
                measured[macs] = {"retrain": metrics["outputs/targets/small/retrain/metrics.json"]["data"],
                                  "export": metrics["outputs/targets/small/export/metrics.json"]["data"]}
    assert sorted(swept) == [132000, 160000]  # `dvc exp show` lists both, each with its budget
    for budget, found in measured.items():  # and each one's accuracy and cost, the network within its budget
        assert 0 < found["retrain"]["test_accuracy"] <= 1 and 0 < found["export"]["onnx_test_accuracy"] <= 1
        assert 0 < found["retrain"]["macs"] <= budget
    for name in swept.values():
        logs = dvc(repo, "queue", "logs", name)
        assert "Running stage 'distill'" not in logs and "Running stage 'teacher'" not in logs, logs[-3000:]
        assert "Running stage 'search'" in logs and "Running stage 'retrain@large'" not in logs


def test_each_targets_champion_is_served_on_its_own(runs, repo, tmp_path):
    """`mlflow models serve -m models:/dna-student-<target>@champion` for both targets: each answers with the
    logits of its own target's champion (the ONNX file of that registered version)."""
    import mlflow
    import numpy as np
    from pipeline_support import working_directory
    from test_serve import http, serve, stop

    from dna.config import load_params
    from dna.export import onnx_predict
    from dna.pipeline import Run

    with working_directory(repo):
        run = Run(load_params("params.yaml"))
        images = run.data.images("test", 4).numpy()
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    for target in TARGETS:
        model = f"models:/dna-student-{target}@champion"
        local = Path(mlflow.artifacts.download_artifacts(model, dst_path=str(tmp_path / target)))
        expected = onnx_predict(next(local.rglob("*.onnx")), images)
        server, base = serve(uri, model, tmp_path / f"serve-{target}.log")
        try:
            status, body = http(f"{base}/invocations", {"inputs": images.tolist()})
        finally:
            stop(server)
        assert status == 200, body
        np.testing.assert_allclose(np.array(json.loads(body)["predictions"]["logits"]), expected, atol=1e-5)


def test_one_mlflow_run_per_pipeline_run_with_a_nested_run_per_stage_that_ran(runs, repo):
    from mlflow.tracking import MlflowClient

    from flows.tracking import nested_runs

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    for run in runs[:3]:
        parent = client.get_run(run["mlflow_run_id"])
        assert parent.info.run_name == "pipeline" and parent.info.status == "FINISHED"
        nested = sorted(r.info.run_name for r in nested_runs(client.tracking_uri, run["mlflow_run_id"]))
        assert nested == sorted(run["ran"])  # a run per step that ran, `<step>@<target>` for a target's
    distill = next(r for r in nested_runs(client.tracking_uri, runs[0]["mlflow_run_id"])
                   if r.info.run_name == "distill")
    # blocks start at the same time on the task runner: their runs may start in either order
    assert sorted(r.info.run_name for r in nested_runs(client.tracking_uri, distill.info.run_id)) == ["block_0",
                                                                                                      "block_1"]
    version = client.get_model_version("dna-student-large", "2")
    for tag in ("arch", "data_hash", "params_hash", "test_accuracy", "max_abs_diff", "atol", "git_commit"):
        assert version.tags.get(tag), tag
    assert json.loads(version.tags["arch"])["stem"] == 16


def test_the_champion_from_the_pipeline_runs_in_onnx_runtime_in_a_fresh_process(runs, repo):
    registration = json.loads((repo / "outputs" / "register" / "large" / "registration.json").read_text())
    champion = registration["champion"]
    code = """
import json, numpy as np, onnxruntime as ort
from dna.config import load_params
from dna.export import onnx_predict
from dna.pipeline import Run
from flows.registry import load_champion
from flows.tracking import tracking_uri
params = load_params("params.yaml")
run = Run(params).for_target("large")
images = run.data.images("test", 16).numpy()
session = load_champion(tracking_uri(params), "dna-student-large")
logits = session.run(["logits"], {"images": images})[0]
exported = onnx_predict(run.paths.onnx, images)
print(json.dumps({"shape": list(logits.shape), "max_diff": float(np.abs(logits - exported).max())}))
"""
    done = run_python(code, repo)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["shape"] == [16, 10]
    if champion == registration["latest_version"]:  # the champion is the model now in the target's export
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
    assert "outputs/targets/small/export/model.onnx" in out and "registry: dna-student-large version 2" in out
    assert len(client.search_runs([experiment], max_results=1000)) == before


def test_dvc_draws_every_plot_the_stage_table_declares(runs, repo):
    """`dvc plots show` of the finished run: each stage's plots (dna.stages.Plot, rendered into dvc.yaml) have data,
    a folder's one plot per file (one per block), and DVC reports no error."""
    import yaml

    from flows.steps import STEPS

    shown = json.loads(dvc(repo, "plots", "show", "--json"))
    assert not shown.get("errors"), shown.get("errors")
    drawn = {plot_id: entries for plot_id, entries in shown["data"].items() if entries}
    for plot in (plot for step in STEPS for plot in step.plots):
        if plot.name is not None:
            assert plot.name in drawn and all(e["content"]["data"]["values"] for e in drawn[plot.name]), plot.name
            continue
        path = f"outputs/{plot.files[0]}"
        found = [i for i in drawn if i == path or i.startswith(f"{path}/")]
        assert found, path
        if plot.x is None:
            assert [e["type"] for e in drawn[path]] == ["image"]
        else:  # a folder of tables: one plot per block
            blocks = len(yaml.safe_load((repo / "params.yaml").read_text())["space"]["blocks"])
            assert len(found) == (blocks if (repo / path).is_dir() else 1), found


def test_a_dvc_remote_restores_data_and_checkpoints_byte_for_byte(prefect_api, tmp_path, monkeypatch):
    """The data and teacher stages in a fresh git + DVC repository, `dvc remote add -d` a local folder, `dvc push`;
    then the cache and the cached outputs are wiped and `dvc pull` brings them back identical, the teacher's
    checkpoint and the metrics files included."""
    import hashlib
    import shutil
    from pathlib import Path

    repo = git_dvc_project(tmp_path / "repo")
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)  # the stages report to the session's test server
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    dvc(repo, "repro", "teacher")
    outputs = repo / "outputs"
    cached = ["data/splits.json", "data/metrics.json", "teacher/teacher.pt", "teacher/metrics.json"]  # metrics too
    before = {p: hashlib.sha256((outputs / p).read_bytes()).hexdigest() for p in cached}

    remote = tmp_path / "remote"
    dvc(repo, "remote", "add", "-d", "team", str(remote))
    pushed = dvc(repo, "push")
    assert "4 files pushed" in pushed, pushed
    for path in cached:
        (outputs / path).unlink()
    shutil.rmtree(repo / ".dvc" / "cache")
    assert "deleted" in dvc(repo, "status", "--with-deps", "teacher")

    pulled = dvc(repo, "pull", "--with-deps", "teacher")  # the stages that ran (the others have no outputs yet)
    assert "4 files fetched" in pulled and "4 files added" in pulled, pulled
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
    raw["teacher"]["source"] = "none"
    raw["space"] |= {"kind": "vit", "ops": ["mha_h2_e2", "mha_h4_e2_k3"]}
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    out = dvc(repo, "repro")
    assert all(f"Running stage '{stage}'" in out for stage in ONE), out[-2000:]
    outputs = repo / "outputs"
    assert load_checkpoint(outputs / "teacher" / "teacher.pt") == {"teacher": None}
    export = json.loads((outputs / "targets" / "default" / "export" / "metrics.json").read_text())
    assert export["max_abs_diff"] <= export["atol"]
    arch = Arch.load(outputs / "search" / "targets" / "default" / "arch.yaml")
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
    assert after["ran"] == [] and after["skipped"] == ONE


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
          inputs=("search/targets",)),
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
    end = text.index("\n):\n    STAGES.register", text.index("for _stage in (")) + 1
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
    assert first["ran"] == [*ONE, "calibrate"]
    arch = Arch.load(repo / "outputs" / "search" / "targets" / "default" / "arch.yaml")
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
