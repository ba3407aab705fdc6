"""The pipeline's steps, made from the stage table (dna.stages) plus the step only the pipeline has, registration in
MLflow. Each step is a DVC stage that runs its plain `dna` commands (dvc.yaml, made from this by flows/dvc_files.py)
and a Prefect flow (`python -m flows.<module>`, its module's STEP) that the pipeline flow runs in its own process;
each step's MLflow run logs the params it reads.
"""
from __future__ import annotations

import functools
import importlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dna.stages import STAGES as STAGE_TABLE
from dna.stages import Plot, Stage, at_target
from dna.stages import steps as stage_steps

if TYPE_CHECKING:
    from dna.config import Params


@dataclass(frozen=True)
class Step:
    name: str
    module: str  # python -m flows.<module>
    params: tuple[str, ...]  # the params.yaml keys it reads, as dvc.yaml lists them
    outputs: tuple[str, ...]  # under `outputs`, as dvc.yaml lists them (outs)
    metrics: str | None  # under `outputs` (dvc.yaml metrics; logged to MLflow by the pipeline flow)
    headline: tuple[str, ...]
    inputs: tuple[str, ...] = ()  # under `outputs`: what earlier steps wrote that it reads (dvc.yaml deps)
    checkpoints: tuple[str, ...] = ()  # outputs a rerun resumes from (persist: true)
    reports: tuple[str, ...] = ()  # outputs kept out of DVC's cache (cache: false)
    commands: tuple[str, ...] = ()  # the `dna` commands DVC runs, in order (`dna <stage>` for each of its stages)
    # once per search target (a DVC foreach over search.targets): its paths hold "{target}"
    per_target: bool = False
    plots: tuple[Plot, ...] = ()  # its stages' plots (dvc.yaml plots)
    helps: tuple[str, ...] = ()  # what each of its stages does

    def flow(self) -> Callable[..., dict]:
        """The step's Prefect flow: its module's STEP (a flow, or a function that runs one on its task runner), or,
        for a step without a module of its own, the generic step flow (flows/step_flow.py). A per-target step's
        takes the target: flow(params_file, overrides, target=name)."""
        try:
            return importlib.import_module(f"flows.{self.module}").STEP
        except ModuleNotFoundError as exc:
            if exc.name != f"flows.{self.module}":
                raise
        from flows.step_flow import step_flow

        return functools.partial(step_flow, self.name)

    def at(self, target: str) -> Step:
        """A per-target step with its paths for one target."""
        return at_target(self, target)


def steps_of(table: Iterable[Stage] = STAGE_TABLE, default: bool = True) -> list[Step]:
    """The steps of a stage table: its stages grouped by step, then registration; or (default=False) the steps run
    only when asked, each with a dvc.yaml of its own (<step>/dvc.yaml), so that `dvc repro` leaves them out."""
    out = []
    for name, stages in stage_steps(table, default).items():
        params = tuple(dict.fromkeys(k for s in stages for k in s.params))
        outputs = tuple(o for s in stages for o in s.outputs)
        metrics = [s.metrics for s in stages if s.metrics]
        made = {o for s in stages for o in s.outputs}  # a stage of the step reads what another one wrote
        inputs = tuple(dict.fromkeys(i for s in stages for i in s.inputs if i not in made))
        out.append(Step(name, name, params, outputs, metrics[0] if metrics else None,
                        tuple(h for s in stages for h in s.headline), inputs,
                        tuple(c for s in stages for c in s.checkpoints),
                        tuple(r for s in stages for r in s.reports),
                        tuple(f"dna {s.name}" for s in stages), per_target=any(s.per_target for s in stages),
                        plots=tuple(p for s in stages for p in s.plots), helps=tuple(s.help for s in stages)))
    if not default:
        return out
    last = max((i for i, step in enumerate(out) if step.per_target), default=len(out) - 1)
    return [*out[:last + 1], REGISTER, *out[last + 1:]]  # registration closes each target's chain


REGISTER = Step("register", "register", ("mlflow.registered_model", "mlflow.promote_metric"), (),
                "register/{target}/registration.json", ("version", "champion", "reason"),
                inputs=("search/targets/{target}/arch.yaml", "targets/{target}/retrain/model.pt",
                        "targets/{target}/retrain/metrics.json", "targets/{target}/export/model.onnx",
                        "targets/{target}/export/metrics.json"), commands=("dna register",), per_target=True)


def registration(paths) -> Path:
    """A target's registration record (the register step's metrics file), of a run's dna.paths.Paths."""
    return paths.root / REGISTER.at(paths.target).metrics


def _derived(table: Iterable[Stage]) -> dict:
    steps = steps_of(table)
    return {"STEPS": steps,
            "OPTIONAL_STEPS": steps_of(table, default=False),  # e.g. rank: dvc repro rank/dvc.yaml
            "STAGES": [s.name for s in steps],
            "STAGE_PARAMS": {s.name: list(s.params) for s in steps},
            "STAGE_MODULES": {s.name: s.module for s in steps},
            "METRIC_FILES": {s.name: s.metrics for s in steps if s.metrics},
            # steps that make the latency profile (checked without it)
            "MAKES_PROFILE": frozenset(step for step, stages in stage_steps(table).items()
                                       if any(s.makes_profile for s in stages))}


STEPS, OPTIONAL_STEPS, STAGES, STAGE_PARAMS, STAGE_MODULES, METRIC_FILES, MAKES_PROFILE = _derived(STAGE_TABLE).values()


# Sections that determine the trained network; their hash tags a registered model version.
RESULT_SECTIONS = ("seed", "data", "teacher", "space", "supervision", "distill", "rating", "search", "profile",
                   "retrain", "export")


def step_named(name: str) -> Step:
    """The step of that name, of the default pipeline or run only when asked (KeyError naming the steps)."""
    found = {step.name: step for step in (*STEPS, *OPTIONAL_STEPS)}
    if name not in found:
        raise KeyError(f"no step {name!r}; the steps are {', '.join(found)}")
    return found[name]


def pick(params: Params, keys: list[str]) -> dict[str, Any]:
    """The values of dotted keys, e.g. pick(p, ["seed", "teacher.model"])."""
    raw = params.model_dump(mode="json")
    out = {}
    for key in keys:
        node = raw
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted keys with string values (lists stay one value), for MLflow params."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)}


def stage_params(params: Params, step: str) -> dict[str, str]:
    keys = STAGE_PARAMS[step] if step in STAGE_PARAMS else next(list(s.params) for s in OPTIONAL_STEPS
                                                                 if s.name == step)
    return flatten(pick(params, keys))
