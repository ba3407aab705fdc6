"""Rounds step (DNA+): rounds 2 to rounds.count, once the default pipeline ran round 1 (dna/rounds.py).

Each later round writes its params to <outputs>/rounds/round_<r>/params.yaml and runs every step of the default
pipeline, registration included, as a flow on that file: under an MLflow run of its own ("round <r>", tag dna.round)
with a nested run per step, itself under this step's run. Every round's exported network is so a candidate of the
registry, and promotion keeps the best. A round stopped half-way resumes inside its stages from their checkpoints.
Writes <outputs>/rounds.json (every round's teacher, network, accuracy and cost, and the best round).

    python -m flows.rounds [--params FILE] [-S KEY=VALUE ...]
    python -m flows.pipeline             # with rounds.count > 1: the default steps (round 1), then this step

`dvc repro dvc.yaml rounds/dvc.yaml` runs the later rounds as `dna rounds`: their stages, without the registry.
"""
from __future__ import annotations

import flows.app  # noqa: F401 - first: the environment before Prefect and MLflow read it, and the schema

# isort: split

from pathlib import Path

import yaml
from prefect import flow

from flows import artifacts
from flows import steps as table
from flows.entry import cli, load
from flows.tracking import (
    STAGE_TAG,
    Tracking,
    child_run,
    ensure_experiment,
    nested_under,
    parent_run_id,
    tracking_uri,
)


def write_round_params(config) -> Path:
    """A round's params as a params file in its outputs: what its steps run on, and a record of the round."""
    from dna.checkpoint import atomic_write_text

    path = Path(config.outputs) / "params.yaml"
    atomic_write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path


def later_round_steps() -> list:
    """The steps of a round after the first: every default step but those whose stages only draw pictures."""
    from dna.stages import STAGES, later_round_stages

    kept = {s.pipeline_step for s in later_round_stages(STAGES)} | {table.REGISTER.name}
    return [step for step in table.STEPS if step.name in kept]


def rounds_markdown(rows: list[dict], best: int | None) -> str:
    lines = ["### DNA+ rounds", "", "| round | teacher | teacher accuracy | network | accuracy | ONNX accuracy | "
             "parameters | multiply-adds |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['round']}{' (best)' if row['round'] == best else ''} | {row['teacher']} | "
                     f"{row['teacher_test_accuracy']} | `{row['arch']}` | {row['test_accuracy']} | "
                     f"{row['onnx_test_accuracy']} | {row['params']} | {row['macs']} |")
    return "\n".join(lines) + "\n"


@flow(name="dna-rounds")
def rounds_flow(params_file: str = "params.yaml", overrides: dict | None = None) -> dict:
    from dna.rounds import each_round, summary, write_summary

    params = load(params_file, overrides)
    uri = tracking_uri(params)
    experiment = ensure_experiment(uri, params.mlflow.experiment)
    with child_run(Tracking(uri, experiment, parent_run_id(uri)), "rounds", {STAGE_TAG: "rounds"}) as mlrun:

        def run_steps(config, round_: int) -> None:
            """A later round: its params file, then every step on it under the round's own MLflow run."""
            path = write_round_params(config)
            with child_run(Tracking(uri, experiment, mlrun.run_id), f"round {round_}",
                           {STAGE_TAG: "round", "dna.round": str(round_)}) as round_run, nested_under(round_run.run_id):
                round_run.artifact(path)
                for step in later_round_steps():
                    for target in params.search.named_targets() if step.per_target else [None]:
                        step.flow()(str(path), None, **({"target": target} if target else {}))

        each_round(params, run_steps)
        rows = write_summary(params)
        result = summary(rows)
        for row in rows:
            mlrun.metrics({k: row[k] for k in ("teacher_test_accuracy", "test_accuracy", "onnx_test_accuracy",
                                               "params", "macs") if row[k] is not None}, step=row["round"])
        mlrun.metrics({"best_round": result["best_round"] or 0})
        mlrun.artifact(Path(params.outputs) / "rounds.json")
    artifacts.markdown("dna-plus-rounds", rounds_markdown(rows, result["best_round"]), "DNA+ round over round")
    return result


STEP = rounds_flow  # what the pipeline flow runs for this step (flows/steps.py)


def main(argv: list[str] | None = None) -> int:
    return cli(STEP, __doc__, argv)


if __name__ == "__main__":
    from dna.command_gc import start

    start()
    raise SystemExit(main())
