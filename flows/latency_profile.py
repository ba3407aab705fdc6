"""Profile stage: the latency of every candidate layer, the stem and the head in ONNX Runtime on this machine
(outputs/profile/latency.csv and profile.json), so that the search can take latency_ms as a budget and an axis.

The table describes the machine the stage ran on: on the deployment hardware, rerun it with
`dvc repro --force profile` (and everything downstream reruns only if the measured table changed).
"""
from __future__ import annotations

import pandas as pd
from prefect import flow

from flows import artifacts
from flows.entry import cli, step_run


def slowest_layers(table: pd.DataFrame, n: int = 10) -> list[dict]:
    layers = table[table["kind"] == "layer"].nlargest(n, "latency_ms")
    return layers[["block", "position", "op_name", "in_width", "width", "resolution", "latency_ms"]].to_dict("records")


@flow(name="dna-profile")
def profile_flow(params_file: str = "params.yaml", overrides: dict | None = None) -> dict:
    from dna.stages.latency_profile import stage_profile

    with step_run("profile", params_file, overrides) as step:
        params, run, mlrun = step.params, step.run, step.mlrun
        summary = step.task(stage_profile, "time-pieces")(run)
        mlrun.metrics({k: summary[k] for k in ("rows", "seconds", "overhead_ms", "layer_ms_median")})
        for name in ("latency.csv", "profile.json"):
            mlrun.artifact(run.paths.profile_dir / name)
    table = pd.read_csv(run.paths.latency)
    artifacts.table("slowest-layers", slowest_layers(table),
                    f"the slowest of {summary['rows']} timed pieces (ONNX Runtime, batch {params.profile.batch_size}, "
                    f"{params.profile.threads} thread(s))")
    return summary


STEP = profile_flow  # what the pipeline flow runs for this step (flows/steps.py)


def main(argv: list[str] | None = None) -> int:
    return cli(STEP, __doc__, argv, step="profile")


if __name__ == "__main__":
    raise SystemExit(main())
