"""Distillation speed on the default params (digits at 32 px, tinynet_e teacher, the default four-block space).

    python -m benchmarks.distill_speed                       # cache vs teacher, then blocks in parallel
    python -m benchmarks.distill_speed --skip parallel --repeats 5

1. One block epoch with the teacher's boundary features read from the memory-mapped cache (what `dna distill`
   does when data.augment is off) against running the teacher on every batch; per block, medians of interleaved
   repeats. The one-off cost of building the cache is reported too.
2. Distilling blocks on 2 workers (threads sharing one process, or 2 processes with one torch thread each) against
   one after another (one process, torch's default threads): one epoch of every block.

The teacher is untrained (teacher.train.epochs=0): its weights do not change the cost of a step.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from benchmarks._common import Times, interleaved, load_average, ratio, set_threads

OVERRIDES = {"teacher.train.epochs": 0, "distill.epochs": 1, "device": "cpu"}


def overrides(root: str | Path, teacher: str | None) -> dict:
    return {**OVERRIDES, "outputs": str(root), **({"teacher.model": teacher} if teacher else {})}


def make_run(root: Path, teacher: str | None = None):
    from dna.config import load_params
    from dna.run import Run
    from dna.stages.data import stage_data
    from dna.stages.distill import stage_features
    from dna.stages.teacher import stage_teacher

    run = Run(load_params("params.yaml", overrides(root, teacher)))
    if not run.paths.teacher.is_file():
        stage_data(run)
        stage_teacher(run)
    start = time.perf_counter()
    stage_features(run)
    return run, time.perf_counter() - start


def distill_once(run, block: int, cached: bool, scratch: Path) -> None:
    """One epoch of one block, from scratch (no checkpoint to resume from)."""
    from dna.distill import distill_block
    from dna.targets import TeacherTargets

    targets = run.supervision
    if not cached:
        targets = TeacherTargets(targets.teacher, targets.boundaries, targets.data, targets.device, cache_dir=None)
    ckpt = scratch / f"block_{block}_{'cached' if cached else 'teacher'}_{os.getpid()}.pt"
    ckpt.unlink(missing_ok=True)
    distill_block(run.space, targets, block, run.params.distill, ckpt, in_chans=run.data.in_chans,
                  seed=run.params.seed, fingerprint="benchmark", device=run.device)
    ckpt.unlink(missing_ok=True)


def _worker(root: str, block: int, threads: int, scratch: str, teacher: str | None = None) -> float:
    set_threads(threads)
    from dna.config import load_params
    from dna.run import Run

    run = Run(load_params("params.yaml", overrides(root, teacher)))
    start = time.perf_counter()
    distill_once(run, block, True, Path(scratch))
    return time.perf_counter() - start


def cache_benchmark(run, scratch: Path, repeats: int, blocks: list[int]) -> None:
    print("1. one block epoch: features from the cache vs the teacher on every batch "
          f"(torch threads {set_threads(None)})")
    total_c, total_t = Times(), Times()
    for block in blocks:
        times = interleaved({"cache": lambda b=block: distill_once(run, b, True, scratch),
                             "teacher": lambda b=block: distill_once(run, b, False, scratch)}, repeats)
        print(f"  block {block}: cache {times['cache'].show()}")
        print(f"           teacher {times['teacher'].show()}")
        print(f"           speed-up {ratio(times['teacher'], times['cache'])}")
        for total, t in ((total_c, times["cache"]), (total_t, times["teacher"])):
            total.wall = [a + b for a, b in zip(total.wall, t.wall)] if total.wall else list(t.wall)
            total.cpu = [a + b for a, b in zip(total.cpu, t.cpu)] if total.cpu else list(t.cpu)
    print(f"  all blocks, sum of runs: speed-up {ratio(total_t, total_c)}")


def parallel_benchmark(run, scratch: Path, repeats: int, blocks: list[int], teacher: str | None) -> None:
    default_threads = set_threads(None)
    print(f"2. one epoch of blocks {blocks}: one after another (torch threads {default_threads}) vs 2 workers")
    root = str(run.params.out_dir)

    def sequential():
        for b in blocks:
            distill_once(run, b, True, scratch)

    def threads():
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda b: distill_once(run, b, True, scratch), blocks))

    def in_processes(threads: int) -> None:
        # spawned workers (a fresh interpreter each: imports included); 0 threads: torch's default in each
        import multiprocessing as mp

        from benchmarks.distill_speed import _worker  # by module name, so that the workers can find it

        with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
            inside[threads].append(sum(pool.map(_worker, [root] * len(blocks), blocks, [threads] * len(blocks),
                                                [str(scratch)] * len(blocks), [teacher] * len(blocks))))

    inside: dict[int, list[float]] = {1: [], 0: []}

    def processes():
        in_processes(1)  # two processes with default threads ask for 4 threads on 2 cores

    def processes_default_threads():
        in_processes(0)

    times = interleaved({"sequential": sequential, "2 threads": threads, "2 processes, 1 torch thread each": processes,
                         f"2 processes, {default_threads} torch threads each": processes_default_threads}, repeats)
    for name, t in times.items():
        note = "" if name == "sequential" else f"  (sequential / this: {ratio(times['sequential'], t)})"
        print(f"  {name:<36} {t.show()}{note}")
    print("  (CPU time counts this process only: worker processes' CPU is not in it)")
    for threads, label in ((1, "1 torch thread"), (0, f"{default_threads} torch threads")):
        print(f"  inside the workers ({label} each), block epochs took {statistics.median(inside[threads]):.2f} s "
              f"in all (median); the rest of their wall time is starting a Python process and importing torch/timm")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--blocks", type=int, nargs="*", default=None, help="default: every block")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for part 1 (default: torch's)")
    ap.add_argument("--teacher", default=None, help="another timm teacher with the same stage strides, e.g. "
                    "efficientnet_b0 (default: params.yaml's tinynet_e)")
    ap.add_argument("--root", default=None, help="outputs folder to reuse (default: a temporary one)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["cache", "parallel"])
    args = ap.parse_args()
    os.environ.setdefault("SCIKIT_LEARN_DATA", str(Path(tempfile.gettempdir()) / "dna-sklearn-data"))
    os.environ.setdefault("TQDM_DISABLE", "1")  # per-step bars of every block would drown the figures
    print(load_average())
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="bench-d-"))
    scratch = root / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        run, cache_s = make_run(root, args.teacher)
        print(f"teacher {run.params.teacher.model} (untrained), space of params.yaml, "
              f"digits at {run.data.image_size} px")
        blocks = args.blocks if args.blocks is not None else list(range(run.space.num_blocks))
        print(f"feature cache (train and rate splits, all boundaries): built in {cache_s:.1f} s, once for all blocks")
        if "cache" not in args.skip:
            default = set_threads(None)
            set_threads(args.threads)
            cache_benchmark(run, scratch, args.repeats, blocks)
            set_threads(default)
        if "parallel" not in args.skip:
            parallel_benchmark(run, scratch, args.repeats, blocks, args.teacher)
        print(load_average())
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
