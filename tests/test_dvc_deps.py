"""Each DVC stage's code dependencies are exactly the project modules that can change what its `dna` commands write
(flows/code_deps.py): a change to a file reruns every stage it can affect and no other. A stage gets the narrowest
class of run that has what it reads (dna.context), so the data stage does not depend on the search space, nor the
teacher on the search. (tests/pipeline/test_flows_entry.py checks them against what a stage's process imports.)"""
from __future__ import annotations

import re
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
            "dna/stages/__init__.py", "dna/config.py", "flows/settings.py"} <= closure
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
    """dvc.yaml, rank/dvc.yaml and rounds/dvc.yaml are made from the stage table, code deps included, and so are the
    tables of docs/stages.md (the stages) and docs/pipeline.md (what editing each module reruns); a stale file is
    named by the check and rewritten by --write."""
    from dna.stages import STAGES as TABLE
    from flows.dvc_files import files, main

    made = files()
    assert sorted(made) == ["docs/pipeline.md", "docs/stages.md", "dvc.yaml", "rank/dvc.yaml", "rounds/dvc.yaml"]
    rows = [line.split(" | ")[0].removeprefix("| ").split(" ")[0] for line in made["docs/stages.md"].splitlines()
            if line.startswith("| ") and "`dna " in line]
    assert rows == [s.name for s in TABLE]  # one row per stage, in run order
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
    from flows.dvc_files import reruns

    assert [row.split(" | ")[0] for row in reruns().splitlines() if "`dna/plots.py`" in row] == ["| figures"]
    assert "dna/rank_plot.py" in deps["rank/rank"] and "dna/stages/teacher.py" in deps["rounds/rounds"]
    assert [s.name for s in later_round_stages()] == [s.name for s in default_stages() if s.name != "figures"]
    assert [s.name for s in TABLE if s.pictures] == ["figures"]


def test_a_stage_depends_on_the_run_it_gets_not_on_what_wider_runs_hold():
    """The data stage gets a dna.context.Context (params, paths, device, data): it depends on no search space, no
    supervision and no search; the stages that read the space but not the supervision depend on no block training;
    the teacher stage reads the teacher section alone (teacher.source: none when the supervision reads no teacher),
    so editing a search space, a supervision, the search or the export reruns no teacher; the checks (dna.checks)
    rerun nothing."""
    deps = {name: set(code_deps(commands(stage))) for name, stage in STAGES.items()}
    space = {"dna/spaces/__init__.py", "dna/spaces/mbconv.py", "dna/spaces/context.py"}
    supervision = {"dna/run.py", "dna/supervision.py", "dna/self_supervision.py", "dna/targets.py", "dna/distill.py",
                   "dna/stages/distill.py", "dna/stages/rate.py"}
    search = {"dna/search.py", "dna/cost_tables.py", "dna/latency.py", "dna/export.py", "dna/stages/search.py"}
    assert not deps["data"] & (space | supervision | search | {"dna/teacher.py", "dna/engine.py"})
    assert not deps["teacher"] & (space | supervision | search | {"dna/spaces/base.py", "dna/rate.py"})
    for name in ("profile", "search", "export", "figures"):
        assert space <= deps[name] and not deps[name] & supervision, name
    assert [name for name, files in deps.items() if "dna/checks.py" in files] == []


def test_a_stage_gets_the_run_its_table_entry_names_and_what_it_holds_beyond_is_an_attribute_error(tiny_params):
    """The stage's function sees only its context: reading the space in a stage of the plain context fails loudly,
    so a stage cannot depend on a module its code deps leave out."""
    from dna.context import Context
    from dna.run import Run
    from dna.stages import PLAIN, Stage, run_stage

    probe = Stage("probe", "", "builtins:type", (), (), context=PLAIN)  # the function returns the class it got
    assert run_stage(probe, Run(tiny_params)) == [Context]
    with pytest.raises(AttributeError, match="space"):
        Run(tiny_params).view(Context).space  # noqa: B018


def test_the_schema_imports_inside_its_functions_only_to_check():
    """dna/config.py's imports inside functions are its validators' (or of a helper only its validators call): no
    stage calls them to decide what it writes, so flows/code_deps.py leaves them out of every stage (SCHEMA). The one
    validator that fills a value, an arch teacher's default teacher.boundaries, computes it with dna/spaces/base.py,
    which every stage whose code reads the boundaries depends on. The one accessor, the space kind's options
    (`SpaceConfig.options`, and the fingerprint's dump of them), imports dna.spaces, which every stage whose code
    reads the options depends on."""
    import ast

    tree = ast.parse((ROOT / "dna" / "config.py").read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    validators = {f.name for f in functions if any("validator" in ast.unparse(d) for d in f.decorator_list)}
    importing = {f.name for f in functions if any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(f))}
    accessors = {"options"}  # a property, read as `.options`
    assert accessors <= importing
    callers = {name: {f.name for f in functions for n in ast.walk(f) if isinstance(n, ast.Call)
                      and ast.unparse(n.func).split(".")[-1] == name} for name in importing - validators - accessors}
    assert callers and all(found and found <= validators for found in callers.values()), callers
    for path in [*(ROOT / "dna").rglob("*.py"), *(ROOT / "flows").glob("*.py")]:
        if path.name != "config.py":
            called = {ast.unparse(n.func).split(".")[-1] for n in ast.walk(ast.parse(path.read_text()))
                      if isinstance(n, ast.Call)}
            assert not called & set(callers), f"{path} calls {called & set(callers)}: not only a check any more"
    stages = {**STAGES, **{n: s for d in ("rank", "rounds")
                           for n, s in yaml.safe_load((ROOT / d / "dvc.yaml").read_text())["stages"].items()}}
    for name, stage in stages.items():
        deps = code_deps(commands(stage))
        reading = [f for f in deps if f not in ("dna/config.py", "dna/stages/__init__.py")
                   and ".boundaries" in (ROOT / f).read_text()]
        assert not reading or "dna/spaces/base.py" in deps, (name, reading)
        options = [f for f in deps if f != "dna/config.py"
                   and re.search(r"(space|cfg)\.options\b", (ROOT / f).read_text())]
        assert not options or "dna/spaces/__init__.py" in deps, (name, options)
    assert "dna/spaces/base.py" in code_deps(["dna distill"])
