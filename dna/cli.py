"""The `dna` command: one subcommand per stage, `dna run` for all of them, and tools to inspect spaces and archs."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from dna.config import ConfigError, Params, detected_faults, load_params, parse_overrides

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
arch_app = typer.Typer(no_args_is_help=True, help="Inspect architecture files.")
app.add_typer(arch_app, name="arch")
console = Console(stderr=True)

ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="params file")
SetOpt = typer.Option(None, "--set", "-S", help="override a key, e.g. -S retrain.train.epochs=5")
BlockOpt = typer.Option(None, "--block", "-b", help="only this block (default: all)")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(params_file: Path, sets: list[str] | None, deep: bool = True, check_profile: bool = True) -> Params:
    from dna.pipeline import validate

    params = load_params(params_file, parse_overrides(sets), check_paths=deep)
    if deep:
        validate(params, check_profile=check_profile)
    return params


def _guard(fn):
    """Turn a configuration error into one line and exit code 2, and a detected fault
    (corrupt checkpoint, diverging loss, failed ONNX parity, missing input of a stage) into one line and exit code 1."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _setup_logging()
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
            raise typer.Exit(2) from None
        except Exception as exc:
            if not isinstance(exc, detected_faults()):
                raise
            console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
            raise typer.Exit(1) from None
    return wrapper


def _run(params: Params):
    from dna.pipeline import Run

    return Run(params)


def _blocks(run, block: Optional[int]) -> list[int]:
    if block is None:
        return list(range(run.space.num_blocks))
    if not 0 <= block < run.space.num_blocks:
        raise ConfigError(f"--block {block}: the space has blocks 0..{run.space.num_blocks - 1}")
    return [block]


@app.command()
@_guard
def data(params: Path = ParamsOpt, set_: list[str] = SetOpt):
    """Make the fixed train / rate / test splits."""
    from dna.pipeline import stage_data

    stage_data(_run(_load(params, set_)))


@app.command()
@_guard
def teacher(params: Path = ParamsOpt, set_: list[str] = SetOpt):
    """Train, download or load the teacher; report its test accuracy."""
    from dna.pipeline import stage_teacher

    console.print(stage_teacher(_run(_load(params, set_))))


@app.command()
@_guard
def distill(params: Path = ParamsOpt, set_: list[str] = SetOpt, block: Optional[int] = BlockOpt):
    """Train each block's supernet on the teacher's features (resumes from the last epoch)."""
    from dna.pipeline import stage_distill, stage_features

    run = _run(_load(params, set_))
    stage_features(run)
    for b in _blocks(run, block):
        console.print(stage_distill(run, b))


@app.command()
@_guard
def rate(params: Path = ParamsOpt, set_: list[str] = SetOpt, block: Optional[int] = BlockOpt):
    """Rate every candidate of every cell of each block."""
    from dna.pipeline import stage_rate

    run = _run(_load(params, set_))
    for b in _blocks(run, block):
        table = stage_rate(run, b)
        console.print(f"block {b}: {len(table)} rows, best score {table['score'].min():.4f} -> {run.paths.rating(b)}")


@app.command()
@_guard
def search(params: Path = ParamsOpt, set_: list[str] = SetOpt):
    """Choose the best architecture under the budgets and compute the Pareto front."""
    from dna.pipeline import stage_search

    metrics = stage_search(_run(_load(params, set_)))
    console.print({k: v for k, v in metrics.items() if k != "ratings"})


@app.command()
@_guard
def profile(params: Path = ParamsOpt, set_: list[str] = SetOpt):
    """Time every candidate layer, the stem and the head in ONNX Runtime on this machine (for latency budgets)."""
    from dna.pipeline import stage_profile

    console.print(stage_profile(_run(_load(params, set_, check_profile=False))))


@app.command()
@_guard
def retrain(params: Path = ParamsOpt, set_: list[str] = SetOpt):
    """Train the chosen architecture (from scratch, or from the supernet's weights; optionally with KD)."""
    from dna.pipeline import stage_retrain

    console.print(stage_retrain(_run(_load(params, set_))))


@app.command()
@_guard
def export(params: Path = ParamsOpt, set_: list[str] = SetOpt):
    """Export the retrained network to ONNX and check it against PyTorch."""
    from dna.pipeline import stage_export

    console.print(stage_export(_run(_load(params, set_))))


