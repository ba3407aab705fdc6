"""Fast checks of the orchestration's wiring: dvc.yaml against the flows, task runners, the DVC command line."""
from __future__ import annotations

import os

import pytest
import yaml
from pipeline_support import ROOT, tiny_raw

from dna.config import parse_params
from dna.stages import STAGES as TABLE
from flows.code_deps import code_deps
from flows.entry import missing_dvc_params
from flows.env import configure_environment, environment_defaults
from flows.pipeline import dvc_command, set_values
from flows.settings import OrchestrationConfig
from flows.steps import STAGE_PARAMS, STAGES, STEPS, pick
from flows.task_runners import make_task_runner
from flows.tracking import artifact_location, tracking_uri

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())


def _paths(entries: list) -> set[str]:
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries}


def test_dvc_yaml_is_the_stage_table_steps_in_order_with_their_params_outputs_and_metrics():
    assert list(DVC["stages"]) == STAGES
    for step in STEPS:
        stage = DVC["stages"][step.name]
        if step.per_target:  # one stage per search target: a foreach over search.targets, its paths the target's
            assert stage["foreach"] == "${search.targets}", step.name
            stage = stage["do"]
        commands = [f"dna {s.name}" for s in TABLE if s.pipeline_step == step.name] or ["dna register"]
        plain = [f"{c} --target ${{key}}" if step.per_target else c for c in commands]
        assert stage["cmd"] == (plain[0] if len(plain) == 1 else plain), step.name  # plain `dna` commands
        assert stage.get("params", []) == STAGE_PARAMS[step.name] == list(step.params), step.name
        assert [d for d in stage["deps"] if d.endswith(".py")] == code_deps(commands), step.name
        keyed = step.at("${key}")
        assert _paths(stage.get("outs", [])) == {f"${{outputs}}/{o}" for o in keyed.outputs}, step.name
        assert _paths(stage.get("metrics", [])) == ({f"${{outputs}}/{keyed.metrics}"} if step.metrics else set())


def test_a_new_stage_is_one_table_entry_plus_its_function():
    from dna.stages import Plot, Stage
    from flows.dvc_files import default_file
    from flows.step_flow import step_flow
    from flows.steps import steps_of

    extra = Stage("calibrate", "Re-estimate something.", "dna.pipeline:stage_data", ("seed", "rating"),
                  ("calibrate/stats.json", "calibrate/state.pt"), metrics="calibrate/metrics.json",
                  headline=("error",), inputs=("search/targets.csv",), checkpoints=("calibrate/state.pt",),
                  plots=(Plot(("calibrate/stats.json",), "step", ("error",), name="calibration"),))
    steps = steps_of((*TABLE, extra))
    assert [s.name for s in steps] == [*STAGES, "calibrate"]
    new = steps[-1]
    assert (new.module, new.params, new.outputs, new.metrics) == (
        "calibrate", ("seed", "rating"), ("calibrate/stats.json", "calibrate/state.pt"), "calibrate/metrics.json")
    # its DVC stage comes from the same entry: command, code, what it reads, params, outputs (the checkpoint
    # persists); its Prefect flow is the generic step flow (no flows/calibrate.py)
    with pytest.raises(ValueError, match="'dna calibrate': not a `dna` stage command"):
        default_file(steps)  # a command the table does not have
    with TABLE.scoped():
        TABLE.register("calibrate", extra)
        made = yaml.safe_load(default_file(steps))
        stage = made["stages"]["calibrate"]
    assert made["plots"][-1] == {"calibration": {"template": "linear", "x": "step",
                                                 "y": {"${outputs}/calibrate/stats.json": "error"}}}
    assert stage["cmd"] == "dna calibrate" and "${outputs}/search/targets.csv" in stage["deps"]
    assert "dna/pipeline.py" in stage["deps"] and stage["deps"][0] == "dna/cli.py"  # its function's module, and `dna`
    assert new.flow().func is step_flow and new.flow().args == ("calibrate",)
    assert stage["params"] == ["seed", "rating"] and stage["metrics"] == ["${outputs}/calibrate/metrics.json"]
    assert stage["outs"] == ["${outputs}/calibrate/stats.json", {"${outputs}/calibrate/state.pt": {"persist": True}}]
    loaded = extra.load()  # the function, run holding the new stage's own lock
    assert loaded.__wrapped__ is __import__("dna.pipeline", fromlist=["stage_data"]).stage_data
    assert loaded.stage_lock == "calibrate"


