"""Whole-pipeline cost: `dna run` from nothing on the default params, and the fixed costs every command pays.

    python -m benchmarks.pipeline_cost                 # import times, then one cold `dna run`
    python -m benchmarks.pipeline_cost --skip run      # import times and the collector's share only

Import times are measured in fresh interpreters (median of --repeats), each module alone, so shared dependencies
count in each. A cold `dna run` starts from an empty outputs folder (a temporary one) in a fresh process; its
per-stage times are the ones `dna run` prints, and the whole command's wall time is measured here.

The collector's share (dna/command_gc.py): a fresh process imports what the pipeline's command imports and ends,
with Python's default collection and as a command runs (collection off while it imports, the imports frozen after,
no last pass at exit), the two taking turns; the ratio of their medians.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import load_average

MODULES = ["torch", "timm", "onnxruntime", "onnx", "pandas", "sklearn", "pydantic", "typer",
           "dna.cli", "dna.pipeline", "prefect", "mlflow"]
CLI = [sys.executable, "-m", "dna.cli"]
ENV = {"SCIKIT_LEARN_DATA": str(Path(tempfile.gettempdir()) / "dna-sklearn-data"), "MLFLOW_DISABLE_TELEMETRY": "true",
       "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def import_seconds(module: str) -> float | None:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **ENV})
    return float(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None


def command_seconds(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, capture_output=True, env={**os.environ, **ENV}, check=True)
    return time.perf_counter() - start


def imports(repeats: int) -> None:
    print(f"fixed costs (fresh interpreter each time, median of {repeats}):")
    base = statistics.median(command_seconds([sys.executable, "-c", "pass"]) for _ in range(repeats))
    print(f"  {'python startup (python -c pass)':<40} {base:6.2f} s")
    for module in MODULES:
        got = [import_seconds(module) for _ in range(repeats)]
        if None in got:
            print(f"  {'import ' + module:<40} not installed")
            continue
        runs = ", ".join(f"{g:.2f}" for g in got)
        print(f"  {'import ' + module:<40} {statistics.median(got):6.2f} s  (runs: {runs})")
    for label, args in (("dna --help", [*CLI, "--help"]), ("dna space (params.yaml)", [*CLI, "space"])):
        t = statistics.median(command_seconds(args) for _ in range(repeats))
        print(f"  {label:<40} {t:6.2f} s (whole command)")


PIPELINE_IMPORTS = ("flows.pipeline", "torch", "timm", "sklearn.datasets", "mlflow.store.tracking.sqlalchemy_store",
                    "dvc.repo", "onnx", "onnxruntime", "matplotlib.pyplot")


def collector(repeats: int) -> None:
    """A process that imports the pipeline command's libraries and ends, without and with dna.command_gc."""
    body = "; ".join(f"import {m}" for m in PIPELINE_IMPORTS)
    cases = {"default collection": body,
             "as a command (dna.command_gc)": f"from dna.command_gc import settle, start; start(); {body}; settle()"}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, code in cases.items():
            times[name].append(command_seconds([sys.executable, "-c", code]))
    print(f"a process that imports the pipeline's libraries and ends (interleaved, median of {repeats}):")
    for name, got in times.items():
        print(f"  {name:<40} {statistics.median(got):6.2f} s  (runs: {', '.join(f'{g:.2f}' for g in got)})")
    plain, command = (statistics.median(got) for got in times.values())
    print(f"  as a command / default: {command / plain:.2f}x ({plain - command:.2f} s less)")


def cold_run(params: str) -> None:
    root = Path(tempfile.mkdtemp(prefix="cold-run-"))
    print(f"cold `dna run` on {params} (outputs in {root}):")
    start = time.perf_counter()
    done = subprocess.run([*CLI, "run", "--params", params, "-S", f"outputs={root}"],
                          capture_output=True, text=True, env={**os.environ, **ENV, "COLUMNS": "200"})
    took = time.perf_counter() - start
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:])
        raise SystemExit(f"dna run failed (exit {done.returncode})")
    stages = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\s+(\w+)\s+([\d.]+) s ", done.stdout, re.M)}
    for stage, seconds in stages.items():
        print(f"  {stage:<10} {seconds:7.1f} s  ({seconds / took:.0%})")
    rest = took - sum(stages.values())
    print(f"  {'other':<10} {rest:7.1f} s  ({rest / took:.0%}: start-up, imports, validation, report)")
    print(f"  {'total':<10} {took:7.1f} s wall")
    summary = [line for line in done.stdout.splitlines() if line.startswith("teacher test accuracy")]
    if summary:
        print("  " + summary[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip", nargs="*", default=[], choices=["imports", "collector", "run"])
    args = ap.parse_args()
    print(load_average())
    if "imports" not in args.skip:
        imports(args.repeats)
    if "collector" not in args.skip:
        collector(args.repeats)
    if "run" not in args.skip:
        cold_run(args.params)
    print(load_average())


if __name__ == "__main__":
    main()
