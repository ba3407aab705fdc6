"""The rank stage sits outside the default pipeline: its own rank/dvc.yaml (from the stage table's optional steps),
not in dvc.yaml, `dvc repro` or `dna run`, yet reproducible by `dvc repro rank/dvc.yaml`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from pipeline_support import ROOT

from flows.code_deps import code_deps, listed_code
from flows.steps import OPTIONAL_STEPS, STAGES

RANK = yaml.safe_load((ROOT / "rank" / "dvc.yaml").read_text())


def _paths(entries: list) -> set[str]:
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries}


def test_rank_dvc_yaml_is_the_optional_step_of_the_stage_table():
    assert list(RANK["stages"]) == ["rank"]
    step, stage = next(s for s in OPTIONAL_STEPS if s.name == "rank"), RANK["stages"]["rank"]
    assert stage["wdir"] == ".." and stage["cmd"] == "dna rank"
    assert stage["params"] == list(step.params)
    assert _paths(stage["outs"]) == {f"${{outputs}}/{o}" for o in step.outputs}
    assert _paths(stage["metrics"]) == {f"${{outputs}}/{step.metrics}"}
    assert set(listed_code(stage)) == set(code_deps([stage["cmd"]])), "python -m flows.dvc_files --write"


def test_the_default_pipeline_leaves_rank_out():
    from dna.cli import run_all

    default = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert "rank" not in default and "rank" not in STAGES
    assert "rank" not in run_all.__doc__ and "export" in run_all.__doc__
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dvc = str(Path(sys.executable).with_name("dvc"))
    listed = subprocess.run([dvc, "stage", "list", "--name-only"], cwd=ROOT, env=env, check=True,
                            capture_output=True, text=True).stdout.split()
    everything = subprocess.run([dvc, "stage", "list", "--all", "--name-only"], cwd=ROOT, env=env, check=True,
                                capture_output=True, text=True).stdout.split()
    assert "rank" not in " ".join(listed) and listed[0] == "data"
    assert "rank/dvc.yaml:rank" in everything
