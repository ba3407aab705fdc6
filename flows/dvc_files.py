"""dvc.yaml, rank/dvc.yaml and rounds/dvc.yaml, made from the stage table (dna.stages, grouped into pipeline steps by
flows/steps.py): each step's command, its code deps (every project module its entry point imports: flows/code_deps.py),
what it reads of earlier steps, the params it declares, its outputs (checkpoints persist, reports are not cached) and
its metrics; plus DVC's plots. Nothing in these files is written by hand: a new stage is one table entry.

    python -m flows.dvc_files           # check: exit 1 naming every file that differs from what the table makes
    python -m flows.dvc_files --write   # write them
    python -m flows.dvc_files --reruns  # for each dna/ module, the stages a change to it reruns (a markdown table)
"""
from __future__ import annotations

import flows.app  # noqa: F401 - first: the environment before Prefect and MLflow read it, and the schema

# isort: split

import argparse
from pathlib import Path

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

OPTIONAL_HEADERS = {
    "rank": """\
# The rank stage, kept out of the default pipeline (`dvc repro` reproduces ../dvc.yaml only), made from the stage
# table by `python -m flows.dvc_files --write`:
#   dvc repro rank/dvc.yaml     # reproduces the default stages it needs first, then rank
# It trains rank.networks sampled networks, the searched one and rank.random_networks random ones from scratch,
# the single-path one-shot supernet, and every block again from another seed, so it costs far more than the rest of
# the pipeline (dna/rank.py). It runs from the project root (wdir), so its paths, params and code deps read as in
# ../dvc.yaml.
""",
    "rounds": """\
# The rounds stage of DNA+ (rounds.count > 1), kept out of the default pipeline (`dvc repro` reproduces ../dvc.yaml,
# which is round 1), made from the stage table by `python -m flows.dvc_files --write`:
#   dvc repro dvc.yaml rounds/dvc.yaml   # the default stages (round 1), then rounds 2 to count
# Each later round runs every default stage with the network the round before found and retrained as its teacher
# (`dna rounds`, dna/rounds.py); the pipeline flow (flows/rounds.py) registers every round's network too. The
# rounds' outputs persist, so a round stopped half-way resumes inside its stages; DVC versions them as one folder.
# It runs from the project root (wdir), so its paths, params and code deps read as in ../dvc.yaml.
""",
}

NOTES = {"distill": "the teacher-feature cache once, then every block's training, then every block's rating"}

DEFAULT_PLOTS = """\
plots:
  - teacher-training:
      template: linear
      x: epoch
      y:
        ${outputs}/teacher/history.csv: [loss, rate_accuracy]
  # one plot per block: mean distillation loss of its cells per epoch
  - ${outputs}/distill/curves:
      template: linear
      x: epoch
      y: loss
  # the Pareto front (rating against cost) and every target's network on it
  - pareto-front:
      template: scatter
      x: ${search.front_axis}
      y:
        ${outputs}/search/front.csv: score
        ${outputs}/search/chosen.csv: score
      y_label: rating (lower is better)
  # one plot per block: every candidate's rating against its cost (the spread of each block's ratings)
  - ${outputs}/ratings:
      template: scatter
      x: macs
      y: score
  - ${outputs}/search/front.png
  - ${outputs}/search/rating_spread.png
  - ${outputs}/search/curves.png  # every target's retraining
"""

OPTIONAL_PLOTS = {"rank": """\
plots:  # paths from this folder (a stage's wdir does not apply to plots)
  # rating against test accuracy of every trained network
  - rank-rating:
      template: scatter
      x: rating
      y:
        ../${outputs}/rank/networks.csv: test_accuracy
      y_label: test accuracy, trained from scratch
  # the rating's own noise: each network's rating against its rating by blocks distilled again from another seed
  - rank-rating-noise:
      template: scatter
      x: rating
      y:
        ../${outputs}/rank/networks.csv: rating_replicate_1
      y_label: rating, blocks distilled again from another seed (rank.rating_seeds)
  - ../${outputs}/rank/rank.png
"""}


def stage_lines(step: Step, wdir: str | None = None) -> list[str]:
    """A step's stage in dvc.yaml; a per-target step's as a `foreach` over search.targets, one stage per target
    (`<step>@<target>`), its paths that target's."""
    lines = [f"  {step.name}:"]
    if step.name in NOTES:
        lines.append(f"    # {NOTES[step.name]}")
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
    return f"{DEFAULT_HEADER}\nstages:\n{body}\n\n{DEFAULT_PLOTS}"


def optional_file(step: Step) -> str:
    text = (f"{OPTIONAL_HEADERS.get(step.name, '')}vars:\n  - ../params.yaml:outputs\n\nstages:\n"
            + "\n".join(stage_lines(step, wdir="..")) + "\n")
    return text + (f"\n{OPTIONAL_PLOTS[step.name]}" if step.name in OPTIONAL_PLOTS else "")


def files(steps: list[Step] = STEPS, optional: list[Step] = OPTIONAL_STEPS) -> dict[str, str]:
    """Every DVC file the table makes: path (from the project root) -> text."""
    return {"dvc.yaml": default_file(steps), **{f"{step.name}/dvc.yaml": optional_file(step) for step in optional}}


def reruns(made: dict[str, str] | None = None) -> str:
    """For each dna/ module, the stages whose code deps hold it (what editing it reruns), grouped, as markdown."""
    import yaml

    deps = {name: set(stage.get("do", stage)["deps"]) for text in (made or files()).values()
            for name, stage in yaml.safe_load(text)["stages"].items()}  # of a per-target stage, those of its `do`
    modules = sorted({d for ds in deps.values() for d in ds if d.startswith("dna/")})
    groups: dict[str, list[str]] = {}
    for module in modules:
        hit = [name for name in deps if module in deps[name]]
        groups.setdefault("every stage" if len(hit) == len(deps) else ", ".join(hit), []).append(module)
    rows = [f"| {stages} | {len(mods)} | {' '.join(f'`{m}`' for m in mods)} |" for stages, mods in groups.items()]
    return "\n".join(["| a change reruns | modules | which |", "|---|---|---|", *rows])


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
