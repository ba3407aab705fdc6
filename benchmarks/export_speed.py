"""The export stage's two ONNX exporters (export.exporter): the time each takes to export, check and parity-test the
same network, and how fast each graph then runs in ONNX Runtime.

    python -m benchmarks.export_speed
    python -m benchmarks.export_speed --params configs/vit.yaml --repeats 5

The network is a representative one of the params' space (benchmarks.inference_speed.representative), with random
weights, exported with dna.export.export_onnx exactly as `dna export` calls it. Both exporters take turns; the
figures are medians over the repeats. Inference: the median per-call latency at batch 1 over interleaved units of
`--calls` calls, ONNX Runtime's default threads.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks._common import interleaved, load_average, ratio
from benchmarks.inference_speed import representative


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calls", type=int, default=200, help="inference calls per timed unit")
    args = ap.parse_args()

    import numpy as np
    import onnxruntime as ort
    import torch

    from dna.config import load_params
    from dna.export import EXPORTERS, INPUT_NAME, OUTPUT_NAME, export_onnx
    from dna.spaces import build_space

    params = load_params(args.params)
    d = params.data
    arch = representative(build_space(params.space, d.channels, d.image_size, 10))
    torch.manual_seed(0)
    model = arch.build(10, d.channels).eval()
    images = torch.randn(4, d.channels, d.image_size, d.image_size)
    folder = Path(tempfile.mkdtemp(prefix="bench-export-"))
    paths = {name: folder / f"{name}.onnx" for name in EXPORTERS}
    diffs = {}

    def export(name):
        return lambda: diffs.setdefault(name, export_onnx(model, images, paths[name], {}, exporter=name).max_abs_diff)

    print(f"{arch.tag()} at {d.image_size} px, {load_average()}")
    exports = interleaved({name: export(name) for name in EXPORTERS}, args.repeats)
    for name, t in exports.items():
        print(f"export with {name}: {t.median():.2f} s median wall ({args.repeats} runs), parity {diffs[name]:.2g}")
    print(f"dynamo / torchscript: {ratio(exports['dynamo'], exports['torchscript'])}")

    one = np.random.default_rng(0).standard_normal((1, d.channels, d.image_size, d.image_size)).astype(np.float32)
    sessions = {name: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                for name, path in paths.items()}
    outputs = {name: s.run([OUTPUT_NAME], {INPUT_NAME: one})[0] for name, s in sessions.items()}
    print(f"the two graphs' logits differ by at most {np.abs(outputs['dynamo'] - outputs['torchscript']).max():.2g}")

    def calls(session):
        def run():
            for _ in range(args.calls):
                session.run([OUTPUT_NAME], {INPUT_NAME: one})
        return run

    latency = interleaved({name: calls(s) for name, s in sessions.items()}, args.repeats)
    for name, t in latency.items():
        print(f"inference of the {name} graph: {t.median() / args.calls * 1e3:.3f} ms per call at batch 1")
    print(f"dynamo / torchscript graph: {ratio(latency['dynamo'], latency['torchscript'])}")


if __name__ == "__main__":
    main()
