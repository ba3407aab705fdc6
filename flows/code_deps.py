"""The code each DVC stage depends on: every project module its entry point imports, directly or through other
project modules (imports inside functions too), with the packages' __init__.py (flows/__init__.py composes the
schema with flows/settings.py). A change to a file then reruns every stage it can affect and no other.
flows/dvc_files.py writes them into the DVC files it makes from the stage table.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dna", "flows")
ENTRY = re.compile(r"python -m (flows(?:\.\w+)+)")


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


def code_deps(cmd: str) -> list[str] | None:
    """The code deps of a stage command (its entry module first, then sorted), or None for another command."""
    match = ENTRY.fullmatch(cmd)
    if match is None or module_file(match.group(1)) is None:
        return None
    entry = module_file(match.group(1)).relative_to(ROOT).as_posix()
    return [entry, *sorted(import_closure(match.group(1)) - {entry})]


def listed_code(stage: dict) -> list[str]:
    return [dep for dep in stage.get("deps", []) if isinstance(dep, str) and dep.endswith(".py")]
