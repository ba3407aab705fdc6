"""The whole pipeline as one Prefect flow, in one process: each step of dvc.yaml that DVC finds out of date runs as
a task (its step's flow, blocks fanned out on the configured task runner) under one MLflow run, and is recorded in
dvc.lock as `dvc repro` would record it (flows/dvc_stages.py). So `dvc repro` after this flow finds nothing to do, and
this flow after `dvc repro` runs nothing. With overrides (-S) or a preset it is an experiment: the overrides are
applied to params.yaml as `dvc exp run -S` applies them, and the workspace is saved as a DVC experiment.

    python -m flows.pipeline                          # the out-of-date steps of dvc.yaml
    python -m flows.pipeline -S retrain.train.epochs=30   # an experiment (`dvc exp show` lists it)
    python -m flows.pipeline --serve --cron "0 3 * * *"   # a deployment served from this process

With rounds.count > 1 (DNA+) the rounds step of rounds/dvc.yaml follows the default steps (round 1).

A deployment's run (prefect.yaml, --serve) runs only the project that holds this code: whoever can reach the Prefect
API can set a run's parameters.
"""
from __future__ import annotations

import flows.app  # noqa: F401 - first: the environment before Prefect and MLflow read it, and the schema

# isort: split

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml
from prefect import flow, get_run_logger

from dna.config import REMOVED
from dna.errors import ConfigError
from dna.logs import setup_logging
from flows import artifacts, dvc_stages
from flows import steps as table
from flows.entry import check_dvc_params, check_first, load
from flows.prefect_api import start_in_background
from flows.steps import RESULT_SECTIONS, Step, flatten, registration
from flows.tracking import ensure_experiment, nested_under, stage_run, tracking_uri

PROJECT = Path(__file__).resolve().parents[1]  # the project that holds this code


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def without_heartbeats() -> Iterator[None]:
    """Flow runs started inside (in this thread and in the tasks it submits to threads) send no heartbeats: the end of
    every flow run waits for its heartbeat thread, which sleeps in steps of a second, so each took about half a second
    more. The steps' flow runs never need one: they run in the pipeline's process and cannot outlive it. The pipeline
    flow keeps its own when a deployment runs it (Prefect's engine, in a process of its own that a zombie-flow
    automation watches), not when this command line does: its terminal and exit code say whether it ended."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def _has_key(raw: dict, dotted: str) -> bool:
    node = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def dvc_command(overrides: dict[str, Any] | None = None, force: bool = False,
                raw_params: dict | None = None, targets: list[str] | None = None) -> list[str]:
    """The DVC command that does what the flow does: `dvc repro`, or `dvc exp run -S key=value ...` when there are
    overrides (an experiment DVC records); of the given targets (e.g. rounds/dvc.yaml) rather than dvc.yaml. The flow
    applies the same `-S` values (set_values).

    A key that params.yaml does not have yet is passed as `+key=value` (DVC's syntax for adding a key)."""
    cmd = [sys.executable, "-m", "dvc"]
    if overrides:
        cmd += ["exp", "run", *(targets or [])]
        for key, value in overrides.items():
            if key.startswith(REMOVED):  # the preset leaves this key of params.yaml out
                cmd += ["-S", key]
                continue
            text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True,
                                                                       width=float("inf")).strip()  # one line
            text = text.removesuffix("\n...").strip()
            plus = "" if raw_params is None or _has_key(raw_params, key) else "+"
            cmd += ["-S", f"{plus}{key}={text}"]
    else:
        cmd += ["repro", *(targets or [])]
    if force:
        cmd.append("--force")
    return cmd


def set_values(cmd: list[str]) -> list[str]:
    """The `-S` values of a DVC command."""
    return [cmd[i + 1] for i, part in enumerate(cmd) if part == "-S"]


def pipeline_steps(rounds: int, targets: list[str]) -> list[tuple[str, Step]]:
    """The steps in run order, each with its DVC address: dvc.yaml's, a per-target step once per search target
    (`<step>@<target>`), then (rounds.count > 1) rounds/dvc.yaml's."""
    steps = [pair for step in table.STEPS for pair in addresses(step, targets)]
    if rounds > 1:
        steps += [(f"{step.name}/dvc.yaml:{step.name}", step) for step in table.OPTIONAL_STEPS if step.name == "rounds"]
    return steps


def pipeline_files(rounds: int) -> list[str]:
    """The DVC pipeline files the flow runs: dvc.yaml, and with rounds.count > 1 rounds/dvc.yaml."""
    return ["dvc.yaml", "rounds/dvc.yaml"] if rounds > 1 else ["dvc.yaml"]


