"""Rank stage (not part of the default pipeline: `dvc repro rank/dvc.yaml` or `python -m flows.rank`): plan the
networks, train each from scratch as one task and the single-path one-shot supernet as another, all concurrently on
the task runner named by orchestration.task_runner, then report how well the ratings rank them.

A network whose result file matches is not retrained; one interrupted resumes from its last epoch. A network that
fails is named; the others' results are kept and reported.
A third kind of task distills and rates every block again from another seed (the rating's own noise).
Writes outputs/rank/ (plan.csv, networks/<id>/, spos/, replicates/<r>/, networks.csv, rank.png, metrics.json,
predictor.json).
"""
from __future__ import annotations

import flows.app  # noqa: F401 - first: the environment before Prefect and MLflow read it, and the schema

# isort: split

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from dna.config import Params
from dna.locks import stage_lock
from dna.rank_metrics import shown
from flows import artifacts
from flows.entry import cli, load, with_absolute_outputs
from flows.fan_out import Job, fan_out, turn, use_threads
from flows.prefect_api import share_prefect_api, worth_retrying
from flows.steps import stage_params
from flows.task_runners import make_task_runner
from flows.tracking import STAGE_TAG, EpochLog, Tracking, child_run, stage_run


@task(name="rank-network", task_run_name="network-{network}", cache_policy=NO_CACHE,
      retry_condition_fn=worth_retrying)
def network_task(params: Params, network: str, tracking: Tracking, *, threads: int | None = None,
                 shared_process: bool = False) -> dict:
    """Train one planned network from scratch with the rank recipe; a nested MLflow run holds its curve."""
    from dna.rank import arch_of, read_plan, train_network
    from dna.run import Run

    use_threads(threads)
    run = Run(params)
    arch = arch_of(read_plan(run), network)
    with turn(shared_process), child_run(tracking, network, {STAGE_TAG: "rank", "dna.arch": arch.tag()}) as mlrun:
        result = train_network(run, network, arch, on_epoch=EpochLog(mlrun))
        mlrun.metrics({k: v for k, v in result.items() if k != "test_accuracies"})
    return result


@task(name="rank-spos", cache_policy=NO_CACHE, retry_condition_fn=worth_retrying)
def spos_task(params: Params, tracking: Tracking, *, threads: int | None = None, shared_process: bool = False) -> dict:
    """Train the one-shot supernet and rate every planned network with inherited weights."""
    from dna.rank import read_plan, spos_ratings
    from dna.run import Run

    use_threads(threads)
    run = Run(params)
    with turn(shared_process), child_run(tracking, "spos", {STAGE_TAG: "rank"}) as mlrun:
        result = spos_ratings(run, read_plan(run), on_epoch=EpochLog(mlrun))
        mlrun.metrics(result)
        mlrun.artifact(run.paths.spos_ratings)
    return result


@task(name="rank-replicate", cache_policy=NO_CACHE, retry_condition_fn=worth_retrying)
def replicate_task(params: Params, tracking: Tracking, *, threads: int | None = None,
                   shared_process: bool = False) -> dict:
    """Distill and rate every block again from other seeds: the rating's own noise."""
    from dna.rank import replicate_ratings
    from dna.run import Run

    use_threads(threads)
    with turn(shared_process), child_run(tracking, "replicate", {STAGE_TAG: "rank"}) as mlrun:
        result = replicate_ratings(Run(params), on_epoch=EpochLog(mlrun))
        mlrun.metrics({"seconds": result["seconds"]})
    return result


@flow(name="dna-rank")
def rank_flow(params_file: str = "params.yaml", overrides: dict | None = None) -> dict:
    from dna.fan_out import Unfinished
    from dna.rank import plan_networks, summarize
    from dna.run import Run

    params = with_absolute_outputs(load(params_file, overrides))
    orch = params.orchestration
    run = Run(params)
    busy = stage_lock(run.paths.root, "rank")  # one run of the stage at a time on this outputs folder
    with busy, stage_run(params, "rank", stage_params(params, "rank")) as (mlrun, tracking):
        mlrun.tags({"dna.task_runner": orch.task_runner})
        plan = plan_networks(run)
        mlrun.artifact(run.paths.rank_plan)
        gathered = fan_out(orch, [Job("spos", spos_task, (params, tracking)),
                                  Job("replicate", replicate_task, (params, tracking)),
                                  *(Job(n, network_task, (params, n, tracking)) for n in plan["id"])])
        spos_result = gathered.results.pop("spos", None)
        gathered.results.pop("replicate", None)
        results = gathered.results
        failed = {name: f"{type(exc).__name__}: {exc}" for name, exc in gathered.failed.items()}
        metrics = summarize(run, plan, results, failed, spos_result)
        mlrun.metrics(interval_bounds(metrics))
        mlrun.metrics(metrics.get("spos") or {}, prefix="spos.")
        for path in (run.paths.rank_table, run.paths.rank_plot, run.paths.rank_metrics, run.paths.rank_bands,
                     run.paths.predictor):
            if path.is_file():
                mlrun.artifact(path)
        if failed:
            mlrun.tags({"dna.failed_networks": ",".join(failed)})
            raise Unfinished("rank", "job", gathered.failed, results, orch.retries)
    shown_metrics = {k: shown(metrics, k) if f"{k}_ci" in metrics else v for k, v in metrics.items()
                     if not k.endswith("_ci")}
    artifacts.markdown("rank-summary", artifacts.metrics_markdown("Does the rating rank networks?", shown_metrics),
                       "Kendall tau of rating against test accuracy with bootstrap 90% intervals, beside the "
                       "ground truth's and the rating's own noise, the one-shot baseline's tau, the searched network "
                       "against random ones under the budget")
    return metrics


def interval_bounds(metrics: dict) -> dict:
    """The metrics with each interval `<name>_ci` as two numbers, `<name>_ci_low` and `<name>_ci_high`."""
    out = {k: v for k, v in metrics.items() if not k.endswith("_ci")}
    for key, interval in metrics.items():
        if key.endswith("_ci") and interval:
            out[f"{key}_low"], out[f"{key}_high"] = interval
    return out


def run_rank(params_file: str = "params.yaml", overrides: dict | None = None,
             dask_processes: bool | None = None) -> dict:
    """Run the rank flow on the task runner the config names."""
    from dna.config import load_params

    orch = load_params(params_file, overrides).orchestration
    if orch.task_runner in ("processes", "dask", "ray"):
        share_prefect_api()
    runner = make_task_runner(orch, dask_processes=dask_processes)
    return rank_flow.with_options(task_runner=runner)(params_file, overrides)


STEP = run_rank  # what the pipeline flow runs for this step (flows/steps.py)


def main(argv: list[str] | None = None) -> int:
    return cli(STEP, __doc__, argv)


if __name__ == "__main__":
    from dna.command_gc import start

    start()
    raise SystemExit(main())
