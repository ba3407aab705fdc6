"""The rating's own noise, and what the distillation settings do to it and to its cost: every block distilled and
rated twice, from two seeds, per setting (path sampling and epochs), on one run's data, teacher and feature cache.
Kendall tau between the two seeds' ratings of every candidate of each block, and of whole networks (a pool of
random networks of the space, rated by the sum of their blocks); the distillation's wall time per seed.

    python -m benchmarks.rating_reliability --outputs /tmp/reliability uniform:6 fair:6 uniform:18 fair:18

Resumable: a block whose checkpoint matches is not distilled again (the time reported is then not its cost).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks._common import load_average


def distilled(run, setting: str, seed_index: int, root: Path):
    """The run with the setting's distillation, its blocks under root/<setting>/seed_<i>/, distilled and rated."""
    from dna.paths import ReplicatePaths
    from dna.run import Run
    from dna.stages.distill import stage_distill
    from dna.stages.rate import stage_rate

    sampling, epochs = setting.split(":")
    params = run.params.model_copy(update={"distill": run.params.distill.model_copy(
        update={"sampling": sampling, "epochs": int(epochs)})})
    again = Run(params, replicate=seed_index)
    again.paths = ReplicatePaths(run.paths.root, root / setting.replace(":", "_") / f"seed_{seed_index}")
    start = time.perf_counter()
    for block in range(again.space.num_blocks):
        stage_distill(again, block)
        stage_rate(again, block)
    return again, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("settings", nargs="+", help="sampling:epochs, e.g. uniform:6 fair:6")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--outputs", required=True, help="where the run's data, teacher and every setting go")
    ap.add_argument("--networks", type=int, default=2000, help="random networks rated by both seeds")
    args = ap.parse_args()

    from dna.config import load_params
    from dna.rank import network_table
    from dna.rank_metrics import kendall_tau
    from dna.rank_sample import parse_rows
    from dna.run import Run
    from dna.stages.data import stage_data
    from dna.stages.distill import stage_features
    from dna.stages.teacher import stage_teacher

    run = Run(load_params(args.params, {"outputs": args.outputs}))
    stage_data(run)
    stage_teacher(run)
    stage_features(run)
    root = Path(args.outputs) / "reliability"
    results = []
    print(load_average())
    for setting in args.settings:
        (a, seconds_a), (b, seconds_b) = (distilled(run, setting, i, root) for i in (0, 1))
        blocks = {}
        for block in range(run.space.num_blocks):
            one, two = (pd.read_csv(r.paths.rating(block)).drop_duplicates(["cell", "path"]) for r in (a, b))
            blocks[block] = kendall_tau(one["score"], two["score"])
        pool = network_table(a).draw(args.networks, np.random.default_rng(0))
        first = network_table(a).frame(pool)
        second = network_table(b).frame([parse_rows(r) for r in first["rows"]])
        tau = kendall_tau(first["rating"], second["rating"])
        results.append({"setting": setting, "network_tau": tau,
                        "block_tau": blocks, "seconds": [round(seconds_a, 1), round(seconds_b, 1)]})
        print(json.dumps(results[-1]), flush=True)
    (root / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("| setting (sampling:epochs) | whole networks tau | " +
          " | ".join(f"block {b}" for b in range(run.space.num_blocks)) + " | distillation s (seed 0, seed 1) |")
    for r in results:
        print(f"| {r['setting']} | {r['network_tau']:.3f} | " + " | ".join(f"{t:.3f}" for t in r["block_tau"].values())
              + f" | {r['seconds'][0]}, {r['seconds'][1]} |")
    print(load_average())


if __name__ == "__main__":
    main()