def addresses(step: Step, targets: list[str]) -> list[tuple[str, Step]]:
    return [(f"{step.name}@{t}", step.at(t)) for t in targets] if step.per_target else [(step.name, step)]


def segments(steps: list[Step]) -> list[list[Step]]:
    """The steps in runs of per-target steps and of the others, in order: a run of per-target steps is each target's
    chain."""
    out: list[list[Step]] = []
    for step in steps:
        if out and out[-1][0].per_target == step.per_target:
            out[-1].append(step)
        else:
            out.append([step])
    return out


def read_metrics(outputs: Path, targets: list[str]) -> dict[str, dict]:
    """Every step's metrics file, by its DVC address (`<step>@<target>` for a per-target step)."""
    out = {}
    for step in table.STEPS:
        for address, at in addresses(step, targets):
            path = outputs / at.metrics if at.metrics else None
            if path is not None and path.is_file():
                out[address] = json.loads(path.read_text())
    return out


def summary_markdown(cmd: list[str], ran: list[str], skipped: list[str], metrics: dict, run_id: str) -> str:
    lines = ["### DNA pipeline", "", f"as `{' '.join(['dvc', *cmd[3:]])}`", "",
             f"ran: {', '.join(ran) or 'nothing (all stages up to date)'}",
             f"up to date: {', '.join(skipped) or '-'}", "", f"MLflow run `{run_id}`", "",
             "| stage | metric | value |", "| --- | --- | --- |"]
    for step in table.STEPS:
        for address, values in metrics.items():
            if address.split("@")[0] == step.name:
                lines += [f"| {address} | {key} | {values[key]} |" for key in step.headline if key in values]
    return "\n".join(lines) + "\n"


def project_root(project_dir: str, deployed: bool) -> Path:
    """project_dir, resolved; for a deployment's run (`deployed`) only the project that holds this code (ConfigError
    for any other folder)."""
    root = Path(project_dir).resolve()
    if deployed and root != PROJECT:
        raise ConfigError(f"project_dir={project_dir!r}: a deployment runs `dvc repro` only in its own project "
                          f"({PROJECT}), not in a folder a run's parameters name")
    return root


def with_preset(root: Path, preset: str | None, overrides: dict[str, Any] | None) -> dict[str, Any] | None:
    """The overrides that make params.yaml the preset (a params file inside the project, which may name its base),
    then the given overrides over them: a preset runs as a DVC experiment."""
    from dna.config import preset_overrides

    if not preset:
        return overrides
    path = (root / preset).resolve()
    if not path.is_relative_to(root):
        raise ConfigError(f"preset={preset!r} is outside the project ({root})")
    with working_directory(root):
        return preset_overrides(path, root / "params.yaml") | (overrides or {}) or None


