"""dvc.yaml, rank/dvc.yaml and rounds/dvc.yaml, made from the stage table (dna.stages, grouped into pipeline steps by
flows/steps.py): each step's command, its code deps (every project module its entry point imports: flows/code_deps.py),
what it reads of earlier steps, the params it declares, its outputs (checkpoints persist, reports are not cached) and
its metrics; plus DVC's plots (each stage's `plots`), and the stage table of docs/stages.md. Nothing in these is
written by hand: a new stage is one table entry.

    python -m flows.dvc_files           # check: exit 1 naming every file that differs from what the table makes
    python -m flows.dvc_files --write   # write them
    python -m flows.dvc_files --reruns  # for each dna/ module, the stages a change to it reruns (a markdown table)
"""
from __future__ import annotations

import flows.app  # noqa: F401 - first: the environment before Prefect and MLflow read it, and the schema

# isort: split

import argparse
import textwrap
from pathlib import Path

from dna.stages import Plot
from flows.code_deps import code_deps
from flows.steps import OPTIONAL_STEPS, STEPS, Step

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_HEADER = """\
# The DNA pipeline, made from the stage table by `python -m flows.dvc_files --write` (do not edit by hand; a test
# checks it): one stage per pipeline step (dna.stages, grouped into steps by flows/steps.py), each its plain `dna`
# commands, run with `dvc repro` or `dvc exp run -S key=value`. The Prefect pipeline flow (`python -m flows.pipeline`,
# `make run`) runs the same steps as tasks in one process and records each in dvc.lock, so after either the other
# finds everything up to date.
#
# A stage reruns only when its code, the params.yaml keys it reads (`params`) or an upstream output changed. Device,
# MLflow and orchestration settings are deliberately not listed: they change where a stage runs or logs, not what it
# computes. A stage's code deps are the modules its commands run (its functions, the config checks, the schema's
# sections), directly or through other project modules (imports inside functions too), with the packages'
# __init__.py.
# Checkpoints that resuming needs are `persist: true`, so DVC does not delete them before a stage reruns; the
# training code then skips or resumes work whose fingerprint (config, teacher, data) matches. Reports (histories,
# tables, pictures) are `cache: false`. Metrics files are cached: the outputs folder is not in git, so `dvc exp show`
# reads a queued experiment's metrics through its dvc.lock from the cache. The teacher's training state
# (teacher/train_state.pt) is no output: a teacher taken as it is (pretrained, or a DNA+ round's) has none; DVC never
# deletes it, so a teacher trained here resumes too.
# Paths follow `outputs` in params.yaml.
"""

OPTIONAL_HEADER = """\
# The {name} stage, kept out of the default pipeline (`dvc repro` reproduces ../dvc.yaml only), made from the stage
# table by `python -m flows.dvc_files --write`:
#   dvc repro dvc.yaml {name}/dvc.yaml   # the default stages, then {name}
{help}
# It runs from the project root (wdir), so its paths, params and code deps read as in ../dvc.yaml.
"""
TEMPLATES = {"line": "linear", "scatter": "scatter"}  # dna.stages.Plot.kind -> DVC's template


def comment(text: str, indent: str = "") -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(text, 116 - len(indent))]


def plot_lines(plot: Plot, prefix: str) -> list[str]:
    """A stage's plot in DVC's top-level plots, its files under `prefix` (the outputs, seen from the DVC file)."""
    files = [f"{prefix}/{f}" for f in plot.files]
    lines = comment(plot.note, "  ") if plot.note else []
    if plot.x is None:
        return lines + [f"  - {f}" for f in files]
    if plot.name is None:  # one file or folder: its path names the plot
        (path,), (column,) = files, plot.y
        return lines + [f"  - {path}:", f"      template: {TEMPLATES[plot.kind]}", f"      x: {plot.x}",
                        f"      y: {column}"]
    columns = plot.y[0] if len(plot.y) == 1 else f"[{', '.join(plot.y)}]"
    lines += [f"  - {plot.name}:", f"      template: {TEMPLATES[plot.kind]}", f"      x: {plot.x}", "      y:",
              *(f"        {f}: {columns}" for f in files)]
    return lines + ([f"      y_label: {plot.y_label}"] if plot.y_label else [])


def plots_text(steps: list[Step], prefix: str) -> str:
    lines = [line for step in steps for plot in step.plots for line in plot_lines(plot, prefix)]
    head = "plots:" + ("  # paths from this folder (a stage's wdir does not apply to plots)" if prefix != "${outputs}"
                       else "")
    return "\n".join([head, *lines]) + "\n" if lines else ""


