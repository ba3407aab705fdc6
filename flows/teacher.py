"""Teacher stage: train (or load) the teacher and report its test accuracy (outputs/teacher/)."""
from __future__ import annotations

import pandas as pd
from prefect import flow

from flows import artifacts
from flows.entry import cli, load
from flows.prefect_api import stage_task
from flows.steps import stage_params
from flows.tracking import RunLog, stage_run


def log_history(mlrun: RunLog, history_csv, logged_epochs: set[int], prefix: str = "") -> None:
    """Per-epoch metrics from a history CSV for the epochs the on_epoch hook did not report (resumed ones)."""
    from pathlib import Path

    if not Path(history_csv).is_file():
        return
    for row in pd.read_csv(history_csv).to_dict("records"):
        if int(row["epoch"]) not in logged_epochs:
            mlrun.epoch(row, prefix)


@flow(name="dna-teacher")
def teacher_flow(params_file: str = "params.yaml", overrides: dict | None = None) -> dict:
    from dna.checkpoint import atomic_write_text
    from dna.pipeline import Run, stage_teacher

    params = load(params_file, overrides)
    run = Run(params)
    epochs = params.teacher.train.epochs
    progress = artifacts.Progress("teacher-training", epochs, f"teacher {params.teacher.model}, {epochs} epochs")
    with stage_run(params, "teacher", stage_params(params, "teacher")) as (mlrun, _):
        logged: set[int] = set()

        def on_epoch(row: dict) -> None:
            mlrun.epoch(row)
            logged.add(int(row["epoch"]))
            progress.update(int(row["epoch"]), f"epoch {row['epoch']}, loss {row['loss']:.4f}")

        metrics = stage_task(stage_teacher, "train-teacher", params.orchestration.retries)(run, on_epoch=on_epoch)
        history = run.paths.teacher_dir / "history.csv"
        if not history.is_file():  # a teacher used as it is (no training epochs): an empty history for DVC
            atomic_write_text(history, "epoch,loss,train_accuracy,rate_accuracy,lr\n")
        log_history(mlrun, history, logged)
        mlrun.metrics(metrics)
        for name in ("history.csv", "metrics.json"):
            mlrun.artifact(run.paths.teacher_dir / name)
    progress.done(f"test accuracy {metrics['test_accuracy']:.4f}")
    artifacts.markdown("teacher-summary", artifacts.metrics_markdown(f"Teacher {params.teacher.model}", metrics),
                       "teacher test accuracy")
    return metrics


def main(argv: list[str] | None = None) -> int:
    return cli(lambda path, sets: teacher_flow(path, sets), __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