@flow(name="dna-pipeline")
def pipeline_flow(project_dir: str = ".", overrides: dict[str, Any] | None = None, force: bool = False,
                  preset: str | None = None) -> dict:
    """Run the out-of-date steps of the DVC pipeline in project_dir (every step with force; an experiment when
    overrides or a preset are given, e.g. preset configs/vit.yaml) and report on it; a deployment's run only in the
    project of this code."""
    from prefect.runtime import deployment

    root = project_root(project_dir, deployed=deployment.id is not None)
    overrides = with_preset(root, preset, overrides)
    logger = get_run_logger()
    with working_directory(root):  # fail on a bad config before anything runs or is written
        check_dvc_params("params.yaml", overrides)
        params = load("params.yaml", overrides)
    targets = list(params.search.named_targets())
    steps = pipeline_steps(params.rounds.count, targets)
    cmd = dvc_command(overrides, force, yaml.safe_load((root / "params.yaml").read_text()),
                      pipeline_files(params.rounds.count) if params.rounds.count > 1 else None)
    shown = " ".join(["dvc", *cmd[3:]])
    if overrides:
        dvc_stages.apply_overrides(root, set_values(cmd))
    raw = params.model_dump(mode="json")
    ran, skipped, experiment = [], [], None
    logged = flatten({k: raw[k] for k in RESULT_SECTIONS})
    order = [*table.STEPS, *(s for s in table.OPTIONAL_STEPS if s.name == "rounds" and params.rounds.count > 1)]
    status = dvc_stages.Snapshot(root, pipeline_files(params.rounds.count))
    with working_directory(root), stage_run(params, "pipeline", logged, root=root, active=False) as (mlrun, _), \
            nested_under(mlrun.run_id), without_heartbeats():
        mlrun.tags({"dna.dvc_command": shown})
        for segment in segments(order):
            if segment[0].per_target:  # each target's chain, fanned out
                from flows.targets import run_targets

                done = run_targets(root, segment, params, status, force)
                chained = [a for a, _ in steps if a.split("@")[0] in {s.name for s in segment}]
                ran += [a for a in chained if any(a in did for did in done.values())]
                skipped += [a for a in chained if a not in ran]
                mlrun.tags({"dna.stages_ran": ",".join(ran)})
                continue
            for step in segment:
                address = next(a for a, s in steps if s.name == step.name)
                changes = ["forced"] if force else status.changes(address)
                if not changes:
                    logger.info("step %s is up to date", step.name)
                    skipped.append(step.name)
                    continue
                logger.info("step %s: %s", step.name, "; ".join(changes))
                dvc_stages.remove_outputs(root, address)
                step.flow()("params.yaml", None)
                dvc_stages.record(root, address)
                status.ran()
                ran.append(step.name)
                mlrun.tags({"dna.stages_ran": ",".join(ran)})
        metrics = read_metrics(root / params.outputs, targets)
        if overrides:
            experiment = dvc_stages.save_experiment(root, ["dvc.lock", "rounds/dvc.lock", *(
                f"{params.outputs}/{step.metrics}" for _, step in steps if step.metrics)],
                next((a for a, s in steps if ran and ran[-1] in (a, s.name)), None))
            mlrun.tags({"dna.dvc_experiment": str(experiment)})
        for address, values in metrics.items():  # MLflow names take no "@": a target's are <step>/<target>.<key>
            mlrun.metrics(values, prefix=f"{address.replace('@', '/')}.")
    artifacts.markdown("pipeline-summary", summary_markdown(cmd, ran, skipped, metrics, mlrun.run_id),
                       "what ran, what was up to date, and the headline metrics")
    return {"ran": ran, "skipped": skipped, "metrics": metrics, "mlflow_run_id": mlrun.run_id,
            "experiment": experiment}


def main(argv: list[str] | None = None) -> int:
    from dna.command_gc import settle
    from dna.config import load_params, parse_overrides
    from dna.errors import report as report_error

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project-dir", default=".", help="the DVC project (default: here)")
    parser.add_argument("--set", "-S", dest="sets", action="append", metavar="KEY=VALUE",
                        help="run as a DVC experiment with this params.yaml override (repeatable)")
    parser.add_argument("--preset", default=None, metavar="FILE",
                        help="run a preset (e.g. configs/vit.yaml) as a DVC experiment: its differences from "
                             "params.yaml as overrides, then --set")
    parser.add_argument("--force", action="store_true", help="rerun every stage")
    parser.add_argument("--serve", action="store_true", help="serve a deployment of this flow instead of running it")
    parser.add_argument("--name", default="dna-pipeline-served", help="deployment name with --serve")
    parser.add_argument("--cron", default=None, help="cron schedule with --serve, e.g. '0 3 * * *'")
    args = parser.parse_args(argv)
    setup_logging()
    if args.serve:
        try:
            root = project_root(args.project_dir, deployed=True)
        except ConfigError as exc:
            return report_error(exc)
        settle()  # a long-lived process
        pipeline_flow.serve(name=args.name, cron=args.cron, parameters={"project_dir": str(root)})
        return 0
    root = Path(args.project_dir).resolve()
    try:
        overrides = with_preset(root, args.preset, parse_overrides(args.sets) or None)
        if not overrides and not args.force and up_to_date(root):
            try:
                text = report(root, {"ran": [], "skipped": [], "metrics": None, "mlflow_run_id": None})
            except ValueError:  # a setting the report reads is broken: the full run below explains it
                text = None
            if text is not None:
                print("dvc status: every stage is up to date; nothing to run (no Prefect flow run, no MLflow run)")
                print(text)
                return 0
        with working_directory(root):  # a wrong key stops here, before anything starts
            check_dvc_params("params.yaml", overrides)
            load_params("params.yaml", overrides, deep=False)
        server_ready = start_in_background()  # Prefect's temporary server starts while the checks below run
        with working_directory(root):  # the whole config, the MLflow store
            check_first(None, "params.yaml", overrides)
            params = load_params("params.yaml", overrides, deep=False)
            ensure_experiment(tracking_uri(params, root), params.mlflow.experiment, root)
        server_ready()
        settle()
        with without_heartbeats():
            result = pipeline_flow(str(root), overrides, args.force)  # the preset is in the overrides
    except Exception as exc:
        return report_error(exc)
    finally:
        dvc_stages.taken.clear()
    print(report(root, result))
    return 0


