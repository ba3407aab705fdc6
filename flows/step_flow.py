"""The flow of a step that has no module of its own (`flows/<step>.py`): its stages run as tasks in table order (a
per-block stage once per block, after its preparation) under the step's MLflow run, which logs the params the step
reads, the numbers of its metrics file, and its reports and metrics file as artifacts; a Prefect artifact shows its
metrics or lists what it wrote. A new stage so needs only its table entry and its function.

    python -m flows.step_flow figures [--params FILE] [-S KEY=VALUE ...]
"""
from __future__ import annotations

import json
import sys

from prefect import flow

from flows import artifacts
from flows.entry import cli, step_run


@flow(name="dna-step", flow_run_name="{step}")
def step_flow(step: str, params_file: str = "params.yaml", overrides: dict | None = None) -> dict:
    from dna.stages import STAGES, run_stage
    from flows.steps import step_named

    spec = step_named(step)
    with step_run(step, params_file, overrides) as s:
        for stage in (st for st in STAGES if st.pipeline_step == step):
            s.task(run_stage, stage.name)(stage, s.run)
        metrics_file = s.run.paths.root / spec.metrics if spec.metrics else None
        metrics = json.loads(metrics_file.read_text()) if metrics_file and metrics_file.is_file() else {}
        s.mlrun.metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        written = [s.run.paths.root / rel for rel in (*spec.reports, *([spec.metrics] if spec.metrics else []))]
        for path in written:
            if path.is_file():
                s.mlrun.artifact(path)
    text = artifacts.metrics_markdown(f"Step {step}", metrics) if metrics else \
        "\n".join(f"- `{path}`" for path in written if path.exists()) + "\n"
    artifacts.markdown(f"{step}-summary", text, f"what the {step} step wrote (MLflow artifacts of its run)")
    return metrics or {"written": [str(path) for path in written if path.exists()]}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        print("usage: python -m flows.step_flow STEP [--params FILE] [-S KEY=VALUE ...]", file=sys.stderr)
        return 2
    step = argv.pop(0)
    return cli(lambda path, sets: step_flow(step, path, sets), __doc__, argv, step=step)


if __name__ == "__main__":
    raise SystemExit(main())