def stage_lines(step: Step, wdir: str | None = None) -> list[str]:
    """A step's stage in dvc.yaml; a per-target step's as a `foreach` over search.targets, one stage per target
    (`<step>@<target>`), its paths that target's."""
    lines = [f"  {step.name}:"]
    if len(step.helps) > 1:  # what each of its stages does, in order
        first, *rest = (h.rstrip(".") for h in step.helps)
        lines += comment("; then ".join([first, *(h[0].lower() + h[1:] for h in rest)]) + ".", "    ")
    if step.per_target:
        lines += ["    foreach: ${search.targets}", "    do:"]
    pad = "  " if step.per_target else ""

    def path(rel: str) -> str:
        return f"${{outputs}}/{rel}".replace("{target}", "${key}")

    if wdir:
        lines.append(f"    wdir: {wdir}")
    commands = [f"{c} --target ${{key}}" if step.per_target else c for c in step.commands]
    cmd = [f"    cmd: {commands[0]}"] if len(commands) == 1 else ["    cmd:", *(f"      - {c}" for c in commands)]
    body = [*cmd, "    deps:", *(f"      - {dep}" for dep in code_deps(step.commands))]
    body += [f"      - {path(rel)}" for rel in step.inputs]
    if step.params:
        body += ["    params:", *(f"      - {key}" for key in step.params)]
    if step.outputs:
        body.append("    outs:")
        for rel in step.outputs:
            option = "persist: true" if rel in step.checkpoints else "cache: false" if rel in step.reports else None
            body.append(f"      - {path(rel)}" + (f":\n          {pad}{option}" if option else ""))
    if step.metrics:
        body += ["    metrics:", f"      - {path(step.metrics)}"]
    return lines + [pad + line for line in body]


def default_file(steps: list[Step] = STEPS) -> str:
    body = "\n\n".join("\n".join(stage_lines(step)) for step in steps)
    return f"{DEFAULT_HEADER}\nstages:\n{body}\n\n{plots_text(steps, '${outputs}')}"


def optional_file(step: Step) -> str:
    header = OPTIONAL_HEADER.format(name=step.name, help="\n".join(comment(" ".join(step.helps))))
    text = (f"{header}vars:\n  - ../params.yaml:outputs\n\nstages:\n"
            + "\n".join(stage_lines(step, wdir="..")) + "\n")
    plots = plots_text([step], "../${outputs}")
    return text + (f"\n{plots}" if plots else "")


def stage_table(dvc_files: dict[str, str]) -> str:
    """The stage table as markdown, in run order: each stage's command, what it does and what it writes."""
    from dna.stages import STAGES

    def written(stage) -> str:
        return ", ".join(f"`{f.replace('{target}', '<T>')}`" for f in stage.files())

    rows = [f"| {s.name}{'' if s.default else ' (only when asked)'} | `dna {s.name}"
            f"{' [--block N]' if s.per_block else ''}{' [--target T]' if s.per_target else ''}` | {s.help} | "
            f"{written(s)} |" for s in STAGES]
    return "\n".join(["| stage | command | what it does | what it writes (under `outputs/`) |", "|---|---|---|---|",
                       *rows])


def reruns(made: dict[str, str] | None = None) -> str:
    """For each dna/ module, the stages whose code deps hold it (what editing it reruns), grouped, as markdown."""
    import yaml

    deps = {name: set(stage.get("do", stage)["deps"]) for path, text in (made or files()).items()
            if path.endswith("dvc.yaml")
            for name, stage in yaml.safe_load(text)["stages"].items()}  # of a per-target stage, those of its `do`
    modules = sorted({d for ds in deps.values() for d in ds if d.startswith("dna/")})
    groups: dict[str, list[str]] = {}
    for module in modules:
        hit = [name for name in deps if module in deps[name]]
        groups.setdefault("every stage" if len(hit) == len(deps) else ", ".join(hit), []).append(module)
    rows = [f"| {stages} | {len(mods)} | {' '.join(f'`{m}`' for m in mods)} |" for stages, mods in groups.items()]
    return "\n".join(["| a change reruns | modules | which |", "|---|---|---|", *rows])


# the tables of the docs made from the stage table: (file, table) -> how, from the DVC files
DOC_TABLES = {("docs/stages.md", "the stage table"): stage_table,
              ("docs/pipeline.md", "what a change to each module reruns"): reruns}


def made_docs(dvc_files: dict[str, str]) -> dict[str, str]:
    """The docs that hold a made table, each with its tables made again (those of the docs this project has)."""
    out: dict[str, str] = {}
    for (name, table), make in DOC_TABLES.items():
        if not (ROOT / name).is_file():
            continue
        text = out.get(name) or (ROOT / name).read_text()
        start, end = f"<!-- made by python -m flows.dvc_files --write: {table} -->", f"<!-- end of {table} -->"
        head, end_at = text.index(start) + len(start), text.index(end)
        out[name] = f"{text[:head]}\n{make(dvc_files)}\n{text[end_at:]}"
    return out


def files(steps: list[Step] = STEPS, optional: list[Step] = OPTIONAL_STEPS) -> dict[str, str]:
    """Every file the table makes: path (from the project root) -> text: the DVC files, and the docs' tables made
    from them (made_docs)."""
    dvc_files = {"dvc.yaml": default_file(steps), **{f"{step.name}/dvc.yaml": optional_file(step) for step in optional}}
    return dvc_files | made_docs(dvc_files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="write the DVC files the stage table makes")
    parser.add_argument("--reruns", action="store_true", help="print which stages a change to each dna/ module reruns")
    args = parser.parse_args(argv)
    if args.reruns:
        print(reruns())
        return 0
    stale = []
    for name, text in files().items():
        path = ROOT / name
        if path.is_file() and path.read_text() == text:
            continue
        if args.write:
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
        stale.append(name)
    for name in stale:
        print(f"{name}: {'written' if args.write else 'differs from the stage table (--write)'}")
    return 1 if stale and not args.write else 0


if __name__ == "__main__":
    raise SystemExit(main())
