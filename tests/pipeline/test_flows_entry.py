"""A step's entry point checks what the step reads, and imports only what it needs: the data stage, run as DVC runs
it (`dna data`), never imports timm or torchvision (seconds of a stage with nearly no work), nor Prefect or MLflow;
a stage that reads the space does check it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pipeline_support import ROOT, tiny_raw, working_directory, write_params

from flows.code_deps import module_file
from flows.entry import Checks, _checked, check_first, load
from flows.steps import STAGES

MODEL_LIBRARIES = ("timm", "torchvision")


def modules(importtime_log: str) -> set[str]:
    """The modules a `python -X importtime` run imported."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime_log.splitlines()
            if line.startswith("import time:") and line.count("|") == 2}


def imported(importtime_log: str) -> set[str]:
    """The top-level packages a `python -X importtime` run imported."""
    return {name.split(".")[0] for name in modules(importtime_log)}


def run_stage(stage: str, project) -> subprocess.CompletedProcess:
    """`dna <stage>`, the command dvc.yaml runs, in a process of its own."""
    dna = str(Path(sys.executable).parent / "dna")
    return subprocess.run([sys.executable, "-X", "importtime", dna, stage], cwd=project, capture_output=True,
                          text=True, timeout=300)


def test_each_step_checks_the_model_libraries_only_when_it_reads_the_teacher_or_the_space():
    checks = {step: Checks.of(step) for step in STAGES}
    assert [s for s in STAGES if checks[s].models] == ["teacher", "distill", "profile", "search", "retrain"]
    assert [s for s in STAGES if not checks[s].data] == ["register", "figures"]
    assert [s for s in STAGES if not checks[s].profile] == ["profile"]


def test_the_data_stage_runs_without_timm_or_torchvision_and_the_teacher_stage_checks_with_them(tmp_path):
    write_params(tmp_path / "params.yaml", tiny_raw())
    data = run_stage("data", tmp_path)
    assert data.returncode == 0, data.stderr[-3000:]
    assert (tmp_path / "outputs" / "data" / "splits.json").is_file()
    assert not imported(data.stderr) & set(MODEL_LIBRARIES), sorted(imported(data.stderr) & set(MODEL_LIBRARIES))
    assert "torch" in imported(data.stderr)  # what the stage does need
    assert not imported(data.stderr) & {"prefect", "mlflow", "dvc"}  # a plain stage: no orchestration, no tracking
    deps = set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["data"]["deps"])
    ran = {module_file(name).relative_to(ROOT).as_posix() for name in modules(data.stderr) if module_file(name)}
    # (the stage's function, its context and the entry points' modules, such as the schema's sections in
    # flows/settings.py, come through importlib.import_module, which -X importtime does not log)
    assert "dna/data.py" in ran and "flows/settings.py" in deps and not ran & {"dna/run.py", "dna/spaces/__init__.py"}
    unlisted = {"dna/cli.py", "dna/checks.py", "dna/command_gc.py"}  # the command, its checks, its collector
    assert ran - unlisted <= deps, sorted(ran - deps)

    write_params(tmp_path / "params.yaml", tiny_raw() | {"search": {"targets": {"default": {"macs": 1000}},
                                                                     "front_axis": "macs"}})
    teacher = run_stage("teacher", tmp_path)  # a budget below the smallest network: checked, exit 2
    assert teacher.returncode == 2 and "search.targets.default.macs" in teacher.stderr
    assert "timm" in imported(teacher.stderr)
    assert not (tmp_path / "outputs" / "teacher").exists()


def test_a_config_checked_first_is_taken_over_once_by_the_flow(tmp_path):
    write_params(tmp_path / "params.yaml", tiny_raw())
    with working_directory(tmp_path):
        check_first("data", "params.yaml", {"seed": 3})
        first = load("params.yaml", {"seed": 3}, checks=Checks.of("data"))
        again = load("params.yaml", {"seed": 3}, checks=Checks.of("data"))
    assert first.seed == again.seed == 3
    assert first is not again and not _checked  # taken over once; later loads check again


@pytest.mark.parametrize("step", ["data", "register"])
def test_a_light_step_still_rejects_a_wrong_key_anywhere_in_the_file(tmp_path, step):
    from dna.errors import ConfigError

    raw = tiny_raw()
    raw["space"]["blocks"][0]["widths"] = ["wide"]
    write_params(tmp_path / "params.yaml", raw)
    with working_directory(tmp_path), pytest.raises(ConfigError, match="space.blocks.0.widths"):
        load("params.yaml", checks=Checks.of(step))
