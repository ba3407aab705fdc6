"""Each DVC stage's code dependencies are exactly the project modules its entry point imports (flows/code_deps.py):
a change to a file reruns every stage it can affect and no other."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.code_deps import code_deps, import_closure, listed_code, rewrite

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_the_import_closure_follows_lazy_and_from_imports_packages_and_schema_sections():
    closure = import_closure("flows.search")
    # flows/__init__.py configures the environment (flows.env); `from dna.pipeline import ...` sits inside the
    # flow function; `from flows import artifacts` names a module; dna.config loads flows.settings by entry point
    assert {"flows/__init__.py", "flows/env.py", "flows/search.py", "flows/artifacts.py", "dna/__init__.py",
            "dna/pipeline.py", "dna/config.py", "flows/settings.py"} <= closure
    assert "flows/pipeline.py" not in closure and "dna/cli.py" not in closure


@pytest.mark.parametrize("name", [name for name, stage in STAGES.items() if code_deps(stage["cmd"]) is not None])
def test_a_stage_depends_on_exactly_the_project_modules_its_entry_point_imports(name):
    stage = STAGES[name]
    needed, listed = set(code_deps(stage["cmd"])), set(listed_code(stage))
    missing, extra = sorted(needed - listed), sorted(listed - needed)
    assert not missing and not extra, (f"stage {name}: missing from deps {missing}; listed but not imported {extra} "
                                       "(python -m flows.code_deps --write)")


def test_rewriting_keeps_everything_but_the_code_deps():
    text = (ROOT / "dvc.yaml").read_text()
    stale = text.replace("      - dna/config.py\n", "", 1).replace("    deps:\n", "    deps:\n      - dna/gone.py\n", 1)
    assert stale != text
    assert rewrite(stale, STAGES) == rewrite(text, STAGES)
    assert rewrite(text, STAGES) == text, "dvc.yaml's code deps are as the import graph says"
    fixed = yaml.safe_load(rewrite(stale, STAGES))["stages"]
    assert all(set(listed_code(s)) == set(code_deps(s["cmd"]) or listed_code(s)) for s in fixed.values())