@app.command("run")
@_guard
def run_all(params: Path = ParamsOpt, set_: list[str] = SetOpt):
    """All stages in order: data, profile, teacher, distill, rate, search, retrain, export."""
    from dna import pipeline as P

    run = _run(_load(params, set_, check_profile=False))  # the profile is made here, before the search reads it
    times = {}

    def timed(name, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        times[name] = times.get(name, 0.0) + time.perf_counter() - start
        return out

    timed("data", P.stage_data, run)
    timed("profile", P.stage_profile, run)
    teacher_metrics = timed("teacher", P.stage_teacher, run)
    timed("distill", P.stage_features, run)
    for b in range(run.space.num_blocks):
        timed("distill", P.stage_distill, run, b)
    for b in range(run.space.num_blocks):
        timed("rate", P.stage_rate, run, b)
    timed("search", P.stage_search, run)
    retrain_metrics = timed("retrain", P.stage_retrain, run)
    export_metrics = timed("export", P.stage_export, run)
    _report(run, teacher_metrics, retrain_metrics, export_metrics, times)


def _report(run, teacher_metrics: dict, retrain_metrics: dict, export_metrics: dict, times: dict) -> None:
    p = run.paths
    rows = {"data": [p.splits], "profile": [p.latency], "teacher": [p.teacher, p.teacher_dir / "metrics.json"],
            "distill": [p.distill_dir], "rate": [p.ratings_dir],
            "search": [p.arch, p.search_dir / "front.csv", p.search_dir / "front.png"],
            "retrain": [p.model, p.retrain_dir / "metrics.json"], "export": [p.onnx, p.export_dir / "metrics.json"]}
    out = Console(soft_wrap=True)
    out.print("[bold]dna run: where everything went[/]")
    for stage, files in rows.items():
        out.print(f"  {stage:<8} {times.get(stage, 0):6.1f} s  " + "  ".join(str(f) for f in files))
    gap = (export_metrics["onnx_test_accuracy"] - teacher_metrics["test_accuracy"]) * 100
    out.print(
        f"teacher test accuracy {teacher_metrics['test_accuracy']:.4f}; exported network (ONNX Runtime) "
        f"{export_metrics['onnx_test_accuracy']:.4f} ({gap:+.2f} points against the teacher), "
        f"{retrain_metrics['params']:,} parameters, {retrain_metrics['macs']:,} multiply-adds; "
        f"ONNX parity max |diff| {export_metrics['max_abs_diff']:.2e}")


@app.command()
@_guard
def promote(params: Path = ParamsOpt, version: Optional[int] = typer.Option(
        None, "--version", "-v", help="registered version (default: the newest)"),
        withdraw: Optional[int] = typer.Option(
            None, "--withdraw", metavar="VERSION", help="take a version out of the running for champion (rollback)")):
    """Alias a registered version `challenger`; move `champion` to it if it passes ONNX parity and beats the
    champion."""
    from flows.registry import promote_cli

    raise typer.Exit(promote_cli(params, version, withdraw))


def _space(cfg: Params):
    """The configured space, with the class count of the data (or data.num_classes when the data is not here)."""
    from dna.data import class_count
    from dna.paths import Paths
    from dna.spaces import build_space

    num_classes = class_count(cfg.data, Paths(cfg.out_dir).splits)
    return build_space(cfg.space, cfg.data.channels, cfg.data.image_size, num_classes)


@app.command()
@_guard
def space(params: Path = ParamsOpt, set_: list[str] = SetOpt):
    """Per block: its cells, candidates per cell and per block, and the size of the whole space."""
    cfg = _load(params, set_, deep=False)
    s = _space(cfg)
    table = Table(title=f"search space ({len(cfg.space.ops)} ops per layer)")
    for col in ("block", "stride", "cells (depth x width: candidates)", "candidates"):
        table.add_column(col)
    for b in range(s.num_blocks):
        cells = ", ".join(f"{c.depth}x{c.width}: {len(s.ops) ** c.depth:,}" for c in s.cells(b))
        table.add_row(str(b), str(cfg.space.blocks[b].stride), cells, f"{s.block_size(b):,}")
    Console().print(table)
    size = s.size()
    Console().print(f"whole space: {size:,} networks ({float(size):.2e})")


@arch_app.command("cost")
@_guard
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
    model = arch.build(space.num_classes, cfg.data.channels)
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


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
