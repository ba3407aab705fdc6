"""A step's entry point: the config loaded and checked before any work, and the command line
`python -m flows.<module> [--params FILE] [--set KEY=VALUE ...]` with dna's one exit-code policy (dna/errors.py)."""
from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dna.config import ConfigError, Params, load_params, parse_overrides
from flows.steps import STAGE_PARAMS, stage_params


def load(params_file: str | Path = "params.yaml", overrides: dict | None = None,
         check_profile: bool = True) -> Params:
    """Load and deep-validate the config (raises ConfigError, one line naming the key, before any work);
    check_profile=False for the stage that makes the latency profile."""
    from dna.pipeline import validate

    params = load_params(params_file, overrides)
    validate(params, check_profile=check_profile)
    return params


def missing_dvc_params(raw: dict) -> list[str]:
    """Keys dvc.yaml tracks (or interpolates) that a params mapping lacks; DVC needs them written out, defaults
    are not enough."""
    missing = []
    for key in sorted({k for keys in STAGE_PARAMS.values() for k in keys} | {"outputs", "search.front_axis"}):
        node = raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(key)
                break
            node = node[part]
    return missing


def check_dvc_params(params_file: str | Path = "params.yaml") -> None:
    """Raise ConfigError naming every key dvc.yaml needs that the params file does not spell out."""
    raw = yaml.safe_load(Path(params_file).read_text()) or {}
    missing = missing_dvc_params(raw)
    if missing:
        raise ConfigError(f"{params_file}: dvc.yaml tracks {', '.join(missing)} but the file does not set "
                          f"{'it' if len(missing) == 1 else 'them'}; write the values out (defaults are not enough "
                          f"for DVC)")


def with_absolute_outputs(params: Params) -> Params:
    """The same params with `outputs` as an absolute path, so worker processes elsewhere write to the same place."""
    return params.model_copy(update={"outputs": str(Path(params.outputs).resolve())})


@dataclass
class StepRun:
    """What a step's flow works with: the checked params, the run, its MLflow run and where child runs go."""

    params: Params
    run: Any  # dna.pipeline.Run
    mlrun: Any  # flows.tracking.RunLog
    tracking: Any  # flows.tracking.Tracking

    def task(self, fn: Callable, name: str) -> Callable:
        """A stage function as a Prefect task with orchestration.retries retries."""
        from flows.prefect_api import stage_task

        return stage_task(fn, name, self.params.orchestration.retries)


@contextlib.contextmanager
def step_run(step: str, params_file: str | Path, overrides: dict | None, *, check_profile: bool = True,
             absolute_outputs: bool = False) -> Iterator[StepRun]:
    """Load and check the config (before any work), then the step's MLflow run with the params it reads."""
    from dna.pipeline import Run
    from flows.tracking import stage_run

    params = load(params_file, overrides, check_profile=check_profile)
    if absolute_outputs:
        params = with_absolute_outputs(params)
    with stage_run(params, step, stage_params(params, step)) as (mlrun, tracking):
        yield StepRun(params, Run(params), mlrun, tracking)


def cli(run: Callable[[str, dict], Any], description: str, argv: list[str] | None = None) -> int:
    """Exit 0; 2 with one line on a bad config; 1 with one line on a detected fault (corrupt checkpoint, diverging
    loss, failed ONNX parity, missing input, failed blocks)."""
    from dna.errors import report
    from dna.logs import setup_logging

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", "-p", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--set", "-S", dest="sets", action="append", metavar="KEY=VALUE",
                        help="override a key, e.g. -S retrain.train.epochs=5")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        run(args.params, parse_overrides(args.sets))
    except Exception as exc:
        return report(exc)
    return 0
