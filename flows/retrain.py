"""Retrain stage: train the chosen architecture (resuming from outputs/retrain/train_state.pt) and test it.

Writes outputs/retrain/ (model.pt, train_state.pt, history.csv, curves.png, metrics.json).
"""
from __future__ import annotations

from prefect import flow

from flows import artifacts
from flows.entry import cli, load
from flows.prefect_api import stage_task
from flows.steps import stage_params
from flows.teacher import log_history
from flows.tracking import stage_run


@flow(name="dna-retrain")
def retrain_flow(params_file: str = "params.yaml", overrides: dict | None = None) -> dict:
    from dna.arch import Arch
    from dna.pipeline import Run, stage_retrain

    params = load(params_file, overrides)
    run = Run(params)
    epochs = params.retrain.train.epochs
    progress = artifacts.Progress("retrain-training", epochs, f"retraining the chosen architecture, {epochs} epochs")
    with stage_run(params, "retrain", stage_params(params, "retrain")) as (mlrun, _):
        mlrun.tags({"dna.arch": Arch.load(run.paths.arch).tag()})
        logged: set[int] = set()

        def on_epoch(row: dict) -> None:
            mlrun.epoch(row)
            logged.add(int(row["epoch"]))
            progress.update(int(row["epoch"]), f"epoch {row['epoch']}, hold-out accuracy {row['rate_accuracy']:.4f}")

        metrics = stage_task(stage_retrain, "retrain", params.orchestration.retries)(run, on_epoch=on_epoch)
        log_history(mlrun, run.paths.retrain_dir / "history.csv", logged)
        mlrun.metrics(metrics)
        for name in ("history.csv", "curves.png", "metrics.json"):
            mlrun.artifact(run.paths.retrain_dir / name)
        mlrun.artifact(run.paths.arch)
    progress.done(f"test accuracy {metrics['test_accuracy']:.4f}")
    artifacts.markdown("retrain-summary", artifacts.metrics_markdown("Retrained network", metrics),
                       "test accuracy and cost of the retrained network")
    return metrics


def main(argv: list[str] | None = None) -> int:
    return cli(lambda path, sets: retrain_flow(path, sets), __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
