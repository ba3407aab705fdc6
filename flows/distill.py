"""Distill stage: build the teacher-feature cache once, then train and rate every block, blocks in parallel (one
after the other for a progressive supervision, such as ssl, where a block's input is made by the blocks before it).

Each block is one task (train its cells on the teacher's features, then rate every candidate of every cell),
submitted concurrently on the task runner named by orchestration.task_runner; with orchestration.nproc > 1 a block
trains in that many processes under torchrun, and its task rates it. A block whose checkpoint
(outputs/distill/block_i.pt) carries the same fingerprint (config, teacher weights, data) is not retrained:
the task resumes it at its last epoch, so only its rating runs again.
Writes outputs/distill/ (checkpoints, histories, feature cache, curves/) and outputs/ratings/block_i.csv.
"""
from __future__ import annotations

import flows.app  # noqa: F401 - first: the environment before Prefect and MLflow read it, and the schema

# isort: split

import json
import os
import shutil
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from dna.config import Params
from dna.fan_out import Unfinished
from dna.supervision import supervision_class
from flows import artifacts
from flows.entry import Checks, StepRun, cli, load, with_absolute_outputs
from flows.fan_out import Job, fan_out, turn, use_threads
from flows.prefect_api import share_prefect_api, worth_retrying
from flows.steps import stage_params
from flows.task_runners import make_task_runner
from flows.tracking import STAGE_TAG, EpochLog, Tracking, child_run, stage_run

BEST_PER_BLOCK = 3


def curves_dir(params: Params):
    """Per-block distillation curves for `dvc plots` (one CSV per block, so the plot follows the block count)."""
    from dna.paths import Paths

    return Paths(params.out_dir).distill_dir / "curves"


@task(name="teacher-features", cache_policy=NO_CACHE, retry_condition_fn=worth_retrying)
def features_task(params: Params) -> None:
    """Run the teacher once over the training and rating splits and store its boundary features (if caching)."""
    from dna.run import Run
    from dna.stages.distill import stage_features

    stage_features(Run(params))


@task(name="distill-block", task_run_name="block-{block}", cache_policy=NO_CACHE,
      retry_condition_fn=worth_retrying)
