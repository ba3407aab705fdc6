"""The whole pipeline as `make run` runs it: the pipeline flow (`python -m flows.pipeline`: every step DVC finds out
of date as a task in one process, recorded in dvc.lock), cold, then again with nothing changed; plain `dvc repro` of
the same repository (every step its plain `dna` commands), which finds nothing to do; one stage with nearly no work
through DVC (`dvc repro --force --single-item data`: `dna data`); and a changed retraining parameter through the
flow (`-S retrain.train.lr=...`: every target's retrain, export and register rerun, then figures, saved as a DVC
experiment); a search target added to the finished run (only its chain and the search run); and the same project
with its first search target only, cold, against the targets it has (their cost against one target's).

    python -m benchmarks.pipeline_repro                      # params.yaml in a fresh git + DVC repository
    python -m benchmarks.pipeline_repro --params configs/x.yaml --keep
    python -m benchmarks.pipeline_repro --repo /tmp/bench-repro-x/project --skip cold noop   # a kept repository

The project (dvc.yaml, params, dna/, flows/) is copied to a temporary git + DVC repository with an empty Prefect
home and MLflow store, so nothing is cached. Where the time goes, from the steps' MLflow runs: each step's own work
(its run's start to end), before the first step (imports, the temporary Prefect server, DVC reading the pipeline),
and around the steps (DVC's status, removal and commit of each, Prefect's flow runs).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import load_average

ROOT = Path(__file__).resolve().parents[1]
RUNNING = re.compile(r"Running stage '([^']+)'")
NOTHING = "every stage is up to date; nothing to run"
COLD_TARGET_S, NOOP_TARGET_S = 360.0, 10.0
COLD_RATIO_TARGET, LONE_DATA_TARGET_S, RETRAIN_FIXED_TARGET_S = 1.5, 5.0, 15.0
NEW_TARGET_FIXED_S, TARGETS_RATIO_TARGET = 15.0, 1.3  # beyond the new target's retraining; all targets / the first


def make_repo(params: Path, home: Path) -> Path:
    repo = home / "project"
    repo.mkdir()
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copy(params, repo / "params.yaml")
    for name in ("dna", "flows"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "bench@example.invalid"],
                ["git", "config", "user.name", "bench"], [sys.executable, "-m", "dvc", "init", "-q"],
                [sys.executable, "-m", "dvc", "config", "core.analytics", "false"], ["git", "add", "-A"],
                ["git", "commit", "-q", "-m", "benchmark project"]):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
    return repo


def environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    return env | {"PREFECT_HOME": str(home / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                  "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "MLFLOW_DISABLE_TELEMETRY": "true",
                  "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1",
                  "SCIKIT_LEARN_DATA": str(Path(tempfile.gettempdir()) / "dna-sklearn-data"),
                  "MPLCONFIGDIR": str(home / "matplotlib"), "XDG_CACHE_HOME": str(home / "cache"),
                  "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}


def timed_lines(cmd: list[str], cwd: Path, env: dict) -> tuple[float, list[tuple[float, str]], int]:
    """Run cmd; every output line with the seconds since the start at which it arrived."""
    start = time.perf_counter()
    lines = []
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1, errors="replace") as proc:
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line.rstrip()))
    return time.perf_counter() - start, lines, proc.returncode


def steps_from(first: str, targets: list[str]) -> list[str]:
    """The pipeline's steps from `first` on (what a change that enters there reruns), a per-target step once per
    target (`<step>@<target>`)."""
    from flows.steps import STEPS

    chain = STEPS[[s.name for s in STEPS].index(first):]
    return [n for s in chain for n in ([f"{s.name}@{t}" for t in targets] if s.per_target else [s.name])]


def step_runs(repo: Path, since_ms: int) -> list[tuple[str, float, float]]:
    """(step, start, end) in seconds since the epoch of each step's MLflow run that started at or after since_ms,
    in order."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dna")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.start_time >= {since_ms}",
                              order_by=["attributes.start_time ASC"])
    return [(r.info.run_name, r.info.start_time / 1000, r.info.end_time / 1000) for r in runs
            if r.info.run_name.split("@")[0] == r.data.tags.get("dna.stage") and r.info.run_name != "pipeline"
            and r.info.end_time]  # a step's run: named as its step (`<step>@<target>` for a target's)


def report_cold(started: float, total: float, steps: list[tuple[str, float, float]]) -> float:
    if not steps:
        raise SystemExit("no step ran")
    print(f"  {'before the first step':<24} {steps[0][1] - started:7.1f} s  (imports, the temporary Prefect server, "
          f"DVC reading the pipeline, the config checks)")
    print(f"  {'step':<24} {'work':>7}")
    work_sum = 0.0
    for name, start, end in steps:
        work_sum += end - start
        print(f"  {name:<24} {end - start:7.1f} s")
    between = total - work_sum - (steps[0][1] - started)
    print(f"  around the steps: {between:.1f} s in all ({between / len(steps):.1f} s per step: DVC's status, "
          f"removal and commit, Prefect's flow runs), and {started + total - steps[-1][2]:.1f} s after the last")
    verdict = "meets" if total < COLD_TARGET_S else "MISSES"
    print(f"  total {total:.1f} s wall: {verdict} the target of {COLD_TARGET_S:.0f} s")
    ratio = total / work_sum
    verdict = "meets" if ratio <= COLD_RATIO_TARGET else "MISSES"
    print(f"  wall / the steps' own work: {total:.1f} / {work_sum:.1f} s = {ratio:.2f}x: {verdict} the target of "
          f"{COLD_RATIO_TARGET}x")
    return ratio


