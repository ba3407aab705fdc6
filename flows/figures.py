"""Figures stage: the Pareto front with the chosen network, every block's rating spread and the retraining curves,
drawn from the tables earlier stages wrote; logged to MLflow and listed as a Prefect artifact.

Writes outputs/search/front.png, outputs/search/rating_spread.png, outputs/retrain/curves.png.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows import artifacts
from flows.entry import cli, step_run


@flow(name="dna-figures")
def figures_flow(params_file: str = "params.yaml", overrides: dict | None = None) -> dict:
    from dna.stages.figures import stage_figures

    with step_run("figures", params_file, overrides) as step:
        result = step.task(stage_figures, "draw")(step.run)
        for path in result["figures"]:
            step.mlrun.artifact(Path(path))
    artifacts.markdown("figures", "\n".join(f"- `{path}`" for path in result["figures"]) + "\n",
                       "the pictures of this run (MLflow artifacts of the figures run)")
    return result


STEP = figures_flow  # what the pipeline flow runs for this step (flows/steps.py)


def main(argv: list[str] | None = None) -> int:
    return cli(STEP, __doc__, argv, step="figures")


if __name__ == "__main__":
    raise SystemExit(main())
