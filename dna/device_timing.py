"""Time the pieces of a search space on the device the network will run on (a device kit's time_pieces.py).

Needs only onnxruntime and numpy. Run it from the kit's folder, which `dna device-kit` wrote (pieces/*.onnx,
pieces.csv, kit.json):

    python time_pieces.py --threads 1          # writes latency.csv and profile.json here

then bring latency.csv and profile.json back and name latency.csv as a target's `latency_profile`. The timing is the
profile stage's: every piece in turn in each of `--rounds` rounds, a low percentile of its runs.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from pathlib import Path

COLUMNS = ["kind", "block", "position", "op", "op_name", "in_width", "width", "stride", "resolution", "latency_ms"]


def session(model: bytes | str | Path, threads: int = 1):
    """An ONNX Runtime CPU session with `threads` intra-op threads, one inter-op thread, all graph optimisations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                providers=["CPUExecutionProvider"])


def time_pieces(kit: Path, rows: list[dict], args: argparse.Namespace) -> list[float]:
    import numpy as np

    timed = []
    for row in rows:
        sess = session(kit / "pieces" / row["file"], args.threads)
        shape = [int(n) for n in row["shape"].split("x")]
        feed = {sess.get_inputs()[0].name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
        timed.append((sess, feed, []))
    for sess, feed, _ in timed:
        for _ in range(args.warmup):
            sess.run(None, feed)
    per_round = max(1, -(-args.runs // args.rounds))
    for _ in range(args.rounds):
        for sess, feed, times in timed:
            for _ in range(per_round):
                start = time.perf_counter_ns()
                sess.run(None, feed)
                times.append(time.perf_counter_ns() - start)
    return [float(np.percentile(times, args.percentile)) / 1e6 for _, _, times in timed]


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads, as deployed")
    parser.add_argument("--runs", type=int, default=500, help="timed runs per piece")
    parser.add_argument("--rounds", type=int, default=50, help="rounds the runs are taken in, over all pieces")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--percentile", type=float, default=10.0, help="of each piece's run times")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the kit's folder)")
    args = parser.parse_args(argv)
    kit = Path(__file__).resolve().parent
    kit_meta = json.loads((kit / "kit.json").read_text())
    with (kit / "pieces.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    latencies = time_pieces(kit, rows, args)
    out = args.out or kit
    out.mkdir(parents=True, exist_ok=True)
    with (out / "latency.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for row, ms in zip(rows, latencies):
            writer.writerow([*(row[c] for c in COLUMNS[:-1]), ms])
    settings = {k: getattr(args, k) for k in ("threads", "runs", "rounds", "warmup", "percentile")}
    meta = {"device": True, "space_fingerprint": kit_meta["space_fingerprint"], "batch_size": kit_meta["batch_size"],
            "settings": settings, "rows": len(rows),
            "host": {"machine": platform.machine(), "processor": platform.processor(),
                     "system": platform.platform(), "onnxruntime": ort.__version__}}
    (out / "profile.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    print(f"{len(rows)} pieces timed with {args.threads} thread(s): {out / 'latency.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
