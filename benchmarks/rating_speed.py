"""Rating speed: depth-first rating with prefix reuse (dna.rate.rate_cell) against rating every candidate on its
own (dna.rate.rate_candidate_naive), on one cell of the default space (params.yaml: digits at 32 px, tinynet_e
teacher features, calibration batch of 256, the 180-image rating split in batches of 256).

    python -m benchmarks.rating_speed                 # 4-layer cell: every candidate both ways
    python -m benchmarks.rating_speed --depth 5 --naive-every 24   # 5-layer: naive on 1 in 24, extrapolated

Scores must agree within 1e-5; the script fails otherwise. Random supernet weights: speed does not depend on them.
"""
from __future__ import annotations

import argparse
import itertools

import torch

from benchmarks._common import interleaved, load_average, ratio, set_threads


def features(block: int, calibration: int, rating: int, image_size: int = 32):
    """Calibration and rating pairs at the block's boundaries, from a tinynet_e teacher on the digits images."""
    import timm

    from dna.config import DataConfig
    from dna.data import _digits
    from dna.targets import boundary_features

    torch.manual_seed(0)
    ds, _ = _digits(DataConfig(image_size=image_size))
    x = ds.tensors[0][: calibration + rating]
    teacher = timm.create_model("tinynet_e", in_chans=1, num_classes=10).eval()
    with torch.no_grad():
        levels = [x, *boundary_features(teacher, x, [2, 3, 4, 6])]
    inputs, targets = levels[block], levels[block + 1]
    return inputs[:calibration], inputs[calibration:], targets[calibration:]


def layer_evaluations(depth: int, ops: int, fixed: int, adapter: bool) -> tuple[int, int]:
    """Module runs per pass over the data (calibration or rating): (naive, depth-first)."""
    leaves = ops ** depth
    naive = leaves * (fixed + depth + adapter)
    tree = fixed + sum(ops ** i for i in range(1, depth + 1)) + (leaves if adapter else 0)
    return naive, tree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block", type=int, default=1, help="block of the default space (0 includes the stem)")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--width", type=int, default=None, help="cell width (default: the block's first width)")
    ap.add_argument("--naive-every", type=int, default=1, help="rate 1 in N candidates naively and extrapolate")
    ap.add_argument("--calibration", type=int, default=256)
    ap.add_argument("--rating", type=int, default=180, help="rating images (the digits rating split has 180)")
    ap.add_argument("--batch", type=int, default=256, help="rating batch size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = ap.parse_args()
    threads = set_threads(args.threads)

    from dna.config import load_params
    from dna.rate import rate_candidate_naive, rate_cell
    from dna.spaces import build_space
    from dna.spaces.base import Cell
    from dna.targets import RelativeL1Score

    params = load_params("params.yaml")
    space = build_space(params.space, 1, 32, 10)
    width = args.width or params.space.blocks[args.block].widths[0]
    calib, x, y = features(args.block, args.calibration, args.rating)
    batches = [(x[i:i + args.batch], y[i:i + args.batch]) for i in range(0, len(x), args.batch)]
    torch.manual_seed(0)
    cell = Cell(args.block, args.depth, width)
    net = space.build_cell(cell, calib.shape[1], y.shape[1]).eval()
    num_ops = len(space.ops)
    every = list(itertools.product(range(num_ops), repeat=args.depth))
    sample = every[:: args.naive_every]
    adapter = not isinstance(net.adapter, torch.nn.Identity)
    naive_runs, tree_runs = layer_evaluations(args.depth, num_ops, net.num_fixed, adapter)

    print(f"cell {cell.name} of block {args.block} ({num_ops} ops, {len(every)} candidates, input "
          f"{tuple(calib.shape[1:])} -> target {tuple(y.shape[1:])}, adapter: {adapter}); calibration "
          f"{len(calib)}, rating {len(x)} in {len(batches)} batch(es); torch threads {threads}")
    print(f"module runs per pass: naive {naive_runs}, depth-first {tree_runs} (ratio {naive_runs / tree_runs:.2f}x"
          f"; layers only: {len(every) * args.depth / sum(num_ops ** i for i in range(1, args.depth + 1)):.2f}x)")

    got: dict = {}

    def fast():
        got["fast"] = rate_cell(net, args.depth, calib, batches, num_ops, progress=False, scorer=RelativeL1Score())

    def naive():
        got["naive"] = {ops: rate_candidate_naive(net, ops, calib, batches, scorer=RelativeL1Score()) for ops in sample}

    times = interleaved({"depth-first": fast, "naive": naive}, args.repeats)
    diff = max(abs(got["fast"][ops] - s) for ops, s in got["naive"].items())
    scale = len(every) / len(sample)
    naive_all = times["naive"].scaled(scale)
    print(f"depth-first, all {len(every)} candidates: {times['depth-first'].show()}")
    note = "" if scale == 1 else f" (timed on {len(sample)}, 1 in {args.naive_every}, times x{scale:g})"
    print(f"naive, all {len(every)} candidates: {naive_all.show()}{note}")
    print(f"speed-up (medians): {ratio(naive_all, times['depth-first'])}; "
          f"max |score difference| over {len(sample)} candidates: {diff:.2e}; {load_average()}")
    if not diff <= 1e-5:
        raise SystemExit(f"scores differ by {diff:.2e} > 1e-5")


if __name__ == "__main__":
    main()
