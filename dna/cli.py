"""The `dna` command: one subcommand per stage (from the stage table, dna.stages), `dna run` for all of them in
order, and tools to inspect spaces and architectures. Commands of other packages (e.g. `dna promote` of the model
registry) join through the `dna.commands` entry points."""
from __future__ import annotations

import functools
import inspect
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dna.config import Params, load_params, parse_overrides
from dna.errors import ConfigError
from dna.stages import STAGES, Stage, accuracy_line, checks, default_stages, run_stage, step_keys

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
arch_app = typer.Typer(no_args_is_help=True, help="Inspect architecture files.")
app.add_typer(arch_app, name="arch")
console = Console(stderr=True)

ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="params file")
SetOpt = typer.Option(None, "--set", "-S", help="override a key, e.g. -S retrain.train.epochs=5")
BlockOpt = typer.Option(None, "--block", "-b", help="only this block (default: all)")
TargetOpt = typer.Option(None, "--target", "-t", help="only this search target (default: all, in order)")
NprocOpt = typer.Option(1, "--nproc", min=1, help="train in N processes on this machine (torchrun, one GPU each on "
                        "CUDA); batch sizes stay global")


def _load(params_file: Path, sets: list[str] | None, deep: bool = True, check_profile: bool = True,
          stage: Stage | None = None) -> Params:
    """The config, checked before any work: for a stage, what its step reads (the data stage imports no timm). The
    command's work begins after it (dna.command_gc.settle)."""
    from dna.checks import validate
    from dna.command_gc import settle

    flags = checks(step_keys(stage), stage.makes_profile) if stage else {"check_profile": check_profile}
    params = load_params(params_file, parse_overrides(sets), deep=flags.get("models", True), check_paths=deep)
    if deep:
        validate(params, **flags)
    settle()
    return params


