"""The DNA family on the embedded default, measured in one run on the same data, space and budget.

    python -m benchmarks.family                     # DNA and DNA+ (configs/dna_plus.yaml), then DNA++ per space
    python -m benchmarks.family --outputs /tmp/fam  # where the runs write (default: a temporary folder)

DNA is round 1 of configs/dna_plus.yaml (which is params.yaml but for the rounds), DNA+ its round 2 (the network
round 1 found and retrained as the teacher), DNA++ configs/dna_plusplus.yaml (no teacher: supervision ssl) over the
MBConv space, configs/vit.yaml over the transformer space and configs/hybrid.yaml over the hybrid space. Each
row: the searched network's test accuracy (PyTorch and ONNX Runtime), parameters, multiply-adds, and the search
time, the wall time of the stages before retraining (dna.stages.search_stages) as the run took them.
Nothing is reused from earlier runs: every run starts from an empty folder.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks._common import load_average

ROOT = Path(__file__).resolve().parents[1]
def row(name: str, run, times: dict) -> dict:
    from dna.stages import search_stages

    retrain = json.loads(run.paths.retrain_metrics.read_text())
    export = json.loads(run.paths.export_metrics.read_text())
    teacher = json.loads(run.paths.teacher_metrics.read_text())
    return {"method": name, "space": run.params.space.kind, "teacher": teacher.get("model"),
            "teacher_accuracy": teacher.get("test_accuracy"),
            "accuracy": retrain["test_accuracy"], "onnx_accuracy": export["onnx_test_accuracy"],
            "params": retrain["params"], "macs": retrain["macs"],
            "search_s": sum(times[s.name] for s in search_stages()), "total_s": sum(times.values())}


def main(argv: list[str] | None = None) -> int:
    from dna.config import load_params
    from dna.logs import setup_logging
    from dna.rounds import run_round

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outputs", type=Path, default=None, help="where the runs write (default: a temporary one)")
    args = parser.parse_args(argv)
    setup_logging()
    outputs = args.outputs or Path(tempfile.mkdtemp(prefix="dna-family-"))
    print(f"load average at the start: {load_average()}")
    plus = load_params(ROOT / "configs" / "dna_plus.yaml", {"outputs": str(outputs / "dna-plus")})
    members = [("DNA", plus, 1), ("DNA+ (round 2)", plus, 2)]
    for name, preset in (("DNA++", "dna_plusplus"), ("DNA++, transformer space", "vit"),
                         ("DNA++, hybrid space", "hybrid")):
        members.append((name, load_params(ROOT / "configs" / f"{preset}.yaml", {"outputs": str(outputs / preset)}), 1))
    budgets = {json.dumps({n: t.budgets() for n, t in params.search.named_targets().items()}, sort_keys=True)
               for _, params, _ in members}
    if len(budgets) != 1 or len({params.data.model_dump_json() for _, params, _ in members}) != 1:
        raise SystemExit(f"the members must share data and budget; budgets: {sorted(budgets)}")
    rows = []
    for name, params, round_ in members:
        run, times = run_round(params, round_)
        rows.append(row(name, run, times))
        print(json.dumps(rows[-1]), flush=True)
    print(f"load average at the end: {load_average()}")
    print("| method | space | teacher | teacher accuracy | searched network accuracy | ONNX accuracy | parameters | "
          "multiply-adds | search time | whole run |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        teacher = "none" if r["teacher"] is None else r["teacher"]
        accuracy = "-" if r["teacher_accuracy"] is None else f"{r['teacher_accuracy']:.4f}"
        print(f"| {r['method']} | {r['space']} | {teacher} | {accuracy} | {r['accuracy']:.4f} | "
              f"{r['onnx_accuracy']:.4f} | {r['params']:,} | {r['macs']:,} | {r['search_s']:.0f} s | "
              f"{r['total_s']:.0f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