def lone_data(repo: Path, env: dict, repeats: int) -> None:
    cmd = [sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "data"]
    print("`dvc repro --force --single-item data` (`dna data`: one stage with nearly no work), one after another:")
    walls = []
    for i in range(repeats):
        took, out, code = timed_lines(cmd, repo, env)
        ran = [m.group(1) for _, line in out if (m := RUNNING.search(line))]
        if code != 0 or ran != ["data"]:
            print("\n".join(line for _, line in out[-40:]))
            raise SystemExit(f"data stage: exit {code}, ran {ran}")
        walls.append(took)
        print(f"  run {i + 1}: {took:.1f} s wall")
    median = sorted(walls)[len(walls) // 2]
    verdict = "meets" if median < LONE_DATA_TARGET_S else "MISSES"
    print(f"  median {median:.1f} s: {verdict} the target of {LONE_DATA_TARGET_S:.0f} s")


def retrain_change(repo: Path, env: dict) -> None:
    """The flow with retrain.train.lr set to a value not used before (a checkpoint of a value used before would be
    resumed, not retrained; the work is the same size whatever the value): an experiment."""
    import random

    import yaml

    lr = yaml.safe_load((repo / "params.yaml").read_text())["retrain"]["train"]["lr"]
    new = round(lr * random.uniform(0.7, 0.95), 7)
    since = time.time()
    took, out, code = timed_lines([sys.executable, "-m", "flows.pipeline", "--project-dir", str(repo), "-S",
                                   f"retrain.train.lr={new}"], repo, env)
    steps = step_runs(repo, int(since * 1000))
    ran = [name for name, _, _ in steps]
    targets = list(yaml.safe_load((repo / "params.yaml").read_text())["search"]["targets"])
    expected = steps_from("retrain", targets)
    if code != 0 or sorted(ran) != sorted(expected):
        print("\n".join(line for _, line in out[-40:]))
        raise SystemExit(f"retraining change: exit {code}, ran {ran}, expected {expected}")
    work = sum(end - start for _, start, end in steps)
    fixed = took - work
    verdict = "meets" if fixed < RETRAIN_FIXED_TARGET_S else "MISSES"
    print(f"`python -m flows.pipeline -S retrain.train.lr={new}` (was {lr}): {', '.join(ran)} ran: {took:.1f} s wall, "
          f"{work:.1f} s their work, {fixed:.1f} s more: {verdict} the target of {RETRAIN_FIXED_TARGET_S:.0f} s")


def add_target(repo: Path, env: dict, by: str = "set") -> None:
    """The flow with one more search target, between the budgets of the first two: the search reruns (its params
    changed), then only the new target's chain and the pictures. Measured: wall time beyond its retraining. `by`:
    "set" runs it as an experiment (`-S`, saved with `dvc exp save`), "edit" writes the target into params.yaml, as
    one adds a target for good."""
    import yaml

    raw = yaml.safe_load((repo / "params.yaml").read_text())
    macs = sorted(t["macs"] for t in raw["search"]["targets"].values() if "macs" in t)
    budget = int(sum(macs[:2]) / 2) if len(macs) > 1 else int(macs[0] * 0.9)
    cmd = [sys.executable, "-m", "flows.pipeline", "--project-dir", str(repo)]
    if by == "edit":
        raw["search"]["targets"]["added"] = {"macs": budget}
        (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        shown = f"`python -m flows.pipeline` with search.targets.added.macs: {budget} written in params.yaml"
    else:
        cmd += ["-S", f"search.targets.added.macs={budget}"]
        shown = f"`python -m flows.pipeline -S search.targets.added.macs={budget}`"
    since = time.time()
    took, out, code = timed_lines(cmd, repo, env)
    steps = step_runs(repo, int(since * 1000))
    ran = [name for name, _, _ in steps]
    expected = steps_from("search", ["added"])
    if code != 0 or sorted(ran) != sorted(expected):
        print("\n".join(line for _, line in out[-40:]))
        raise SystemExit(f"added target: exit {code}, ran {ran}, expected {expected}")
    retrain = next(end - start for name, start, end in steps if name == "retrain@added")
    fixed = took - retrain
    verdict = "meets" if fixed < NEW_TARGET_FIXED_S else "MISSES"
    print(f"{shown}: {', '.join(ran)} ran: {took:.1f} s wall, its retraining {retrain:.1f} s, {fixed:.1f} s more: "
          f"{verdict} the target of {NEW_TARGET_FIXED_S:.0f} s")
    work = sum(end - start for _, start, end in steps)
    print(f"  before the first step {steps[0][1] - since:.1f} s; the steps' MLflow runs "
          + ", ".join(f"{name} {end - start:.1f} s" for name, start, end in steps)
          + f"; around them {took - work - (steps[0][1] - since) - (since + took - steps[-1][2]):.1f} s; after the "
          f"last {since + took - steps[-1][2]:.1f} s")


def one_target(params: Path, home: Path, env: dict, many: float) -> None:
    """The same project with its first search target only, cold: the cost of the other targets."""
    import yaml

    raw = yaml.safe_load(params.read_text())
    first = next(iter(raw["search"]["targets"]))
    raw["search"]["targets"] = {first: raw["search"]["targets"][first]}
    single = home / "one-target.yaml"
    single.write_text(yaml.safe_dump(raw, sort_keys=False))
    (home / "one").mkdir()
    repo = make_repo(single, home / "one")
    took, lines, code = timed_lines([sys.executable, "-m", "flows.pipeline", "--project-dir", str(repo)], repo, env)
    if code != 0:
        print("\n".join(line for _, line in lines[-60:]))
        raise SystemExit(f"the one-target pipeline failed (exit {code})")
    ratio = many / took
    verdict = "meets" if ratio <= TARGETS_RATIO_TARGET else "MISSES"
    count = len(yaml.safe_load(params.read_text())["search"]["targets"])
    print(f"cold with the first target ({first}) only: {took:.1f} s; with all {count}: {many:.1f} s = {ratio:.2f}x: "
          f"{verdict} the target of {TARGETS_RATIO_TARGET}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--repo", default=None, help="a repository the pipeline has run in (kept by --keep) instead of "
                    "a fresh one")
    ap.add_argument("--skip", nargs="*", default=[], choices=["cold", "noop", "data", "retrain", "add-target",
                                                               "one-target"])
    ap.add_argument("--add-by", choices=["set", "edit"], default="set", help="add the target as an experiment "
                    "(-S, the default) or written into params.yaml")
    ap.add_argument("--noop-repeats", type=int, default=3)
    ap.add_argument("--data-repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the temporary repository")
    ap.add_argument("--prefect-api", default=None, metavar="URL", help="report to this running Prefect server (e.g. "
                    "`prefect server start`'s http://127.0.0.1:4200/api) instead of a temporary one per run")
    args = ap.parse_args()
    print(load_average())
    home = Path(args.repo).resolve().parent if args.repo else Path(tempfile.mkdtemp(prefix="bench-repro-"))
    try:
        repo = Path(args.repo).resolve() if args.repo else make_repo(Path(args.params).resolve(), home)
        env = environment(home) | ({"PREFECT_API_URL": args.prefect_api} if args.prefect_api else {})
        print(f"Prefect API: {args.prefect_api or 'a temporary server per run (Prefect without PREFECT_API_URL)'}")
        pipeline = [sys.executable, "-m", "flows.pipeline", "--project-dir", str(repo)]
        if "cold" not in args.skip:
            print(f"cold `python -m flows.pipeline` (every step as a task in one process) in {repo}:")
            started = time.time()
            total, lines, code = timed_lines(pipeline, repo, env)
            if code != 0:
                print("\n".join(line for _, line in lines[-60:]))
                raise SystemExit(f"the pipeline failed (exit {code})")
            report_cold(started, total, step_runs(repo, int(started * 1000)))
            if "one-target" not in args.skip:
                one_target(Path(args.params).resolve(), home, env, total)
            summary = [line for _, line in lines if "teacher test accuracy" in line]
            if summary:
                print("  " + summary[-1].strip())
        if "noop" not in args.skip:
            for label, cmd in (("`python -m flows.pipeline`, nothing changed", pipeline),
                               ("plain `dvc repro`, nothing changed", [sys.executable, "-m", "dvc", "repro"])):
                times = []
                for _ in range(args.noop_repeats):
                    took, out, code = timed_lines(cmd, repo, env)
                    ran = [m.group(1) for _, line in out if (m := RUNNING.search(line))]
                    if cmd is pipeline and not any(NOTHING in line for _, line in out):
                        ran = ["something"]
                    if code != 0 or ran:
                        raise SystemExit(f"{label}: exit {code}, ran {ran}")
                    times.append(took)
                median = sorted(times)[len(times) // 2]
                verdict = "meets" if median < NOOP_TARGET_S else "MISSES"
                print(f"{label}: median {median:.1f} s (runs: {', '.join(f'{t:.1f}' for t in times)}): {verdict} "
                      f"the target of {NOOP_TARGET_S:.0f} s")
        if "data" not in args.skip:
            lone_data(repo, env, args.data_repeats)
        if "retrain" not in args.skip:
            retrain_change(repo, env)
        if "add-target" not in args.skip:
            add_target(repo, env, args.add_by)
        print(load_average())
    finally:
        if args.keep or args.repo:
            print(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
