"""Search stage: the best architecture under the budgets and the Pareto front, from the block ratings.

Writes outputs/search/ (arch.yaml, front.csv, chosen.csv, metrics.json); the figures stage draws its pictures.
"""
from __future__ import annotations

import pandas as pd
from prefect import flow

from flows import artifacts
from flows.entry import cli, step_run


def cost_columns(front: pd.DataFrame) -> list[str]:
    """params and macs, and latency_ms when the run has a latency profile."""
    return [c for c in ("params", "macs", "latency_ms") if c in front.columns]


def arch_markdown(arch, metrics: dict, axis: str) -> str:
    budgets = ", ".join(f"{k} <= {v:,.0f}" for k, v in metrics["budgets"].items()) or "none"
    lines = ["### Chosen architecture", "",
             f"rating (sum of block scores, lower is better): **{metrics['score']:.4f}**; "
             f"params {metrics['params']:,.0f}; multiply-adds {metrics['macs']:,.0f}"
             + (f"; predicted latency {metrics['latency_ms']:.3f} ms" if "latency_ms" in metrics else ""), "",
             f"budgets: {budgets}; Pareto front over {axis}: {metrics['front_size']} architectures out of "
             f"{int(metrics['space_size']):,}", "", "| stage | layers (timm block strings) |", "| --- | --- |"]
    for i, stage in enumerate(arch.stages):
        lines.append(f"| {i} | {' '.join(f'`{s}`' for s in stage)} |")
    lines += ["", f"stem {arch.stem}, head {arch.head}", "", "```yaml", arch.to_yaml().rstrip(), "```"]
    return "\n".join(lines) + "\n"


@flow(name="dna-search")
def search_flow(params_file: str = "params.yaml", overrides: dict | None = None) -> dict:
    from dna.arch import Arch
    from dna.stages.search import stage_search

    with step_run("search", params_file, overrides) as step:
        params, run, mlrun, out = step.params, step.run, step.mlrun, step.run.paths.search_dir
        metrics = step.task(stage_search, "search")(run)
        front = pd.read_csv(out / "front.csv")
        arch = Arch.load(run.paths.arch)
        mlrun.metrics({k: metrics[k] for k in ("score", "params", "macs", "latency_ms", "front_size") if k in metrics}
                      | {f"{b}.best": v["best"] for b, v in metrics["ratings"].items()})
        mlrun.tags({"dna.arch": arch.tag()})
        for name in ("arch.yaml", "front.csv", "metrics.json"):
            mlrun.artifact(out / name)
    axis = params.search.front_axis
    artifacts.table("pareto-front", front[["score", *cost_columns(front), "chosen", "arch"]].to_dict("records"),
                    f"Pareto front of rating against {axis} ({len(front)} architectures; chosen = best under budgets)")
    artifacts.markdown("chosen-architecture", arch_markdown(arch, metrics, axis), "the architecture to retrain")
    return metrics


STEP = search_flow  # what the pipeline flow runs for this step (flows/steps.py)


def main(argv: list[str] | None = None) -> int:
    return cli(STEP, __doc__, argv, step="search")


if __name__ == "__main__":
    raise SystemExit(main())
