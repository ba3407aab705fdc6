"""Teacher stage: train (or load) the teacher and report its test accuracy (outputs/teacher/)."""
from __future__ import annotations

from prefect import flow

from flows import artifacts
from flows.entry import cli, step_run
from flows.tracking import EpochLog


@flow(name="dna-teacher")
def teacher_flow(params_file: str = "params.yaml", overrides: dict | None = None) -> dict:
    import json

    from dna.checkpoint import atomic_write_text
    from dna.ddp import run_in_processes
    from dna.pipeline import stage_teacher

    with step_run("teacher", params_file, overrides) as step:
        params, run, mlrun, epochs = step.params, step.run, step.mlrun, step.params.teacher.train.epochs
        progress = artifacts.Progress("teacher-training", epochs, f"teacher {params.teacher.model}, {epochs} epochs")
        epochs_log = EpochLog(mlrun, progress, lambda row: f"epoch {row['epoch']}, loss {row['loss']:.4f}")
        nproc = step.params.orchestration.nproc
        if nproc > 1:  # the ranks run in processes of their own; this process logs to MLflow what rank 0 wrote
            step.task(run_in_processes, "train-teacher")("teacher", nproc, params_file, overrides)
            metrics = json.loads((run.paths.teacher_dir / "metrics.json").read_text())
        else:
            metrics = step.task(stage_teacher, "train-teacher")(run, on_epoch=epochs_log)
        history = run.paths.teacher_dir / "history.csv"
        if not history.is_file():  # a teacher used as it is (no training epochs): an empty history for DVC
            atomic_write_text(history, "epoch,loss,train_accuracy,rate_accuracy,lr\n")
        epochs_log.backfill(history)
        mlrun.metrics(metrics)
        for name in ("history.csv", "metrics.json"):
            mlrun.artifact(run.paths.teacher_dir / name)
    progress.done(f"test accuracy {metrics['test_accuracy']:.4f}")
    artifacts.markdown("teacher-summary", artifacts.metrics_markdown(f"Teacher {params.teacher.model}", metrics),
                       "teacher test accuracy")
    return metrics


def main(argv: list[str] | None = None) -> int:
    return cli(lambda path, sets: teacher_flow(path, sets), __doc__, argv, step="teacher")


if __name__ == "__main__":
    raise SystemExit(main())
