"""A step's entry point: the config loaded and checked before any work, and the command line
`python -m flows.<module> [--params FILE] [--set KEY=VALUE ...]` with dna's one exit-code policy (dna/errors.py).

The command line checks the config before Prefect starts the flow (and, without PREFECT_API_URL, its temporary
server), then runs the step's flow, which takes that checked config over instead of checking it again.
"""
from __future__ import annotations

import flows.app  # noqa: F401 - first: the environment before Prefect and MLflow read it, and the schema

# isort: split

import argparse
import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import yaml

from dna.config import Params, load_params, parse_overrides
from dna.errors import ConfigError
from flows import steps as table
from flows.steps import stage_params


@dataclass(frozen=True)
class Checks:
    """What a step checks before its work, beyond the schema of the whole file."""

    data: bool = True  # the data source (data.root holds images, a torchvision dataset opens)
    models: bool = True  # the schema's timm checks; the teacher's shapes against the space; budgets against costs
    profile: bool = True  # the latency profile, when a key asks for latency

    @classmethod
    def of(cls, step: str) -> Checks:
        """A step that reads neither the teacher nor the space checks the whole file's schema and its own keys
        without importing timm (dna.stages.checks)."""
        from dna.stages import checks

        flags = checks(tuple(table.STAGE_PARAMS[step]), step in table.MAKES_PROFILE)
        return cls(data=flags["data"], models=flags["models"], profile=flags["check_profile"])


_checked: dict[tuple, Params] = {}  # a config the command line checked, for its flow to take over (once)


def _key(params_file: str | Path, overrides: dict | None, checks: Checks) -> tuple:
    path = Path(params_file).resolve()
    stamp = path.stat().st_mtime_ns if path.is_file() else None
    return str(path), stamp, json.dumps(overrides or {}, sort_keys=True, default=str), checks


def load(params_file: str | Path = "params.yaml", overrides: dict | None = None, check_profile: bool = True,
         checks: Checks | None = None) -> Params:
    """Load and validate the config (raises ConfigError, one line naming the key, before any work): every check
    by default; check_profile=False for the stage that makes the latency profile; a step's own Checks.of(step)."""
    from dna.checks import validate

    checks = checks or Checks(profile=check_profile)
    key = _key(params_file, overrides, checks)
    if key in _checked:
        return _checked.pop(key)
    params = load_params(params_file, overrides, deep=checks.models)  # with rounds.count > 1: round 1 (the rounds
    # step, flows/rounds.py, runs the later ones)
    if os.environ.get("DVC_STAGE"):  # a step DVC runs: stop before DVC deletes the next steps' outputs too
        check_dvc_outputs(params.outputs)
    validate(params, check_profile=checks.profile, data=checks.data, models=checks.models)
    return params


def check_first(step: str | None, params_file: str | Path, overrides: dict | None) -> None:
    """Check the step's config now (every check when step is None); the step's flow then takes this config over
    instead of checking it again."""
    checks = Checks.of(step) if step is not None else Checks()
    params = load(params_file, overrides, checks=checks)
    _checked.clear()
    _checked[_key(params_file, overrides, checks)] = params


def missing_dvc_params(raw: dict) -> list[str]:
    """Keys dvc.yaml tracks (or interpolates) that a params mapping lacks; DVC needs them written out, defaults
    are not enough."""
    missing = []
    interpolated = {"outputs", "search.front_axis", "search.targets"}  # search.targets: the per-target `foreach`
    for key in sorted({k for keys in table.STAGE_PARAMS.values() for k in keys} | interpolated):
        node = raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(key)
                break
            node = node[part]
    return missing


def check_dvc_params(params_file: str | Path = "params.yaml", overrides: dict | None = None) -> None:
    """Raise ConfigError naming every key dvc.yaml needs that the params file does not spell out, or when `outputs`
    (with the overrides) is not a path DVC may delete in (check_dvc_outputs)."""
    raw = yaml.safe_load(Path(params_file).read_text()) or {}
    missing = [k for k in missing_dvc_params(raw) if not any(o == k or o.startswith(f"{k}.") for o in overrides or {})]
    if missing == ["search.targets"] and (raw.get("search") or {}).get("budgets"):
        chain = ", ".join(step.name for step in table.STEPS if step.per_target)
        raise ConfigError(f"{params_file}: search.budgets: dvc.yaml runs one chain ({chain}) per named target; "
                          "write search.budgets as one target, e.g. search.targets: {default: "
                          f"{json.dumps(raw['search']['budgets'])}}}, and leave search.budgets out")
    if missing:
        raise ConfigError(f"{params_file}: dvc.yaml tracks {', '.join(missing)} but the file does not set "
                          f"{'it' if len(missing) == 1 else 'them'}; write the values out (defaults are not enough "
                          f"for DVC)")
    outputs = (overrides or {}).get("outputs", raw.get("outputs"))
    if isinstance(outputs, str):
        check_dvc_outputs(outputs)