def target_names(raw: dict) -> list[str]:
    """The search targets of a raw params file (search.budgets alone: the one target `default`), without the
    schema's checks."""
    from dna.paths import DEFAULT_TARGET

    return list((raw.get("search") or {}).get("targets") or {}) or [DEFAULT_TARGET]


def up_to_date(root: Path) -> bool:
    """Whether DVC finds every step up to date: a second's check before Prefect or MLflow start (never without a
    dvc.lock: nothing has run)."""
    if not (root / "dvc.lock").is_file():
        return False
    raw = yaml.safe_load((root / "params.yaml").read_text()) or {}
    files = pipeline_files((raw.get("rounds") or {}).get("count", 1))
    try:
        found = dvc_stages.stale(root, files)
    except Exception:  # noqa: BLE001 - anything DVC cannot read: the full run says what is wrong
        return False
    dvc_stages.taken[(str(root), tuple(files))] = found  # the flow this command starts next takes it over
    return not found


def target_lines(p, metrics: dict, model_names: dict[str, str]) -> list[str]:
    """Per search target: its budgets and network (search/targets.csv), its accuracy in ONNX Runtime and parity, and
    its registry decision."""
    import csv

    from dna.stages import accuracy_line

    if not p.targets_table.is_file():
        return []
    with p.targets_table.open(newline="") as f:
        rows = list(csv.DictReader(f))
    lines = []
    for r in rows:
        t = r["target"]
        budgets = ", ".join(f"{k.removeprefix('budget_')} <= {float(v):,.0f}" for k, v in r.items()
                            if k.startswith("budget_") and v)
        shared = f", the network of {r['same_as']}" if r.get("same_as") and r["same_as"] != t else ""
        lines.append(f"target {t} ({budgets or 'no budget'}): rating {float(r['score']):.4f}, "
                     f"{float(r['params']):,.0f} parameters, {float(r['macs']):,.0f} multiply-adds{shared}")
        export, registered = metrics.get(f"export@{t}"), metrics.get(f"register@{t}")
        if export and "teacher" in metrics:
            lines.append(f"  {accuracy_line(metrics['teacher'], export)}; ONNX parity max |diff| "
                         f"{export['max_abs_diff']:.2e}")
        if registered:
            lines.append(f"  registry: {model_names[t]} version {registered.get('version')}, champion is version "
                         f"{registered.get('champion')} ({registered.get('reason')})")
    return lines


def report(root: Path, result: dict) -> str:
    """Where every output went, and the headline figures of every target, for the end of a run."""
    from dna.paths import Paths
    from dna.rounds import summary_rows
    from flows.registry import model_name
    from flows.settings import TrackingConfig

    # only the few keys a report needs, without the whole schema's checks (they import timm: seconds); the
    # config was checked in full by the run that made these results
    raw = yaml.safe_load((root / "params.yaml").read_text()) or {}
    mlflow_cfg = TrackingConfig.model_validate(raw.get("mlflow") or {})
    params = SimpleNamespace(outputs=str(raw.get("outputs", "outputs")), mlflow=mlflow_cfg)  # no schema defaults:
    # constructing them loads the supervisions, which import torch
    targets = target_names(raw)
    p = Paths(root / params.outputs, targets[0])
    m = result["metrics"] if result["metrics"] is not None else read_metrics(p.root, targets)
    lines = [f"stages run: {', '.join(result['ran']) or 'none (everything up to date)'}", "outputs:"]
    for step in table.STEPS:
        for address, at in addresses(step, targets):
            files = at.outputs + ((at.metrics,) if at.metrics else ())
            lines.append(f"  {address:<8} " + "  ".join(os.path.relpath(p.root / f, root) for f in files))
    run_id = result["mlflow_run_id"]
    lines.append(f"  mlflow   {tracking_uri(params, root)}" + (f" (parent run {run_id})" if run_id else ""))
    lines += target_lines(p, m, {t: model_name(params.mlflow.registered_model, t) for t in targets})
    for row in summary_rows(p.root):  # DNA+: every round registered its first target's network
        registered = registration(Paths(root / row["outputs"], targets[0]))
        version = json.loads(registered.read_text()).get("version") if registered.is_file() else None
        lines.append(f"round {row['round']}: teacher {row['teacher']} ({row['teacher_test_accuracy']:.4f}), network "
                     f"found {row['test_accuracy']:.4f} (ONNX {row['onnx_test_accuracy']:.4f}), "
                     f"{row['params']:,} parameters, {row['macs']:,} multiply-adds, registry version {version}")
    return "\n".join(lines)

if __name__ == "__main__":
    from dna.command_gc import start

    start()
    raise SystemExit(main())
