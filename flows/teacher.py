"""Teacher stage: train (or load) the teacher and report its test accuracy (outputs/teacher/)."""
from __future__ import annotations

from prefect import flow

from flows import artifacts
from flows.entry import cli, step_run
from flows.tracking import EpochLog


@flow(name="dna-teacher")
def teacher_flow(params_file: str = "params.yaml", overrides: dict | None = None) -> dict:
    from dna.stages.teacher import stage_teacher

    with step_run("teacher", params_file, overrides) as step:
        params, run, mlrun, epochs = step.params, step.run, step.mlrun, step.params.teacher.train.epochs
        progress = artifacts.Progress("teacher-training", epochs, f"teacher {params.teacher.model}, {epochs} epochs")
        epochs_log = EpochLog(mlrun, progress, lambda row: f"epoch {row['epoch']}, loss {row['loss']:.4f}")
        metrics = step.train("teacher", stage_teacher, "train-teacher", run.paths.teacher_dir / "metrics.json",
                             epochs_log)
        epochs_log.backfill(run.paths.teacher_dir / "history.csv")
        mlrun.metrics(metrics)
        for name in ("history.csv", "metrics.json"):
            mlrun.artifact(run.paths.teacher_dir / name)
    progress.done(f"test accuracy {metrics['test_accuracy']:.4f}" if metrics["test_accuracy"] is not None else
                  f"no teacher: supervision {params.supervision.kind} needs none")
    artifacts.markdown("teacher-summary", artifacts.metrics_markdown(f"Teacher {params.teacher.model}", metrics),
                       "teacher test accuracy")
    return metrics


STEP = teacher_flow  # what the pipeline flow runs for this step (flows/steps.py)


def main(argv: list[str] | None = None) -> int:
    return cli(STEP, __doc__, argv, step="teacher")


if __name__ == "__main__":
    raise SystemExit(main())
