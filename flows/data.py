"""Data stage: the fixed, seeded, disjoint train / rate / test splits (outputs/data/splits.json)."""
from __future__ import annotations

from prefect import flow

from flows import artifacts
from flows.entry import cli, step_run
from flows.hashes import data_hash


@flow(name="dna-data")
def data_flow(params_file: str = "params.yaml", overrides: dict | None = None) -> dict:
    from dna.stages.data import stage_data

    with step_run("data", params_file, overrides) as step:
        params, run, mlrun = step.params, step.run, step.mlrun
        summary = step.task(stage_data, "make-splits")(run)
        mlrun.metrics({f"{split}_images": n for split, n in summary["sizes"].items()}
                      | {"num_classes": summary["num_classes"]})
        mlrun.tags({"dna.data_hash": data_hash(params, run.paths.splits)})
        mlrun.artifact(run.paths.splits)
    artifacts.table("data-splits", [{"split": k, "images": v} for k, v in summary["sizes"].items()],
                    f"{params.data.source} split sizes (seed {params.seed}, {summary['num_classes']} classes)")
    return summary


STEP = data_flow  # what the pipeline flow runs for this step (flows/steps.py)


def main(argv: list[str] | None = None) -> int:
    return cli(STEP, __doc__, argv, step="data")


if __name__ == "__main__":
    raise SystemExit(main())
