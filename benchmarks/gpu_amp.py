"""Mixed precision against fp32 for the paper preset's steps: images per second of one block supernet step and of one
retraining step (benchmarks/preset_steps.py builds both), under autocast to bf16 and fp16 against fp32, with the card's
name. Prepared for a GPU:

    python -m benchmarks.gpu_amp                      # on a GPU: batch 64, block 4 (the largest), 10 timed steps
    python -m benchmarks.gpu_amp --blocks 0 4 --steps 20

Without CUDA it says so and measures bf16 against fp32 on the CPU at a small batch (fp16 autocast is a GPU case).
"""
from __future__ import annotations

import argparse
import time

from benchmarks._common import load_average, set_threads
from benchmarks.preset_steps import PRESET, make_step, preset


def images_per_second(part: str, params, batch: int, device, precision: str, steps: int) -> tuple[float, float]:
    """(images/s over `steps` steps after 2 warm-up steps, peak GPU memory in MiB or nan on the CPU)."""
    import torch

    torch.manual_seed(0)
    step = make_step(part, params, batch, device, precision)
    cuda = device.type == "cuda"
    for _ in range(2):
        step()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else float("nan")
    del step
    if cuda:
        torch.cuda.empty_cache()
    return batch * steps / seconds, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=None, help="images per step (default: 64 on a GPU, 4 on the CPU)")
    ap.add_argument("--blocks", type=int, nargs="*", default=[4], help="blocks to measure (default: 4, the largest)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per case (default: 10 on a GPU, 2 on CPU)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    import torch

    set_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    batch, steps = args.batch or (64 if cuda else 4), args.steps or (10 if cuda else 2)
    if cuda:
        torch.backends.cudnn.benchmark = True
        print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}; TF32 "
              f"convolutions {torch.backends.cudnn.allow_tf32}, matmuls {torch.backends.cuda.matmul.allow_tf32}")
        precisions = ["fp32", "bf16", "fp16"]
    else:
        print(f"no CUDA: measuring bf16 against fp32 on the CPU ({torch.get_num_threads()} threads), batch {batch}, "
              f"{load_average()}")
        precisions = ["fp32", "bf16"]
    params = preset()
    print(f"{PRESET.name}, batch {batch}, {steps} timed steps per case")
    for part in [*[f"block {b}" for b in args.blocks], "retrain"]:
        rates = {}
        for precision in precisions:
            rate, peak = images_per_second(part, params, batch, device, precision, steps)
            rates[precision] = rate
            memory = f", max allocated {peak:.0f} MiB" if cuda else ""
            print(f"{part:8s} {precision}: {rate:8.1f} images/s{memory}")
        print(f"{part:8s} " + ", ".join(f"{p} {rates[p] / rates['fp32']:.2f}x fp32" for p in precisions[1:]))
    print(load_average())


if __name__ == "__main__":
    main()
