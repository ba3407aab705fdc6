"""Faults at the level of the flows: a block task that fails once is retried by Prefect and resumes from its last
epoch; a block that keeps failing fails the stage with the block named while the other blocks' results are kept;
a model that fails ONNX parity is never registered, nor an export left over from an earlier one or from an earlier
retraining; registering again after an interruption adds no version; a bad config writes no output and no MLflow
run."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from pipeline_support import clone_project, tiny_raw, working_directory, write_params

pytestmark = pytest.mark.reliability


def flaky_stage_distill(monkeypatch, failing_block: int, times: int) -> list[int]:
    """Make the distill stage (dna.stages.distill.stage_distill) fail for one block the first `times` calls, right
    after the block's first epoch is checkpointed (as a worker lost mid-block would); returns the blocks of every
    call, in order."""
    import dna.stages.distill

    real, calls = dna.stages.distill.stage_distill, []

    def stage_distill(run, block, on_epoch=None):
        calls.append(block)
        if block != failing_block or calls.count(block) > times:
            return real(run, block, on_epoch=on_epoch)

        def fail_after_first_epoch(row):
            if on_epoch:
                on_epoch(row)
            raise ConnectionError(f"injected: lost the worker of block {block} after epoch {row['epoch']}")

        return real(run, block, on_epoch=fail_after_first_epoch)

    monkeypatch.setattr(dna.stages.distill, "stage_distill", stage_distill)
    return calls


def ratings(root, block: int) -> pd.DataFrame:
    return pd.read_csv(root / "outputs" / "ratings" / f"block_{block}.csv", dtype={"path": str})


@pytest.fixture(scope="module")
def reference(prefect_api, tiny_project, tmp_path_factory):
    """The distill flow without faults: the ratings a faulty run must end up with."""
    from flows.distill import run_distill

    root = clone_project(tiny_project, tmp_path_factory.mktemp("distill-reference"))
    with working_directory(root):
        run_distill("params.yaml")
    return root


def test_a_block_that_fails_once_is_retried_and_resumes_from_its_last_epoch(reference, tiny_project, tmp_path,
                                                                           monkeypatch):
    from flows.distill import run_distill

    calls = flaky_stage_distill(monkeypatch, failing_block=1, times=1)
    root = clone_project(tiny_project, tmp_path / "project")
    with working_directory(root):
        result = run_distill("params.yaml")  # orchestration.retries = 1
    assert calls.count(1) == 2 and calls.count(0) == 1
    retried = result["blocks"][1]
    assert retried["resumed_from"] == 1 and retried["trained_epochs"] == 1  # epoch 1 was not trained again
    for block in (0, 1):
        mine, theirs = ratings(root, block), ratings(reference, block)
        assert list(mine["path"]) == list(theirs["path"])
        # the same process resumes from an exact checkpoint: same weights, so the same scores
        pd.testing.assert_series_equal(mine["score"], theirs["score"], rtol=1e-6)


def test_a_block_that_keeps_failing_fails_the_stage_naming_it_and_keeps_the_others(prefect_api, tiny_project,
                                                                                 tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from dna.fan_out import Unfinished
    from flows.distill import run_distill
    from flows.tracking import nested_runs

    calls = flaky_stage_distill(monkeypatch, failing_block=1, times=99)
    root = clone_project(tiny_project, tmp_path / "project")
    with working_directory(root), pytest.raises(Unfinished) as failure:
        run_distill("params.yaml")
    message = str(failure.value)
    assert "block 1: ConnectionError: injected" in message and "blocks 0 finished and are kept" in message
    assert "block 0:" not in message
    assert calls.count(1) == 2  # the first try and one retry
    assert len(ratings(root, 0)) > 0 and not (root / "outputs" / "ratings" / "block_1.csv").exists()
    assert (root / "outputs" / "distill" / "block_1.pt").is_file()  # its last good epoch, for the next run

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    stage = client.search_runs(client.get_experiment_by_name("dna").experiment_id,
                               filter_string="attributes.run_name = 'distill'")[0]
    assert stage.info.status == "FAILED" and stage.data.tags["dna.failed_blocks"] == "1"
    assert "block_0.best_score" in stage.data.metrics
    blocks = {r.info.run_name: r.info.status for r in nested_runs(client.tracking_uri, stage.info.run_id)}
    assert blocks["block_0"] == "FINISHED" and blocks["block_1"] == "FAILED"

    monkeypatch.undo()  # the fault is gone: the stage again redoes only what is missing
    before = (root / "outputs" / "distill" / "block_0.pt").read_bytes()
    with working_directory(root):
        result = run_distill("params.yaml")
    # both tries of block 1 checkpointed their epochs before failing: nothing is trained again, block 1 is rated
    assert [(b["resumed_from"], b["trained_epochs"]) for b in result["blocks"]] == [(2, 0), (2, 0)]
    assert (root / "outputs" / "distill" / "block_0.pt").read_bytes() == before
    assert len(ratings(root, 1)) == result["blocks"][1]["candidates"] > 0


@pytest.fixture(scope="module")
def retrained(tiny_project, tmp_path_factory):
    """A project with a chosen architecture (the space's smallest) retrained for one epoch."""
    from dna.config import load_params
    from dna.pipeline import Run, stage_retrain
    from dna.spaces.base import Cell

    root = clone_project(tiny_project, tmp_path_factory.mktemp("retrained"))
    with working_directory(root):
        run = Run(load_params("params.yaml"))
        run.space.arch([(Cell(b, 1, run.space.cells(b)[0].width), (0,)) for b in range(run.space.num_blocks)]) \
            .save(run.paths.arch)
        stage_retrain(run)
    return root


def test_a_model_that_fails_onnx_parity_is_never_registered(prefect_api, retrained, tmp_path):
    from mlflow.tracking import MlflowClient

    from dna.export import ParityError
    from flows.export import export_flow
    from flows.register import register_flow

    root = clone_project(retrained, tmp_path / "project", outputs=("data", "teacher", "search", "targets"))
    strict = {"export.atol": 1e-12}  # far below float32 round-off: the check cannot pass
    with working_directory(root):
        with pytest.raises(ParityError, match="atol 1e-12"):
            export_flow("params.yaml", strict)
        assert not (root / "outputs" / "targets" / "default" / "export" / "model.onnx").exists()
        with pytest.raises(FileNotFoundError):
            register_flow("params.yaml", strict)
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    assert client.search_registered_models() == [] and client.search_model_versions() == []
    assert client.search_logged_models(experiment_ids=[client.get_experiment_by_name("dna").experiment_id]) == []
    export_run = client.search_runs([client.get_experiment_by_name("dna").experiment_id],
                                    filter_string="attributes.run_name = 'export'")[0]  # no target named: the first's
    assert export_run.info.status == "FAILED"

    with working_directory(root):  # what `dvc repro` runs: exit 1 with one line, and still nothing registered
        from flows.export import main as export_main

        assert export_main(["-S", "export.atol=1e-12"]) == 1
    assert client.search_model_versions() == []
    with working_directory(root):  # the default tolerance passes: now it is registered, as version 1
        export_flow("params.yaml")
        record = register_flow("params.yaml")
    assert record["version"] == 1 and record["champion"] == 1


EXPORT_FILES = ("model.onnx", "metrics.json", "logged_model.json")


def registry_client(root):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def test_a_failed_export_leaves_no_earlier_export_to_register(prefect_api, retrained, tmp_path):
    from dna.export import ParityError
    from flows.export import export_flow
    from flows.register import register_flow

    root = clone_project(retrained, tmp_path / "project", outputs=("data", "teacher", "search", "targets"))
    export = root / "outputs" / "targets" / "default" / "export"
    with working_directory(root):
        export_flow("params.yaml")
        assert all((export / name).is_file() for name in EXPORT_FILES)
        with pytest.raises(ParityError):
            export_flow("params.yaml", {"export.atol": 1e-12})
        assert [name for name in EXPORT_FILES if (export / name).exists()] == []
        with pytest.raises(FileNotFoundError):
            register_flow("params.yaml")
    assert registry_client(root).search_model_versions() == []


def test_an_export_of_an_earlier_retraining_is_not_registered(prefect_api, retrained, tmp_path, capsys):
    """retrain/model.pt replaced after the export (retrained, the export not run again): registration fails with
    one line and exit 1, registering nothing, until the export runs again."""
    import torch

    from dna.checkpoint import load_checkpoint, save_checkpoint
    from flows.export import export_flow
    from flows.register import main as register_main
    from flows.register import register_flow

    root = clone_project(retrained, tmp_path / "project", outputs=("data", "teacher", "search", "targets"))
    model = root / "outputs" / "targets" / "default" / "retrain" / "model.pt"
    with working_directory(root):
        export_flow("params.yaml")
        state = load_checkpoint(model)
        state["model"] = {k: v + 0.01 if torch.is_floating_point(v) else v for k, v in state["model"].items()}
        save_checkpoint(model, state)
        assert register_main([]) == 1
        (error,) = error_lines(capsys)
        assert "export/model.onnx and" in error and "not exported from the current" in error \
            and "retrain/model.pt" in error
        assert registry_client(root).search_model_versions() == []
        export_flow("params.yaml")
        assert register_flow("params.yaml")["version"] == 1


def test_registering_again_after_an_interruption_adds_no_version(prefect_api, retrained, tmp_path, monkeypatch):
    """The same ONNX file keeps its version: a rerun after an interruption (between registering and promoting)
    promotes it, a rerun after that changes nothing, and a withdrawn version is not put back by a rerun."""
    import flows.register
    from flows.export import export_flow
    from flows.register import register_flow
    from flows.registry import withdraw

    def interrupted(*args, **kwargs):
        raise RuntimeError("interrupted between registering and promoting")

    root = clone_project(retrained, tmp_path / "project", outputs=("data", "teacher", "search", "targets"))
    client = registry_client(root)
    with working_directory(root):
        export_flow("params.yaml")
        with monkeypatch.context() as patched:
            patched.setattr(flows.register, "promote", interrupted)
            with pytest.raises(RuntimeError, match="interrupted"):
                register_flow("params.yaml")
        assert [int(v.version) for v in client.search_model_versions()] == [1]
        first = register_flow("params.yaml")
        assert (first["version"], first["champion"], first["latest_version"]) == (1, 1, 1)
        assert register_flow("params.yaml")["reason"] == "already the champion"
        assert withdraw(client, "dna-student", 1, "test_accuracy") is None
        after = register_flow("params.yaml")
        assert after["version"] == 1 and not after["promoted"] and "withdrawn" in after["reason"]
    assert [int(v.version) for v in client.search_model_versions()] == [1]


BAD_CONFIGS = [
    pytest.param({"retrain.train.epochs": "ten"}, "retrain.train.epochs", id="wrong-type"),
    pytest.param({"space.ops": ["ir_k4x"]}, "space.ops", id="unknown-op"),
    pytest.param({"teacher.model": "efficientnet_b99"}, "teacher.model", id="unknown-timm-model"),
    pytest.param({"search.targets.default.macs": 1000}, "search.targets.default.macs",
                 id="budget-below-the-smallest-network"),
    pytest.param({"data.source": "imagefolder", "data.root": "/nonexistent/images"}, "data.root", id="missing-folder"),
    pytest.param({"orchestration.task_runner": "slurm"}, "orchestration.task_runner", id="unknown-task-runner"),
]


def nested_set(raw: dict, dotted: str, value) -> dict:
    node = raw
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    return raw


def bad_project(root, change: dict):
    raw = tiny_raw()
    for dotted, value in change.items():
        nested_set(raw, dotted, value)
    write_params(root / "params.yaml", raw)
    return raw


def assert_nothing_written(root, raw: dict) -> None:
    """No outputs, no MLflow store (mlflow.db, mlruns), no dvc.lock: only the params file, unchanged."""
    assert sorted(p.name for p in root.iterdir()) == ["params.yaml"]
    assert yaml.safe_load((root / "params.yaml").read_text()) == json.loads(json.dumps(raw))


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("change, key", BAD_CONFIGS)
def test_a_bad_config_stops_the_pipeline_before_any_work(prefect_api, tmp_path, capsys, change, key):
    """python -m flows.pipeline: exit 2, one line naming the key, and nothing written."""
    from flows.pipeline import main as pipeline_main

    raw = bad_project(tmp_path, change)
    assert pipeline_main(["--project-dir", str(tmp_path)]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and key in lines[0], lines
    assert_nothing_written(tmp_path, raw)


@pytest.mark.parametrize("change, key, stages", [
    pytest.param({"retrain.train.epochs": "ten"}, "retrain.train.epochs", None, id="schema-every-stage"),
    pytest.param({"search.targets.default.macs": 1000}, "search.targets.default.macs",
                 ["teacher", "distill", "profile", "search", "retrain"], id="costs-the-stages-that-read-the-space"),
])
def test_a_bad_config_stops_every_stage_that_checks_it_before_any_work(prefect_api, tmp_path, capsys, change, key,
                                                                       stages):
    """Each stage's `dna` commands (what `dvc repro` runs) and each step's flow (`python -m flows.<step>`): exit 2,
    one line naming the key, nothing written. The schema of the whole file is checked by every stage; the checks
    that build the teacher or the space (and so import timm) by the stages that read the teacher, the space, the
    supervision or the search."""
    import importlib
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    from flows.entry import Checks
    from flows.steps import STAGES, STEPS

    raw = bad_project(tmp_path, change)
    if stages is not None:
        assert [s for s in STAGES if Checks.of(s).models] == stages
    dna = str(Path(sys.executable).parent / "dna")
    with working_directory(tmp_path):
        for step in (s for s in STEPS if s.name in (stages or STAGES)):
            for command in step.commands:
                done = subprocess.run([dna, *command.split()[1:], "--params", "params.yaml"], capture_output=True,
                                      text=True, timeout=300)
                lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
                assert done.returncode == 2 and len(lines) == 1 and key in lines[0], (command, done.stderr[-2000:])
            own_module = importlib.util.find_spec(f"flows.{step.module}") is not None  # else the generic step flow
            flow_main = importlib.import_module(f"flows.{step.module}" if own_module else "flows.step_flow").main
            assert flow_main(([] if own_module else [step.name]) + ["--params", "params.yaml"]) == 2, step.name
            lines = error_lines(capsys)
            assert len(lines) == 1 and key in lines[0], (step.name, lines)
    assert_nothing_written(tmp_path, raw)


def _alike_errors():
    from dna.errors import ConfigError, MissingInput
    from dna.export import ParityError
    from dna.train import NonFiniteLoss

    return [ConfigError("data.root='/nowhere' does not exist"), MissingInput("splits.json is missing"),
            ParityError("max |diff| 0.1 above atol 1e-12", 0.1), NonFiniteLoss("loss is nan at epoch 3")]


@pytest.mark.parametrize("error", [ConnectionError("injected: lost the worker"), *_alike_errors()],
                         ids=lambda e: type(e).__name__)
def test_only_failures_that_may_pass_on_another_try_are_retried(prefect_api, error):
    """A bad config, a missing input, a diverging loss or a failed parity check fail the same way on every try:
    retrying them only repeats the failure (and its cost)."""
    from dna.errors import fails_alike
    from flows.prefect_api import stage_task

    calls = []

    def stage():
        calls.append(1)
        raise error

    with pytest.raises(type(error)):
        stage_task(stage, "stage", retries=2)()
    assert len(calls) == (1 if fails_alike(error) else 3)


def test_the_flows_block_and_network_tasks_retry_only_what_is_worth_retrying():
    from flows.distill import block_task, features_task
    from flows.prefect_api import worth_retrying
    from flows.rank import network_task, replicate_task, spos_task

    for task in (block_task, features_task, network_task, spos_task, replicate_task):
        assert task.with_options(retries=3).retry_condition_fn is worth_retrying, task.name
