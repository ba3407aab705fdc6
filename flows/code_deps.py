"""The code each DVC stage depends on: the `dna` command's own module, and every project module that can change what
its commands write, directly or through other project modules (imports inside functions too), with the packages'
__init__.py: a stage's functions and the class of run they get (dna.stages, dna.context), the table and the logging,
and the schema with the sections that other packages add (the `dna.sections` entry points); or a command another
package adds (`dna.commands`). A change to a file then reruns every stage it can affect and no other.
flows/dvc_files.py writes them into the DVC files it makes from the table.

Left out, because they decide whether a stage runs but never what it writes: the config's checks (CHECKS), and the
imports inside the schema's functions (SCHEMA: those of its validators, tests/test_dvc_deps.py holds them to that);
and the garbage collector's settings of a command's process (PROCESS), which change how fast, not what.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dna", "flows")
COMMAND = "dna/cli.py"  # the `dna` command: it only dispatches, its imports are the stage's
CHECKS = ("dna.checks",)  # the config's checks: neither listed nor followed
PROCESS = ("dna.command_gc",)  # neither listed nor followed either
COMMON = ("dna.logs", "dna.stages")  # what every stage command runs besides its stage: the logging, the table
SCHEMA = ("dna.config",)  # listed, with what it imports at module level; the imports in its functions are checks


def module_file(name: str) -> Path | None:
    """The file of a project module (a.b -> a/b.py or a/b/__init__.py), or None for anything else."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_names(path: Path, module: str, nested: bool = True) -> set[str]:
    """Every module name an import statement anywhere in the file may load (outside `if TYPE_CHECKING:`; with
    nested=False, outside functions too), `from a import b` giving both a and a.b (b may be a submodule); relative
    imports resolved against the module's package."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = {id(node) for block in ast.walk(tree) if _type_checking(block) or (not nested and _function(block))
               for node in ast.walk(block)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
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


def _type_checking(node: ast.AST) -> bool:
    """An `if TYPE_CHECKING:` block: its imports are read by type checkers, never run."""
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _function(node: ast.AST) -> bool:
    return isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))


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
            if path is None or candidate in seen or candidate in CHECKS + PROCESS:
                continue
            seen.add(candidate)
            pending.extend(imported_names(path, candidate, nested=candidate not in SCHEMA))
    return {module_file(name).relative_to(ROOT).as_posix() for name in seen}


def command_modules(command: str) -> list[str]:
    """The modules `dna <name>` runs that can change what it writes: a stage's function (and preparation) with the
    class of run it gets, the table, the logging and the schema's sections; or the module of a command another
    package adds; ValueError for any other command."""
    from importlib.metadata import entry_points

    from dna.stages import STAGES, later_round_stages

    program, name, *_ = [*command.split(), ""]  # `dna <name> [options]`
    stage = STAGES.get(name) if name in STAGES else None
    if program == "dna" and stage is not None:
        ran = (stage, *(later_round_stages(STAGES) if stage.runs_default_stages else ()))
        functions = [spec.partition(":")[0] for s in ran for spec in (s.function, s.prepare, s.context) if spec]
        sections = [entry.module for entry in entry_points(group="dna.sections")]
        return [*dict.fromkeys(functions), *COMMON, "dna.config", *sections]
    added = {entry.name: entry.module for entry in entry_points(group="dna.commands")}
    if program == "dna" and name in added:
        return [added[name]]
    raise ValueError(f"{command!r}: not a `dna` stage command nor a command of the dna.commands entry points")


def code_deps(commands: tuple[str, ...] | list[str]) -> list[str]:
    """The code deps of a stage's commands: the `dna` command's module first, then the rest sorted."""
    files = set().union(*(import_closure(m) for command in commands for m in command_modules(command)))
    return [COMMAND, *sorted(files - {COMMAND})]


def listed_code(stage: dict) -> list[str]:
    """The code deps a stage of dvc.yaml lists (of a `foreach` stage, those of its `do`)."""
    return [dep for dep in stage.get("do", stage).get("deps", []) if isinstance(dep, str) and dep.endswith(".py")]
