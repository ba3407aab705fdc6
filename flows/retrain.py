"""Retrain stage: train the chosen architecture (resuming from outputs/retrain/train_state.pt) and test it.

Writes outputs/retrain/ (model.pt, train_state.pt, history.csv, metrics.json); the figures stage draws its curves.
"""
from __future__ import annotations

from prefect import flow

from flows import artifacts
from flows.entry import cli, step_run
from flows.tracking import EpochLog


@flow(name="dna-retrain")
def retrain_flow(params_file: str = "params.yaml", overrides: dict | None = None) -> dict:
    from dna.arch import Arch
    from dna.stages.retrain import stage_retrain

    with step_run("retrain", params_file, overrides) as step:
        run, mlrun, epochs = step.run, step.mlrun, step.params.retrain.train.epochs
        progress = artifacts.Progress("retrain-training", epochs,
                                      f"retraining the chosen architecture, {epochs} epochs")
        mlrun.tags({"dna.arch": Arch.load(run.paths.arch).tag()})
        epochs_log = EpochLog(mlrun, progress,
                              lambda row: f"epoch {row['epoch']}, hold-out accuracy {row['rate_accuracy']:.4f}")
        metrics = step.train("retrain", stage_retrain, "retrain", run.paths.retrain_dir / "metrics.json", epochs_log)
        epochs_log.backfill(run.paths.retrain_dir / "history.csv")
        mlrun.metrics(metrics)
        for name in ("history.csv", "metrics.json"):
            mlrun.artifact(run.paths.retrain_dir / name)
        mlrun.artifact(run.paths.arch)
    progress.done(f"test accuracy {metrics['test_accuracy']:.4f}")
    artifacts.markdown("retrain-summary", artifacts.metrics_markdown("Retrained network", metrics),
                       "test accuracy and cost of the retrained network")
    return metrics


STEP = retrain_flow  # what the pipeline flow runs for this step (flows/steps.py)


def main(argv: list[str] | None = None) -> int:
    return cli(STEP, __doc__, argv, step="retrain")


if __name__ == "__main__":
    raise SystemExit(main())