def block_task(params: Params, block: int, tracking: Tracking, params_file: str = "params.yaml",
               overrides: dict | None = None, *, threads: int | None = None, shared_process: bool = False) -> dict:
    """Distill one block, then rate its candidates; logs a nested MLflow run and a Prefect progress artifact.

    With orchestration.nproc > 1 the block trains in that many processes under torchrun (`dna distill --block B`
    with params_file and overrides, the flow's own) and is rated here.
    threads, shared_process: its share of the cores, and whether other blocks run in this process too (the thread
    runner: they take turns), as flows/fan_out.py gives them."""
    from dna.run import Run
    from dna.stages.distill import distill_resumes_after, distilled, stage_distill
    from dna.stages.rate import stage_rate

    use_threads(threads)
    run = Run(params)
    cfg = params.space.blocks[block]
    epochs = params.distill.epochs
    cells = [c.name for c in run.space.cells(block)]
    progress = artifacts.Progress(f"distill-block-{block}", epochs,
                                  f"block {block}: {len(cells)} cells ({', '.join(cells)}), {epochs} epochs")
    # the turn is taken first: the fingerprint loads the block's targets, which may draw from the random state
    with turn(shared_process), child_run(tracking, f"block_{block}", {
            STAGE_TAG: "distill", "dna.block": str(block),
            "dna.block_fingerprint": run.block_fingerprint(block)}) as mlrun:
        mlrun.params({"block": block, "stride": cfg.stride, "cells": json.dumps(cells), "epochs": epochs})
        epochs_log = EpochLog(mlrun, progress, lambda row: f"epoch {row['epoch']}, mean cell loss {row['loss']:.5f}")
        step = StepRun(params, run, mlrun, tracking, params_file, overrides, in_task=True)
        resumed_from = distill_resumes_after(run, block) if params.orchestration.nproc > 1 else 0
        result = step.train("distill", stage_distill, f"distill-block-{block}",
                            lambda: distilled(run, block, resumed_from), epochs_log, block=block)
        history = run.paths.distill_history(block)
        epochs_log.backfill(history)
        table = stage_rate(run, block)
        candidates = table.drop_duplicates(["cell", "path"])
        best = candidates.nsmallest(BEST_PER_BLOCK, "score")
        mlrun.metrics({"final_loss": result["final_loss"], "resumed_from": result["resumed_from"],
                       "trained_epochs": result["epochs"] - result["resumed_from"],
                       "candidates": len(candidates), "best_score": float(best["score"].iloc[0]),
                       "median_score": float(candidates["score"].median())})
        mlrun.artifact(run.paths.rating(block), "ratings")
        mlrun.artifact(history, "history")
    curves = curves_dir(params)
    curves.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(history, curves / f"block_{block}.csv")
    trained = result["epochs"] - result["resumed_from"]
    progress.done(f"trained {trained} epoch(s), {len(candidates)} candidates rated, best score "
                  f"{best['score'].iloc[0]:.4f}")
    columns = ["cell", "ops", "params", "macs", "score"]
    return {**result, "trained_epochs": trained, "candidates": len(candidates), "mlflow_run_id": mlrun.run_id,
            "process": os.getpid(), "devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "best": [{"block": block, **{c: row[c] for c in columns}} for row in best.to_dict("records")]}


@flow(name="dna-distill")
def distill_flow(params_file: str = "params.yaml", overrides: dict | None = None) -> dict:
    params = with_absolute_outputs(load(params_file, overrides, checks=Checks.of("distill")))
    orch = params.orchestration
    blocks = range(len(params.space.blocks))
    with stage_run(params, "distill", stage_params(params, "distill")) as (mlrun, tracking):
        mlrun.tags({"dna.task_runner": orch.task_runner})
        features_task.with_options(retries=orch.retries)(params)
        # the blocks' own command lines (orchestration.nproc > 1) read the same file and write to the same outputs
        own = str(Path(params_file).resolve()), {**(overrides or {}), "outputs": params.outputs}
        progressive = supervision_class(params.supervision.kind).progressive  # block i needs blocks before it
        gathered = fan_out(orch, [Job(b, block_task, (params, b, tracking, *own)) for b in blocks],
                           chained=progressive)
        results, failed = [gathered.results[b] for b in blocks if b in gathered.results], gathered.failed
        for r in results:
            mlrun.metrics({"final_loss": r["final_loss"], "best_score": r["best"][0]["score"],
                           "trained_epochs": r["trained_epochs"], "candidates": r["candidates"]},
                          prefix=f"block_{r['block']}.")
        best = [row for r in results for row in r["best"]]
        if best:
            artifacts.table("best-candidates", best,
                            f"the {BEST_PER_BLOCK} best-rated candidates of each block (score: lower is better)")
        if failed:
            mlrun.tags({"dna.failed_blocks": ",".join(map(str, failed))})
            raise Unfinished("distill", "block", failed, [r["block"] for r in results], orch.retries)
    return {"blocks": results, "task_runner": orch.task_runner}


def run_distill(params_file: str = "params.yaml", overrides: dict | None = None,
                dask_processes: bool | None = None) -> dict:
    """Run the distill flow on the task runner the config names (a Dask LocalCluster, a process pool, ...)."""
    from dna.config import load_params

    orch = load_params(params_file, overrides, deep=False).orchestration
    if orch.task_runner in ("processes", "dask", "ray"):
        share_prefect_api()  # workers in other processes report to this process's Prefect server
    runner = make_task_runner(orch, dask_processes=dask_processes)
    return distill_flow.with_options(task_runner=runner)(params_file, overrides)


STEP = run_distill  # what the pipeline flow runs for this step (flows/steps.py)


def main(argv: list[str] | None = None) -> int:
    return cli(STEP, __doc__, argv, step="distill")


if __name__ == "__main__":
    from dna.command_gc import start

    start()
    raise SystemExit(main())
