"""The flow of a step without work of its own in the pipeline (no `flows/<step>.py`): its stages run as tasks in
table order (a per-block stage once per block, after its preparation; a training stage, one that declares its
epochs, with one MLflow metric row and one Prefect progress update per epoch, in several processes under torchrun
with orchestration.nproc > 1) under the step's MLflow run, which logs the params the step reads, the numbers of its
metrics file, the architecture it reads or writes (tag dna.arch), and what people read as artifacts: its reports,
its metrics file and its small text outputs. Prefect shows its metrics, each table it wrote and each small YAML file.
A new stage so needs only its table entry and its function.

    python -m flows.step_flow STEP [--params FILE] [-S KEY=VALUE ...]
"""
from __future__ import annotations

import flows.app  # noqa: F401 - first: the environment before Prefect and MLflow read it, and the schema

# isort: split

import json
import sys
from pathlib import Path

from prefect import flow

from flows import artifacts
from flows.entry import StepRun, cli, step_run

ARCH = "search/targets/{target}/arch.yaml"  # a target's network: the tag of every step of that target
SHOWN_BYTES = 1 << 20  # outputs up to this size that people read (.csv, .json, .yaml) become artifacts
SHOWN_ROWS = 50


@flow(name="dna-step", flow_run_name="{step}")
def step_flow(step: str, params_file: str = "params.yaml", overrides: dict | None = None,
              target: str | None = None) -> dict:
    """One step of the pipeline; of a per-target step, for one search target (None: the first)."""
    from dna.arch import Arch
    from dna.stages import STAGES, run_stage
    from flows.steps import step_named

    spec = step_named(step)
    with step_run(step, params_file, overrides, target=target if spec.per_target else None) as s:
        root, spec = s.run.paths.root, spec.at(s.run.paths.target)
        for stage in (st for st in STAGES if st.pipeline_step == step):
            if stage.epochs:
                train(s, stage.at(s.run.paths.target))
            elif stage.per_target:
                s.task(run_stage, stage.name)(stage, s.run, targets=[s.run.paths.target])
            else:
                s.task(run_stage, stage.name)(stage, s.run)
        metrics_file = root / spec.metrics if spec.metrics else None
        metrics = json.loads(metrics_file.read_text()) if metrics_file and metrics_file.is_file() else {}
        s.mlrun.metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        if s.run.paths.arch.is_file() and ARCH.format(target=s.run.paths.target) in (*spec.inputs, *spec.outputs):
            s.mlrun.tags({"dna.arch": Arch.load(s.run.paths.arch).tag()})
        shown = shown_files(root, spec)
        for path in shown:
            s.mlrun.artifact(path)
    publish(step if target is None else f"{step}-{target}", root, shown, metrics)
    return metrics or {"written": [str(path) for path in shown]}


def train(s: StepRun, stage) -> None:
    """A training stage: one MLflow row and one progress update per epoch, the epochs it did not see (resumed,
    or trained in other processes) logged from its history afterwards."""
    from flows.steps import pick
    from flows.tracking import EpochLog

    epochs = pick(s.params, [stage.epochs])[stage.epochs]
    progress = artifacts.Progress(f"{stage.name}-training", epochs, f"{stage.name}: {stage.help} {epochs} epochs")
    log = EpochLog(s.mlrun, progress, describe_epoch)
    result = s.train(stage.name, stage.load(), stage.name, s.run.paths.root / stage.metrics, log)
    history = next((s.run.paths.root / r for r in stage.reports if r.endswith("history.csv")), None)
    if history is not None:
        log.backfill(history)
    progress.done(", ".join(f"{k} {v:.4f}" for k, v in result.items() if k.endswith("accuracy")
                            and isinstance(v, float)) or None)


def describe_epoch(row: dict) -> str:
    shown = [f"{k} {row[k]:.4f}" for k in row if k == "loss" or k.endswith("accuracy")]
    return ", ".join([f"epoch {int(row['epoch'])}", *shown])


def shown_files(root: Path, spec) -> list[Path]:
    """What people read of a step: its reports and metrics file, and its small .csv, .json, .yaml and .png
    outputs."""
    paths = [root / rel for rel in (*spec.reports, *([spec.metrics] if spec.metrics else []), *spec.outputs)]
    small = [p for p in paths if p.is_file() and (p.suffix in (".csv", ".json", ".yaml", ".png") and
                                                 p.stat().st_size <= SHOWN_BYTES)]
    return list(dict.fromkeys(small))


def publish(step: str, root: Path, shown: list[Path], metrics: dict) -> None:
    """Prefect artifacts of a step: its metrics, each table it wrote (its first rows) and each YAML file."""
    import pandas as pd
    import yaml

    if metrics:
        artifacts.markdown(f"{step}-summary", artifacts.metrics_markdown(f"Step {step}", metrics),
                           f"the {step} step's metrics (MLflow artifacts of its run)")
    for path in shown:
        key = f"{step}-{path.stem}".replace("_", "-").lower()
        where = path.relative_to(root)
        if path.suffix == ".csv":
            frame = pd.read_csv(path)
            artifacts.table(key, frame.head(SHOWN_ROWS).to_dict("records"),
                            f"{where}: {len(frame)} rows" + (f", the first {SHOWN_ROWS}" if len(frame) > SHOWN_ROWS
                                                             else ""))
        elif path.suffix == ".yaml":
            text = yaml.safe_dump(yaml.safe_load(path.read_text()), sort_keys=False)
            artifacts.markdown(key, f"### {where}\n\n```yaml\n{text}```\n", str(where))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        print("usage: python -m flows.step_flow STEP [--params FILE] [-S KEY=VALUE ...]", file=sys.stderr)
        return 2
    step = argv.pop(0)
    return cli(lambda path, sets: step_flow(step, path, sets), __doc__, argv, step=step)


if __name__ == "__main__":
    from dna.command_gc import start

    start()
    raise SystemExit(main())
