"""Each DVC stage's code dependencies are exactly the project modules its `dna` commands run (flows/code_deps.py):
a change to a file reruns every stage it can affect and no other. (tests/pipeline/test_flows_entry.py checks them
against what a stage's process really imports.)"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.code_deps import code_deps, import_closure, listed_code

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_the_import_closure_follows_lazy_and_from_imports_packages_and_schema_sections():
    closure = import_closure("flows.step_flow")
    # flows/__init__.py configures the environment (flows.env) and composes the schema (flows.settings);
    # `from dna.stages import ...` sits inside the flow function; `from flows import artifacts` names a module
    assert {"flows/__init__.py", "flows/env.py", "flows/step_flow.py", "flows/artifacts.py", "dna/__init__.py",
            "dna/stages/__init__.py", "dna/run.py", "dna/config.py", "flows/settings.py"} <= closure
    assert "flows/pipeline.py" not in closure and "dna/cli.py" not in closure and "dna/pipeline.py" not in closure


def test_a_stage_that_runs_every_default_stage_depends_on_their_modules_and_the_others_only_on_their_own():
    teacher, rounds = set(code_deps(commands(STAGES["teacher"]))), set(code_deps(["dna rounds"]))
    assert "dna/stages/teacher.py" in teacher and "dna/stages/retrain.py" not in teacher
    assert {"dna/stages/teacher.py", "dna/stages/retrain.py", "dna/stages/export.py", "dna/rounds.py"} <= rounds
    with pytest.raises(ValueError, match="'dna nothing': not a `dna` stage command"):
        code_deps(["dna nothing"])


def commands(stage: dict) -> list[str]:
    """A stage's commands (of a `foreach` stage, those of its `do`, one per search target)."""
    cmd = stage.get("do", stage)["cmd"]
    return [cmd] if isinstance(cmd, str) else cmd


@pytest.mark.parametrize("name", list(STAGES))
def test_a_stage_depends_on_exactly_the_project_modules_its_commands_run(name):
    stage = STAGES[name]
    needed, listed = set(code_deps(commands(stage))), set(listed_code(stage))
    missing, extra = sorted(needed - listed), sorted(listed - needed)
    assert not missing and not extra, (f"stage {name}: missing from deps {missing}; listed but not imported {extra} "
                                       "(python -m flows.dvc_files --write)")


def test_the_dvc_files_are_what_the_stage_table_makes():
    """dvc.yaml, rank/dvc.yaml and rounds/dvc.yaml are made from the stage table, code deps included; a stale file
    is named by the check and rewritten by --write."""
    from flows.dvc_files import files, main

    made = files()
    assert sorted(made) == ["dvc.yaml", "rank/dvc.yaml", "rounds/dvc.yaml"]
    for name, text in made.items():
        assert (ROOT / name).read_text() == text, f"{name}: python -m flows.dvc_files --write"
    assert main([]) == 0


def test_how_pictures_look_reruns_no_stage_that_trains():
    """dna/plots.py (the figures stage's pictures) is in the figures stage's code deps alone: a round after the first
    leaves the figures out (dna.stages.later_round_stages), and the rank stage draws its own (dna/rank_plot.py)."""
    from dna.stages import STAGES as TABLE
    from dna.stages import default_stages, later_round_stages

    deps = {name: set(code_deps(commands(stage))) for name, stage in
            {**STAGES, **{f"{d}/{n}": s for d in ("rank", "rounds")
                          for n, s in yaml.safe_load((ROOT / d / "dvc.yaml").read_text())["stages"].items()}}.items()}
    assert [name for name, files in deps.items() if "dna/plots.py" in files] == ["figures"]
    assert "dna/rank_plot.py" in deps["rank/rank"] and "dna/stages/teacher.py" in deps["rounds/rounds"]
    assert [s.name for s in later_round_stages()] == [s.name for s in default_stages() if s.name != "figures"]
    assert [s.name for s in TABLE if s.pictures] == ["figures"]
