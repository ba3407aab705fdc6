"""Each DVC stage's code dependencies are exactly the project modules its entry point imports, directly or through
other project modules (imports inside functions too), with the packages' __init__.py: a change to a file reruns
every stage it can affect and no other."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dna", "flows")
ENTRY = re.compile(r"python -m (flows(?:\.\w+)+)")
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    """The file of a project module (a.b -> a/b.py or a/b/__init__.py), or None for anything else."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_names(path: Path, module: str) -> set[str]:
    """Every module name an import statement anywhere in the file may load, `from a import b` giving both a and
    a.b (b may be a submodule); relative imports resolved against the module's package."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def with_parents(name: str) -> list[str]:
    """a.b.c -> a, a.b, a.b.c: importing a module runs its packages' __init__ first."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def import_closure(entry: str) -> set[str]:
    """The files of every project module that running `python -m entry` imports (repo-relative paths)."""
    seen: set[str] = set()
    pending = [entry]
    while pending:
        name = pending.pop()
        for candidate in with_parents(name):
            path = module_file(candidate)
            if path is None or candidate in seen:
                continue
            seen.add(candidate)
            pending.extend(imported_names(path, candidate))
    return {module_file(name).relative_to(ROOT).as_posix() for name in seen}


def listed_code(stage: dict) -> set[str]:
    return {dep for dep in stage.get("deps", []) if isinstance(dep, str) and dep.endswith(".py")}


def test_the_import_closure_follows_lazy_and_from_imports_and_packages():
    closure = import_closure("flows.search")
    # flows/__init__.py configures the environment (flows.env); `from dna.pipeline import ...` sits inside the
    # flow function; `from flows import artifacts` names a module
    assert {"flows/__init__.py", "flows/env.py", "flows/search.py", "flows/artifacts.py", "dna/__init__.py",
            "dna/pipeline.py", "dna/config.py"} <= closure
    assert "flows/pipeline.py" not in closure and "dna/cli.py" not in closure


@pytest.mark.parametrize("name", [name for name, stage in STAGES.items() if ENTRY.fullmatch(stage["cmd"])])
def test_a_stage_depends_on_exactly_the_project_modules_its_entry_point_imports(name):
    stage = STAGES[name]
    needed = import_closure(ENTRY.fullmatch(stage["cmd"]).group(1))
    listed = listed_code(stage)
    missing, extra = sorted(needed - listed), sorted(listed - needed)
    assert not missing and not extra, f"stage {name}: missing from deps {missing}; listed but not imported {extra}"
