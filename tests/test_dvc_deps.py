"""Each DVC stage's code dependencies are exactly the project modules its entry point imports (flows/code_deps.py):
a change to a file reruns every stage it can affect and no other."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.code_deps import code_deps, import_closure, listed_code

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_the_import_closure_follows_lazy_and_from_imports_packages_and_schema_sections():
    closure = import_closure("flows.search")
    # flows/__init__.py configures the environment (flows.env) and composes the schema (flows.settings);
    # `from dna.pipeline import ...` sits inside the flow function; `from flows import artifacts` names a module
    assert {"flows/__init__.py", "flows/env.py", "flows/search.py", "flows/artifacts.py", "dna/__init__.py",
            "dna/stages/search.py", "dna/run.py", "dna/config.py", "flows/settings.py"} <= closure
    assert "flows/pipeline.py" not in closure and "dna/cli.py" not in closure and "dna/pipeline.py" not in closure


@pytest.mark.parametrize("name", [name for name, stage in STAGES.items() if code_deps(stage["cmd"]) is not None])
def test_a_stage_depends_on_exactly_the_project_modules_its_entry_point_imports(name):
    stage = STAGES[name]
    needed, listed = set(code_deps(stage["cmd"])), set(listed_code(stage))
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
