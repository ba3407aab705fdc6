"""Latency model check: predicted latency (the sum of the profile's pieces) against the measured end-to-end ONNX
Runtime latency of whole networks: the chosen network and random networks of the default space.

    python -m benchmarks.latency_model                      # profile, then the chosen + 20 random networks
    python -m benchmarks.latency_model --networks 40 --runs 400

Makes a fresh profile of the space (and times it, as `dna profile` would), then times the pieces and the whole
networks again together, in the same interleaved rounds, and compares for each network: the plain sum of the
table, the sum corrected for the per-run session overhead (overhead + sum(piece - overhead), see dna.latency),
and the measured latency of the whole network exported the same way as the pieces. The chosen network is
outputs/search/arch.yaml when present (else the space's largest network); when outputs/export/model.onnx (the
file `dna export` writes, from the dynamo exporter) is present, it is timed too.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks._common import load_average


def random_arch(space, rng: np.random.Generator):
    choice = []
    for block in range(space.num_blocks):
        cells = space.cells(block)
        cell = cells[int(rng.integers(len(cells)))]
        choice.append((cell, tuple(int(o) for o in rng.integers(len(space.ops), size=cell.depth))))
    return space.arch(choice)


def largest_arch(space):
    choice = []
    for block in range(space.num_blocks):
        cell = max(space.cells(block), key=lambda c: (c.depth, c.width))
        choice.append((cell, (len(space.ops) - 1,) * cell.depth))
    return space.arch(choice)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--outputs", default=None, help="outputs folder of a run (default: the params' outputs)")
    ap.add_argument("--networks", type=int, default=20, help="random networks besides the chosen one")
    ap.add_argument("--runs", type=int, default=None, help="timed runs per piece and per network (default: params)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds the runs are split into (default: params)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="outputs/benchmarks", help="where the profile and the table are written")
    args = ap.parse_args()

    from dna.arch import Arch
    from dna.config import load_params
    from dna.latency import LatencyTable, arch_session, piece_sessions, profile_table, time_sessions
    from dna.spaces import build_space

    params = load_params(args.params, {"outputs": args.outputs} if args.outputs else None)
    cfg = params.profile.model_copy(update={k: v for k, v in (("runs", args.runs), ("rounds", args.rounds)) if v})
    d = params.data
    space = build_space(params.space, d.channels, d.image_size, 10)
    print(f"{load_average()}; ONNX Runtime threads {cfg.threads}, batch {cfg.batch_size}, "
          f"percentile {cfg.percentile:g} of {cfg.runs} runs in {cfg.rounds} rounds")

    arch_file = Path(params.outputs) / "search" / "arch.yaml"
    chosen, name = (Arch.load(arch_file), "chosen") if arch_file.is_file() else (largest_arch(space), "largest")
    if space.outside(chosen):
        chosen, name = largest_arch(space), "largest"
    rng = np.random.default_rng(args.seed)
    networks = [(name, chosen, None)] + [(f"random {i + 1}", random_arch(space, rng), None)
                                         for i in range(args.networks)]
    onnx_file = Path(params.outputs) / "export" / "model.onnx"
    if onnx_file.is_file():
        from dna.export import read_metadata

        exported = Arch.from_yaml(read_metadata(onnx_file)["arch_yaml"])
        if not space.outside(exported):
            networks.append(("dna export's model.onnx", exported, onnx_file))

    start = time.perf_counter()
    rows, timed = piece_sessions(space, cfg)
    latencies = time_sessions(timed, cfg)
    took = time.perf_counter() - start
    table = profile_table(rows, latencies)
    print(f"profile alone (what `dna profile` does): {len(table)} pieces exported and timed in {took:.1f} s")

    # the check: pieces and whole networks timed together, in the same interleaved rounds
    nets = [arch_session(arch, 10, d.channels, d.image_size, cfg, path) for _, arch, path in networks]
    for t in timed:
        t.times.clear()
    both = time_sessions(timed + nets, cfg)
    table = profile_table(rows, both[: len(timed)])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "latency_profile.csv", index=False)
    plain, corrected = LatencyTable(table, corrected=False), LatencyTable(table, corrected=True)
    layer_ms = table.loc[table["kind"] == "layer", "latency_ms"]
    print(f"session overhead {plain.overhead * 1e3:.1f} us; layers {layer_ms.min() * 1e3:.0f}-"
          f"{layer_ms.max() * 1e3:.0f} us")
    rows = []
    for (name, arch, _), measured in zip(networks, both[len(timed):]):
        rows.append({"network": name, "layers": sum(len(s) for s in arch.stages[1:]), "measured_ms": measured,
                     "sum_ms": plain.predict(space, arch), "corrected_ms": corrected.predict(space, arch)})
    frame = pd.DataFrame(rows)
    frame["sum_err"] = frame["sum_ms"] / frame["measured_ms"] - 1
    frame["corrected_err"] = frame["corrected_ms"] / frame["measured_ms"] - 1
    frame.to_csv(out / "latency_model.csv", index=False)
    with pd.option_context("display.width", 200, "display.float_format", "{:.4f}".format):
        print(frame.to_string(index=False))
    for col, label in (("sum_err", "plain sum"), ("corrected_err", "corrected sum")):
        e = frame[col]
        print(f"{label}: median |error| {e.abs().median():.1%}, median signed error {e.median():+.1%}, "
              f"max |error| {e.abs().max():.1%} over {len(frame)} networks")
    print(f"{frame['network'].iloc[0]} network: measured {frame['measured_ms'].iloc[0]:.4f} ms, corrected prediction "
          f"{frame['corrected_ms'].iloc[0]:.4f} ms ({frame['corrected_err'].iloc[0]:+.1%}); {load_average()}")


if __name__ == "__main__":
    main()