def test_unnamed_budgets_are_refused_for_dvc_naming_each_targets_chain(tmp_path):
    """dvc.yaml runs a chain per named target: search.budgets alone is refused in one line that names the chain's
    steps (from the table) and shows the same budgets as a named target."""
    from dna.errors import ConfigError
    from flows.entry import check_dvc_params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["search"] = {k: v for k, v in raw["search"].items() if k != "targets"} | {"budgets": {"macs": 3000000}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    chain = ", ".join(s.name for s in STEPS if s.per_target)
    with pytest.raises(ConfigError, match=rf"search.budgets: dvc.yaml runs one chain \({chain}\) per named target; "
                                          r"write search.budgets as one target, e.g. search.targets: \{default: "
                                          r'\{"macs": 3000000\}\}'):
        check_dvc_params(tmp_path / "params.yaml")
    assert chain.startswith("retrain, export")


def test_every_tracked_param_is_a_real_config_key_and_the_project_params_file_spells_them_out():
    params = parse_params(tiny_raw(), check_paths=False)
    for keys in STAGE_PARAMS.values():
        pick(params, keys)  # raises KeyError on a key the config does not have
    assert missing_dvc_params(yaml.safe_load((ROOT / "params.yaml").read_text())) == []
    raw = tiny_raw()
    del raw["mlflow"]["promote_metric"]
    assert missing_dvc_params(raw) == ["mlflow.promote_metric"]


def test_checkpoints_that_resume_needs_persist_across_reruns():
    persisted = set()
    for stage in DVC["stages"].values():
        for out in stage.get("outs", []):
            if isinstance(out, dict):
                (path, opts), = out.items()
                if opts.get("persist"):
                    persisted.add(path)
    # the teacher's train_state.pt is no output (a teacher taken as it is has none): DVC never deletes it either
    for out in DVC["stages"]["retrain"]["do"]["outs"]:  # one stage per search target
        if isinstance(out, dict) and next(iter(out.values())).get("persist"):
            persisted.add(next(iter(out)))
    assert persisted == {"${outputs}/distill", "${outputs}/targets/${key}/retrain/train_state.pt"}


def test_task_runners_by_config():
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    assert isinstance(make_task_runner(OrchestrationConfig(task_runner="threads")), ThreadPoolTaskRunner)
    assert isinstance(make_task_runner(OrchestrationConfig(task_runner="processes")), ProcessPoolTaskRunner)
    local = make_task_runner(OrchestrationConfig(task_runner="dask", max_workers=3))
    assert isinstance(local, DaskTaskRunner) and local.cluster_kwargs["n_workers"] == 3
    remote = make_task_runner(OrchestrationConfig(task_runner="dask", cluster_address="tcp://127.0.0.1:8786"))
    assert remote.address == "tcp://127.0.0.1:8786"


def test_dvc_command_repro_or_experiment_with_set_params():
    assert dvc_command()[-1] == "repro"
    cmd = dvc_command({"retrain.train.epochs": 5, "search.targets.small.params": 2e6, "~search.targets.large": None},
                      raw_params={"retrain": {"train": {"epochs": 1}}, "search": {"targets": {"small": {"macs": 1}}}})
    assert cmd[-8:] == ["exp", "run", "-S", "retrain.train.epochs=5", "-S", "+search.targets.small.params=2000000.0",
                        "-S", "~search.targets.large"]
    assert dvc_command(force=True)[-2:] == ["repro", "--force"]


def test_default_tracking_is_an_absolute_sqlite_file_with_absolute_artifacts(tmp_path):
    params = parse_params(tiny_raw(), check_paths=False)
    assert tracking_uri(params, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert artifact_location(tracking_uri(params, tmp_path), tmp_path) == (tmp_path / "mlruns").resolve().as_uri()
    server = parse_params(tiny_raw(tracking_uri="http://127.0.0.1:5000"), check_paths=False)
    assert tracking_uri(server) == "http://127.0.0.1:5000" and artifact_location("http://127.0.0.1:5000") is None


def test_environment_defaults_stay_in_the_project_and_never_override(monkeypatch, tmp_path):
    defaults = environment_defaults(tmp_path)
    assert defaults["PREFECT_HOME"] == str(tmp_path.resolve() / ".prefect")
    monkeypatch.setenv("PREFECT_HOME", "/elsewhere")
    monkeypatch.delenv("DVC_NO_ANALYTICS", raising=False)
    configure_environment(tmp_path)
    assert os.environ["PREFECT_HOME"] == "/elsewhere" and os.environ["DVC_NO_ANALYTICS"] == "1"


@pytest.mark.reliability
def test_nothing_listens_beyond_loopback_by_default(prefect_api):
    """The Prefect server the flows start and a local Dask cluster of worker processes (the default
    orchestration settings otherwise) listen on loopback addresses only."""
    import psutil
    from prefect import flow, task

    @task
    def pid() -> int:
        return os.getpid()

    @flow(task_runner=make_task_runner(OrchestrationConfig(task_runner="dask", max_workers=1), dask_processes=True))
    def probe() -> tuple[int, list]:
        worker = pid.submit().result()  # the cluster is up while the flow runs
        me = psutil.Process()
        ours = {me.pid, *(child.pid for child in me.children(recursive=True))}
        return worker, [c for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.pid in ours]

    worker, listening = probe()
    assert worker != os.getpid() and worker in {c.pid for c in listening}  # a Dask worker process, listening
    assert os.getpid() in {c.pid for c in listening}  # the Dask scheduler, in this process
    assert all(c.laddr.ip in ("127.0.0.1", "::1") for c in listening), listening


def test_a_preset_runs_as_a_dvc_experiment_of_its_differences(tmp_path):
    """--preset configs/vit.yaml: the keys where the resolved preset differs from params.yaml become `dvc exp run -S`
    overrides (given overrides win), so DVC records the experiment's params; a preset outside the project is refused
    before anything runs."""
    from dna.config import load_params
    from dna.errors import ConfigError
    from flows.pipeline import with_preset

    overrides = with_preset(ROOT, "configs/vit.yaml", {"distill.epochs": 1})
    assert overrides["space.kind"] == "vit" and overrides["supervision.kind"] == "ssl"
    assert overrides["distill.epochs"] == 1 and "data.source" not in overrides
    assert load_params(ROOT / "params.yaml", overrides) == load_params(ROOT / "configs" / "vit.yaml",
                                                                        {"distill.epochs": 1})
    cmd = dvc_command(overrides, raw_params=yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert cmd[3:5] == ["exp", "run"] and "space.kind=vit" in cmd and "outputs=outputs/vit" in cmd
    assert with_preset(ROOT, None, {"a": 1}) == {"a": 1}
    outside = tmp_path / "preset.yaml"
    outside.write_text("outputs: elsewhere\n")
    with pytest.raises(ConfigError, match="preset=.*is outside the project"):
        with_preset(ROOT, str(outside), None)


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")
                                          if "base: ../params.yaml" in p.read_text()
                                          or "base: dna_plusplus.yaml" in p.read_text()))
def test_dvc_applies_a_presets_overrides_to_params_yaml_as_the_preset(preset, tmp_path):
    """DVC's own parser of `dvc exp run -S` (hydra's grammar: lists, mappings, new keys with +) turns params.yaml
    into the preset, for every preset on the embedded default."""
    import shutil

    from dvc.utils.hydra import apply_overrides

    from dna.config import load_params
    from flows.pipeline import with_preset

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    cmd = dvc_command(with_preset(ROOT, f"configs/{preset}", None), raw_params=raw)
    apply_overrides(tmp_path / "params.yaml", set_values(cmd))  # what the pipeline flow applies
    assert load_params(tmp_path / "params.yaml", check_paths=False) == load_params(
        ROOT / "configs" / preset, check_paths=False)


def test_every_step_logs_the_params_it_declares_even_none():
    """A step's MLflow run logs exactly its declared params; a step that declares none (figures) logs none."""
    from flows.steps import OPTIONAL_STEPS, stage_params

    params = parse_params(tiny_raw() | {"rounds": {"count": 2}}, check_paths=False)
    for step in (*STEPS, *OPTIONAL_STEPS):
        logged = stage_params(params, step.name)
        assert {key.split(".")[0] for key in logged} == {key.split(".")[0] for key in step.params}, step.name
    assert stage_params(params, "figures") == {}


def test_the_steps_flow_runs_send_no_heartbeats_of_their_own_and_the_pipelines_does(prefect_api):
    """Each flow run's end waits for its heartbeat thread (up to a second): the steps, run inside the pipeline flow
    and in the tasks it fans out to threads, do without one; the pipeline flow keeps its own when it is run as a
    deployment's is (the command line runs it inside without_heartbeats too)."""
    from prefect import flow, task
    from prefect.settings import get_current_settings
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.pipeline import without_heartbeats

    @flow
    def step() -> int | None:
        return get_current_settings().flows.heartbeat_frequency

    @task
    def chain() -> int | None:
        return step()

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=2))
    def pipeline() -> list:
        own = get_current_settings().flows.heartbeat_frequency
        with without_heartbeats():
            return [own, step(), chain.submit().result()]

    own, in_process, in_a_thread = pipeline()
    assert own == get_current_settings().flows.heartbeat_frequency and own is not None
    assert in_process is None and in_a_thread is None