def check_dvc_outputs(outputs: str) -> None:
    """`outputs` as dvc.yaml reads it: a relative path inside the project, without `..`. DVC deletes a stage's
    outputs before it runs the stage, wherever they are; outside the project they may be anyone's files."""
    path = PurePath(outputs)
    if path.is_absolute() or ".." in path.parts or outputs.startswith("~"):
        raise ConfigError(f"outputs={outputs!r}: dvc.yaml writes the stages' outputs under it and DVC deletes them "
                          f"before it runs a stage ({path / 'data' / 'splits.json'}, {path / 'ratings'}, ...), so "
                          "under DVC it must be a relative path inside the project, without '..' (e.g. outputs); "
                          "`dna run` writes anywhere")


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
    params_file: str | Path = "params.yaml"  # what the step was started with, for the stage's own command line
    overrides: dict | None = None
    in_task: bool = False  # the step's work already runs in a Prefect task (a distill block): no tasks of its own
    target: str | None = None  # the search target of a per-target step (its run's paths are that target's)

    def task(self, fn: Callable, name: str) -> Callable:
        """A stage function as a Prefect task with orchestration.retries retries (itself, within a task)."""
        from flows.prefect_api import stage_task

        return fn if self.in_task else stage_task(fn, name, self.params.orchestration.retries)

    def train(self, stage: str, fn: Callable, task_name: str, written: Path | Callable[[], dict],
              on_epoch: Callable[[dict], None], block: int | None = None) -> dict:
        """Run a training stage and return its result: `fn(run[, block], on_epoch=on_epoch)` in this process, or,
        with orchestration.nproc > 1, `dna <stage> [--block B]` in that many processes under torchrun
        (dna.ddp.run_in_processes), this process staying out of their process group; the result is then what rank 0
        wrote: `written`, its metrics file (JSON), or a function that reads its files. on_epoch sees no epoch of
        the processes: backfill the epochs from the history file they wrote."""
        nproc = self.params.orchestration.nproc
        if nproc > 1:
            from dna.ddp import run_in_processes

            target = self.run.paths.target if self.target else None
            self.task(run_in_processes, task_name)(stage, nproc, self.params_file, self.overrides, block=block,
                                                   target=target)
            return written() if callable(written) else json.loads(Path(written).read_text())
        args = (self.run,) if block is None else (self.run, block)
        return self.task(fn, task_name)(*args, on_epoch=on_epoch)


def step_context(step: str) -> type:
    """The class of run a pipeline step's stages get: the widest of their contexts (Stage.context), or
    dna.context.Context for a step of no stage of the table, the registration."""
    from dna.context import Context
    from dna.stages import STAGES

    classes = [s.load_context() for s in STAGES if s.pipeline_step == step]
    return max(classes, key=lambda cls: len(cls.__mro__), default=Context)


@contextlib.contextmanager
def step_run(step: str, params_file: str | Path, overrides: dict | None, *,
             absolute_outputs: bool = False, target: str | None = None) -> Iterator[StepRun]:
    """Load and check the config (before any work), then the step's MLflow run with the params it reads; of a
    per-target step, for that search target (its MLflow run named `<step>@<target>`, tagged dna.target)."""
    from dna.command_gc import settle
    from flows.tracking import stage_run

    params = load(params_file, overrides, checks=Checks.of(step))
    settle()
    if absolute_outputs:
        params = with_absolute_outputs(params)
    run = step_context(step)(params)
    run = run if target is None else run.for_target(target)
    with stage_run(params, step, stage_params(params, step), target=target) as (mlrun, tracking):
        yield StepRun(params, run, mlrun, tracking, params_file, overrides, target=target)


def cli(run: Callable[[str, dict], Any], description: str, argv: list[str] | None = None,
        step: str | None = None) -> int:
    """Exit 0; 2 with one line on a bad config; 1 with one line on a detected fault (corrupt checkpoint, diverging
    loss, failed ONNX parity, missing input, failed blocks).

    With `step`, its config is checked before the flow runs (a wrong key first, then the step's deep checks)."""
    from dna.errors import report
    from dna.logs import setup_logging
    from flows.prefect_api import start_in_background

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", "-p", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--set", "-S", dest="sets", action="append", metavar="KEY=VALUE",
                        help="override a key, e.g. -S retrain.train.epochs=5")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        overrides = parse_overrides(args.sets)
        if step is not None:
            load_params(args.params, overrides, deep=False)  # a wrong key: fail before anything starts
        server_ready = start_in_background()  # Prefect's temporary server starts while the step's checks run
        if step is not None:
            check_first(step, args.params, overrides)
        server_ready()
        run(args.params, overrides)
    except Exception as exc:
        return report(exc)
    finally:
        _checked.clear()
    return 0
