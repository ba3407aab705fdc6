"""Inference speed of the exported network: ONNX Runtime against PyTorch eager, at batch 1 and batch 64.

    python -m benchmarks.inference_speed
    python -m benchmarks.inference_speed --onnx outputs/export/model.onnx --calls 500

The network is outputs/export/model.onnx (what `dna export` writes, with the architecture in its metadata) and,
for PyTorch, the same architecture with the weights of outputs/retrain/model.pt when present. Without an exported
file, the network of outputs/search/arch.yaml (or else a representative network of the default space) is exported
here the way `dna export` does it. Both run on the CPU in this process; each timed unit is `--calls` calls, and the
figure is the median per-call latency over interleaved repeats. Threads: torch's and ONNX Runtime's defaults, and
then both at one thread.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from benchmarks._common import interleaved, load_average


def representative(space):
    """Each block's deepest cell at its first width, with the k5 e6 op where the space has it."""
    op = space.ops.index("ir_k5_e6_se0.25") if "ir_k5_e6_se0.25" in space.ops else 0
    choice = []
    for block in range(space.num_blocks):
        cell = max(space.cells(block), key=lambda c: (c.depth, -c.width))
        choice.append((cell, (op,) * cell.depth))
    return space.arch(choice)


def load_network(params, onnx_path: Path | None):
    """(ONNX file, torch model, in_chans, image size, where it came from)."""
    import torch

    from dna.arch import Arch
    from dna.checkpoint import load_checkpoint
    from dna.export import export_onnx, read_metadata
    from dna.spaces import build_space

    d, out = params.data, Path(params.outputs)
    if onnx_path is not None and onnx_path.is_file():
        meta = read_metadata(onnx_path)
        arch = Arch.from_yaml(meta["arch_yaml"])
        model = arch.build(10, d.channels)
        weights = out / "retrain" / "model.pt"
        if weights.is_file():
            state = load_checkpoint(weights)
            if state.get("arch") == meta["arch_yaml"]:
                model.load_state_dict(state["model"])
        return onnx_path, model.eval(), d.channels, d.image_size, f"{onnx_path}"
    arch_file = out / "search" / "arch.yaml"
    if arch_file.is_file():
        arch, source = Arch.load(arch_file), f"{arch_file}, exported here"
    else:
        arch = representative(build_space(params.space, d.channels, d.image_size, 10))
        source = "a representative network of the default space, exported here"
    torch.manual_seed(0)
    model = arch.build(10, d.channels).eval()
    path = Path(tempfile.mkdtemp(prefix="bench-i-")) / "model.onnx"
    export_onnx(model, torch.randn(4, d.channels, d.image_size, d.image_size), path, {"arch_yaml": arch.to_yaml()})
    return path, model, d.channels, d.image_size, source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--outputs", default=None, help="outputs folder of a run (default: the params' outputs)")
    ap.add_argument("--onnx", default=None, help="exported model (default: <outputs>/export/model.onnx)")
    ap.add_argument("--calls", type=int, default=200, help="calls per timed unit at batch 1 (a tenth at batch 64)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    from dna.config import load_params
    from dna.export import INPUT_NAME, OUTPUT_NAME

    params = load_params(args.params, {"outputs": args.outputs} if args.outputs else None)
    onnx_path = Path(args.onnx) if args.onnx else Path(params.outputs) / "export" / "model.onnx"
    path, model, chans, size, source = load_network(params, onnx_path)
    params_count = sum(p.numel() for p in model.parameters())
    print(f"network: {source} ({params_count:,} parameters, input {chans}x{size}x{size}); {load_average()}")
    default_threads = torch.get_num_threads()

    for threads in (None, 1):
        torch.set_num_threads(threads or default_threads)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        label = "default threads" if threads is None else "1 thread each"
        print(f"{label} (torch {torch.get_num_threads()}, ONNX Runtime "
              f"{options.intra_op_num_threads or 'its default'}):")
        for batch in (1, 64):
            x = torch.randn(batch, chans, size, size)
            feed = {INPUT_NAME: x.numpy()}
            calls = max(1, args.calls if batch == 1 else args.calls // 10)
            with torch.inference_mode():
                diff = float(np.abs(sess.run([OUTPUT_NAME], feed)[0] - model(x).numpy()).max())

            def eager(x=x, calls=calls):
                with torch.inference_mode():
                    for _ in range(calls):
                        model(x)

            def onnxrt(sess=sess, feed=feed, calls=calls):
                for _ in range(calls):
                    sess.run([OUTPUT_NAME], feed)

            eager(), onnxrt()  # warm-up
            times = interleaved({"eager": eager, "onnx": onnxrt}, args.repeats)
            e, o = times["eager"].median() / calls, times["onnx"].median() / calls
            print(f"  batch {batch:>2}: PyTorch eager {e * 1e3:8.3f} ms/call, ONNX Runtime {o * 1e3:8.3f} ms/call "
                  f"-> ONNX Runtime {e / o:.2f}x faster ({batch / o:,.0f} images/s); max |diff| {diff:.1e}")
    print(load_average())


if __name__ == "__main__":
    main()
