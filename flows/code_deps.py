"""The code each DVC stage depends on: every project module its entry point imports, directly or through other
project modules (imports inside functions too), with the packages' __init__.py (flows/__init__.py composes the
schema with flows/settings.py). A change to a file then reruns every stage it can affect and no other.

    python -m flows.code_deps           # what each stage of dvc.yaml misses or lists in vain (exit 1 if anything)
    python -m flows.code_deps --write   # rewrite the code deps of every stage in dvc.yaml, rank/ and rounds/dvc.yaml
"""
from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dna", "flows")
ENTRY = re.compile(r"python -m (flows(?:\.\w+)+)")
DVC_FILES = ("dvc.yaml", "rank/dvc.yaml", "rounds/dvc.yaml")  # the default pipeline; stages kept out of it


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
    if match is None:
        return None
    entry = module_file(match.group(1)).relative_to(ROOT).as_posix()
    return [entry, *sorted(import_closure(match.group(1)) - {entry})]


def listed_code(stage: dict) -> list[str]:
    return [dep for dep in stage.get("deps", []) if isinstance(dep, str) and dep.endswith(".py")]


def rewrite(text: str, stages: dict) -> str:
    """dvc.yaml with each stage's .py deps replaced by its code deps, everything else (comments too) kept."""
    out, stage, in_deps = [], None, False
    for line in text.splitlines():
        if re.fullmatch(r"  (\w+):", line):
            stage, in_deps = line.strip()[:-1], False
        if in_deps and re.fullmatch(r"      - \S+\.py", line):
            continue
        if in_deps and not line.startswith("      "):
            in_deps = False
        out.append(line)
        if line == "    deps:" and stage in stages and (deps := code_deps(stages[stage]["cmd"])):
            in_deps = True
            out.extend(f"      - {dep}" for dep in deps)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps")
    args = parser.parse_args(argv)
    if args.write:
        for path in (ROOT / f for f in DVC_FILES):
            path.write_text(rewrite(path.read_text(), yaml.safe_load(path.read_text())["stages"]))
        return 0
    wrong = 0
    stages = {name: stage for f in DVC_FILES
              for name, stage in yaml.safe_load((ROOT / f).read_text())["stages"].items()}
    for name, stage in stages.items():
        needed = code_deps(stage["cmd"])
        if needed is not None and set(needed) != set(listed_code(stage)):
            wrong += 1
            print(f"{name}: missing {sorted(set(needed) - set(listed_code(stage)))}, "
                  f"not imported {sorted(set(listed_code(stage)) - set(needed))}")
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