def guarded(fn):
    """Set up logging; turn an error of the exit-code policy (dna/errors.py) into one line and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from dna.logs import setup_logging

        setup_logging()
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            from dna.errors import exit_code

            code = exit_code(exc)
            if code is None:
                raise
            console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
            raise typer.Exit(code) from None
    return wrapper


def _blocks(run, block: Optional[int]) -> list[int]:
    if block is None:
        return list(range(run.space.num_blocks))
    if not 0 <= block < run.space.num_blocks:
        raise ConfigError(f"--block {block}: the space has blocks 0..{run.space.num_blocks - 1}")
    return [block]


def _targets(cfg: Params, target: Optional[str]) -> list[str]:
    names = list(cfg.search.named_targets())
    if target is None:
        return names
    if target not in names:
        raise ConfigError(f"--target {target}: the search targets are {', '.join(names)}")
    return [target]


def _show(stage: Stage, run, result) -> str:
    if stage.per_block and hasattr(result, "columns"):  # a rating table
        block = int(result["block"].iloc[0])
        return f"block {block}: {len(result)} rows, best score {result['score'].min():.4f} -> {run.paths.rating(block)}"
    if isinstance(result, dict):
        return str({k: v for k, v in result.items() if not isinstance(v, dict)})
    return str(result)


def _stage_command(stage: Stage):
    """The stage's `dna <stage>` command: --params and -S, --block for a per-block stage, --nproc for a stage that
    trains data-parallel."""
    def command(params: Path, set_: list[str] | None, block: Optional[int] = None, nproc: int = 1,
                target: Optional[str] = None):
        cfg = _load(params, set_, stage=stage)
        targets = _targets(cfg, target) if stage.per_target else None
        if nproc > 1:
            _exec_torchrun(stage, params, set_ or [], block, nproc, target)
        run = stage.load_context()(cfg)
        blocks = _blocks(run, block) if stage.per_block else None
        from dna.ddp import is_main, process_group

        with process_group(run.device):
            for result in run_stage(stage, run, blocks, targets):
                if is_main():
                    console.print(_show(stage, run, result), soft_wrap=True, markup=False, highlight=False)

    options = [("params", Path, ParamsOpt), ("set_", list[str], SetOpt)]
    if stage.per_block:
        options.append(("block", Optional[int], BlockOpt))
    if stage.per_target:
        options.append(("target", Optional[str], TargetOpt))
    if stage.data_parallel:
        options.append(("nproc", int, NprocOpt))
    command.__signature__ = inspect.Signature([inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                                                 default=default, annotation=annotation)
                                               for name, annotation, default in options])
    command.__doc__ = stage.help
    return command


def _exec_torchrun(stage: Stage, params: Path, sets: list[str], block: Optional[int], nproc: int,
                   target: Optional[str] = None) -> None:
    """Replace this process by torchrun running the same command in `nproc` processes (once the config is checked:
    a wrong key stops here, before any process starts)."""
    import logging
    import os

    from dna.ddp import launched, shown, stage_command

    if launched():
        raise ConfigError(f"--nproc {nproc}: this process is already one of {os.environ['WORLD_SIZE']} that torchrun "
                          "started; leave --nproc out under torchrun")
    command = stage_command(stage.name, nproc, params, sets, block, target)
    logging.getLogger("dna.cli").info("%s in %d processes: %s", stage.name, nproc, shown(command))
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execv(command[0], command)


for _stage in STAGES:
    app.command(_stage.name)(guarded(_stage_command(_stage)))


def run_all(params: Path = ParamsOpt, set_: list[str] = SetOpt):
    from dna.rounds import each_round, run_stages, write_summary

    cfg = _load(params, set_, check_profile=False)  # the profile is made on the way, before the search
    count = cfg.rounds.count

    def run_and_report(config, round_: int) -> None:
        _report(*run_stages(config, round_), f"round {round_} of {count}" if count > 1 else "")

    each_round(cfg, run_and_report, first=1)
    if count > 1:
        _report_rounds(write_summary(cfg), Path(cfg.outputs))


run_all.__doc__ = ("All stages in order: " + ", ".join(s.name for s in default_stages()) + "; with rounds.count > 1 "
                   "(DNA+), all of them once per round, each round's teacher the network the round before found.")
app.command("run")(guarded(run_all))


def _report(run, times: dict, heading: str = "") -> None:
    import json

    out = Console(soft_wrap=True)
    out.print(f"[bold]dna run{': ' + heading if heading else ''}: where everything went[/]")
    metrics, targets = {}, list(run.params.search.named_targets())
    for stage in default_stages():
        shown = {t: stage.at(t) for t in targets} if stage.per_target else {None: stage}
        files = "  ".join(str(run.paths.root / f) for s in shown.values() for f in s.files()
                          if (run.paths.root / f).exists())
        out.print(f"  {stage.name:<8} {times.get(stage.name, 0):6.1f} s  {files}", markup=False, highlight=False)
        metrics |= {(stage.name, t): json.loads((run.paths.root / s.metrics).read_text())
                    for t, s in shown.items() if s.metrics}
    for target in targets:
        retrain, export = metrics["retrain", target], metrics["export", target]
        out.print(f"target {target}: {accuracy_line(metrics['teacher', None], export)}, {retrain['params']:,} "
                  f"parameters, {retrain['macs']:,} multiply-adds; ONNX parity max |diff| {export['max_abs_diff']:.2e}")


def _report_rounds(rows: list[dict], outputs: Path) -> None:
    table = Table(title=f"rounds ({outputs / 'rounds.json'})")
    for column in ("round", "teacher", "teacher accuracy", "searched network accuracy", "ONNX accuracy",
                   "parameters", "multiply-adds"):
        table.add_column(column)
    for row in rows:
        table.add_row(str(row["round"]), escape(str(row["teacher"])), f"{row['teacher_test_accuracy']:.4f}",
                      f"{row['test_accuracy']:.4f}", f"{row['onnx_test_accuracy']:.4f}", f"{row['params']:,}",
                      f"{row['macs']:,}")
    Console(soft_wrap=True).print(table)


def _add_plugins() -> None:
    """What other installed packages add: their set-up of the process (entry points of the group `dna.setup`, each a
    function called first, such as the pipeline's environment defaults), sections of params.yaml (`dna.sections`,
    such as the pipeline's tracking and orchestration settings) and commands (`dna.commands`, each a function)."""
    from dna.config import use_sections

    for entry in entry_points(group="dna.setup"):
        entry.load()()
    use_sections({entry.name: entry.load() for entry in entry_points(group="dna.sections")})
    for entry in entry_points(group="dna.commands"):
        app.command(entry.name)(guarded(entry.load()))


def _space(cfg: Params):
    """The configured space, with the class count of the data (or data.num_classes when the data is not here)."""
    from dna.data import class_count
    from dna.paths import Paths
    from dna.spaces import build_space

    num_classes = class_count(cfg.data, Paths(cfg.out_dir).splits)
    return build_space(cfg.space, cfg.data.channels, cfg.data.image_size, num_classes)


@app.command()
@guarded
def space(params: Path = ParamsOpt, set_: list[str] = SetOpt):
    """Per block: its cells, candidates per cell and per block, and the size of the whole space."""
    cfg = _load(params, set_, deep=False)
    s = _space(cfg)
    table = Table(title=f"search space ({len(s.ops)} ops per layer)")
    for col in ("block", "stride", "cells (depth x width [stride at layer]: candidates)", "candidates"):
        table.add_column(col)
    for b in range(s.num_blocks):
        cells = ", ".join(f"{c.depth}x{c.width}{f' @{c.down}' if c.down else ''}: "
                          f"{sum(1 for _ in s.candidates(c)):,}" for c in s.cells(b))
        table.add_row(str(b), str(cfg.space.blocks[b].stride), cells, f"{s.block_size(b):,}")
    Console().print(table)
    size = s.size()
    Console().print(f"whole space: {size:,} networks ({float(size):.2e})")
    if any(t.budgets() for t in cfg.search.named_targets().values()):
        Console().print(_targets_table(cfg, s))


def _targets_table(cfg: Params, s) -> Table:
    """Each target's network from the exact search over the run's ratings, or, before any rating, over a synthetic
    one (every candidate's score falls with its multiply-adds, with noise), and the time the search took."""
    import time

    import numpy as np

    from dna.cost_tables import stage_tables
    from dna.paths import Paths
    from dna.search import BudgetError, best_under
    from dna.spaces.base import Candidates

    paths = Paths(cfg.out_dir)
    rated = all(paths.rating(b).is_file() for b in range(s.num_blocks))
    if rated:
        import pandas as pd

        ratings = [Candidates.from_frame(pd.read_csv(paths.rating(b), dtype={"path": str}))
                   for b in range(s.num_blocks)]
    else:
        rng = np.random.default_rng(cfg.seed)  # noise as a real rating has: exactly monotone, every network would be
        # on the Pareto front (the exact search's worst case, a minute on the paper's space)
        ratings = [t.with_scores(-np.log1p(t.macs) + rng.normal(0, 0.05, len(t.macs)))
                   for t in (s.candidate_table(b) for b in range(s.num_blocks))]
    costs = [t.costs() for t in stage_tables(s, ratings)]
    table = Table(title=f"targets, on {'the run' if rated else 'a synthetic'} rating")
    for col in ("target", "budgets", "params", "macs", "search"):
        table.add_column(col)
    for name, target in cfg.search.named_targets().items():
        budgets = {k: v for k, v in target.budgets().items() if k != "latency_ms"}  # latency needs a profile
        start = time.perf_counter()
        try:
            best = best_under(costs, budgets)
        except BudgetError as exc:
            table.add_row(name, str(budgets), "-", "-", str(exc))
            continue
        table.add_row(name, ", ".join(f"{k} {v:,.0f}" for k, v in budgets.items()), f"{best.costs['params']:,.0f}",
                      f"{best.costs['macs']:,.0f}", f"{time.perf_counter() - start:.3f} s")
    return table


@app.command("device-kit")
@guarded
def device_kit(directory: Path = typer.Argument(..., help="a new or empty folder to write the kit into"),
               params: Path = ParamsOpt, set_: list[str] = SetOpt):
    """What a device must time to profile the space there (ONNX pieces and time_pieces.py, which needs only
    onnxruntime and numpy): run it on the device and name its latency.csv as a target's latency_profile."""
    from dna.latency import write_device_kit

    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ConfigError(f"{directory}: exists and is not an empty folder; name a new one")
    cfg = _load(params, set_, deep=False)
    script = write_device_kit(_space(cfg), cfg.profile.batch_size, directory)
    Console().print(f"{directory}: {len(list((directory / 'pieces').iterdir()))} pieces. Copy the folder to the "
                    f"device and run there:\n  python {script.name} --threads {cfg.profile.threads}\nthen bring back "
                    "latency.csv and profile.json and set search.targets.<name>.latency_profile to that latency.csv",
                    soft_wrap=True, highlight=False, markup=False)


@app.command("params")
@guarded
def params_command(preset: Path = typer.Argument(..., help="a params file or a preset (configs/*.yaml)"),
                   against: Optional[Path] = typer.Option(None, "--against",
                                                          help="print only what differs from this params file")):
    """A preset resolved over its base and checked, as a whole params file (`dna params configs/vit.yaml >
    params.yaml`), or, with --against, the keys that differ from another one (what `dvc exp run -S` would set)."""
    import yaml

    from dna.config import preset_overrides, read_params

    _load(preset, None, deep=False)
    raw = read_params(preset) if against is None else preset_overrides(preset, against)
    sys.stdout.write(yaml.safe_dump(raw, sort_keys=False, default_flow_style=None if against is None else False,
                                    width=120))


@arch_app.command("cost")
@guarded
def arch_cost(arch_file: Path = typer.Argument(..., help="architecture YAML (stem, head, arch)"),
              params: Path = ParamsOpt, set_: list[str] = SetOpt):
    """Parameters and multiply-adds of an architecture, and whether it belongs to the configured space."""
    from dna.arch import Arch, count_cost

    cfg = _load(params, set_, deep=False)
    try:
        arch = Arch.load(arch_file)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{arch_file}: {exc}") from None
    space = _space(cfg)
    model = space.build(arch)
    n, macs, _ = count_cost(model, (1, cfg.data.channels, cfg.data.image_size, cfg.data.image_size))
    Console().print(f"{arch_file}: {n:,} parameters, {macs:,} multiply-adds at {cfg.data.channels}x"
                    f"{cfg.data.image_size}x{cfg.data.image_size} ({space.num_classes} classes)", soft_wrap=True)
    answer = space.membership(arch)
    member = all(inside for inside, _ in answer)
    Console().print(("member of" if member else "not in") + " the configured search space:", highlight=False)
    for inside, why in answer:
        Console().print(f"  {'ok ' if inside else 'NO '} {why}", highlight=False, markup=False, soft_wrap=True)
    if not member:
        raise typer.Exit(1)


_add_plugins()


def main() -> None:  # pragma: no cover
    """The `dna` command (its console script)."""
    from dna.command_gc import start

    start()
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
