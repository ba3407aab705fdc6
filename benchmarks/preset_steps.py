"""Per-step time and memory of the paper preset (configs/imagenet.yaml), and the wall time they project per stage on
8 GPUs, against the paper's figures.

    python -m benchmarks.preset_steps                        # CPU: batch 8, every block (a few minutes on 2 cores)
    python -m benchmarks.preset_steps --batch 64             # on a GPU: the preset's batch
    python -m benchmarks.preset_steps --blocks 4 --repeats 2

Three kinds of step, each measured in its own process (so its peak memory is its own), with random inputs of the
preset's shapes (weights do not change the cost of a step):
- the teacher pass: tf_efficientnet_b7 (pretrained=False) at 224 px to its last boundary, as distillation runs it on
  every batch when the features are not cached (the preset augments, so they are not);
- one block supernet step: every cell of the block trains one uniformly sampled path on the teacher's features
  (Adam, MSE), as `dna distill` steps;
- one retraining step of a representative searched network (an EfficientNet-B0-sized member of the space, 5.3M
  parameters) with the preset's recipe: drop-path, RMSprop-TF, label smoothing, weight EMA update.

Memory: on a GPU, torch.cuda.max_memory_allocated over the timed steps; on the CPU, the peak resident memory of the
process (ru_maxrss, the warm-up step included) and its rise over what was resident after the warm-up step (weights,
optimizer and EMA state: the rise is the step's activations and gradients). A batch smaller than the preset's
(64) is scaled linearly to it, time and the rise of memory alike; the script says so when it does.

Projection, from the per-step times at batch 64 per device and 8 devices: steps per epoch x epochs (ImageNet's
1,281,167 training images less the 2% rating hold-out; data loading, evaluation and rating left out). Measured on a
CPU, it projects 8 devices as fast as this CPU, not 8 GPUs: run it on a GPU for those.
"""
from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from benchmarks._common import load_average, set_threads

PRESET = Path(__file__).resolve().parents[1] / "configs" / "imagenet.yaml"
PRESET_BATCH = 64
DEVICES = 8
IMAGENET_TRAIN = 1_281_167
IMAGENET_VAL = 50_000
# an EfficientNet-B0-sized member of the preset's space (B0 with 4 layers of 112 and 5 of 192 channels)
RETRAINED = {"stem": 32, "head": 1280, "arch": [
    ["ds_r1_k3_s1_e1_c16_se0.25"], ["ir_r2_k3_s2_e6_c24_se0.25"], ["ir_r2_k5_s2_e6_c40_se0.25"],
    ["ir_r3_k3_s2_e6_c80_se0.25"], ["ir_r4_k5_s1_e6_c112_se0.25"], ["ir_r5_k5_s2_e6_c192_se0.25"],
    ["ir_r1_k3_s1_e6_c320_se0.25"]]}
PAPER = ("the paper (METHOD.md): blocks distilled 20-40 epochs each at 64 images x 8 GPUs, about 2 days on 8 GPUs "
         "one block after another (the released code); retraining 350-500 epochs with EfficientNet's recipe")


def preset():
    from dna.config import load_params

    return load_params(PRESET, check_paths=False)


def teacher_step(params, batch: int, device, precision: str = "fp32"):
    """The teacher's forward pass to its boundaries (frozen, eval mode, no gradients)."""
    import timm
    import torch

    from dna.engine import autocast
    from dna.targets import boundary_features

    teacher = timm.create_model(params.teacher.model, pretrained=False, num_classes=1000).to(device).eval()
    teacher.requires_grad_(False)
    size = params.data.image_size
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)

    def step():
        with torch.no_grad(), autocast(device, precision):
            boundary_features(teacher, x, params.teacher.boundaries)
    return step


def block_step(params, block: int, batch: int, device, precision: str = "fp32"):
    """One distillation step of a block: each cell one sampled path, MSE to the target, Adam."""
    import torch
    import torch.nn.functional as F

    from dna.distill import build_block, uniform_path
    from dna.engine import autocast
    from dna.recipe import make_optimizer
    from dna.spaces import build_space
    from dna.targets import teacher_shapes

    size, d = params.data.image_size, params.distill
    space = build_space(params.space, 3, size, 1000)
    shapes = teacher_shapes(params.teacher.model, 3, size, params.teacher.boundaries)
    supernet = build_block(space, block, shapes, 3).to(device, memory_format=torch.channels_last).train()
    optimizer = make_optimizer(supernet, d, d.batch_size)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    x_shape = (3, size, size) if block == 0 else shapes[block - 1]
    x = torch.randn(batch, *x_shape, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randn(batch, *shapes[block], device=device).contiguous(memory_format=torch.channels_last)
    cells = space.cells(block)
    num_ops = [len(supernet[c.name].layers[-1]) for c in cells]
    paths = torch.Generator().manual_seed(0)

    def step():
        with autocast(device, precision):
            loss = sum(F.mse_loss(supernet[c.name](x, uniform_path(paths, c, n)).float(), y)
                       for c, n in zip(cells, num_ops))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return step


def retrain_step(params, batch: int, device, precision: str = "fp32"):
    """One retraining step of the representative network with the preset's recipe."""
    import torch
    import torch.nn.functional as F

    from dna.arch import Arch
    from dna.engine import autocast
    from dna.recipe import make_ema, make_optimizer
    from dna.spaces import build_space

    t, size = params.retrain.train, params.data.image_size
    space = build_space(params.space, 3, size, 1000)
    model = space.build(Arch.from_dict(RETRAINED), drop_rate=t.drop_rate, drop_path_rate=t.drop_path_rate)
    model = model.to(device, memory_format=torch.channels_last).train()
    optimizer = make_optimizer(model, t, t.batch_size)
    ema = make_ema(model, t)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(1000, (batch,), device=device)
    updates = [0]

    def step():
        with autocast(device, precision):
            loss = F.cross_entropy(model(x).float(), y, label_smoothing=t.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        updates[0] += 1
        if ema is not None:
            ema.update(model, step=updates[0])
    return step


def make_step(part: str, params, batch: int, device, precision: str = "fp32"):
    if part == "teacher":
        return teacher_step(params, batch, device, precision)
    if part == "retrain":
        return retrain_step(params, batch, device, precision)
    return block_step(params, int(part.removeprefix("block ")), batch, device, precision)


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(part: str, batch: int, repeats: int, device_name: str, threads: int | None) -> dict:
    """Seconds per step (median of `repeats` after a warm-up step) and memory, in this process."""
    import statistics

    import torch

    set_threads(threads)
    torch.manual_seed(0)
    device = torch.device(device_name)
    step = make_step(part, preset(), batch, device)
    cuda = device.type == "cuda"
    step()  # warm-up: first-call costs, the optimizer's and the EMA's state
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) / 2**20 if cuda else resident_mib()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(device) if cuda else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    return {"part": part, "batch": batch, "seconds": statistics.median(times), "runs": times,
            "before_mib": before, "peak_mib": peak}


def at_preset_batch(row: dict) -> dict:
    """Time and the rise of memory scaled linearly from the measured batch to the preset's."""
    factor = PRESET_BATCH / row["batch"]
    rise = row["peak_mib"] - row["before_mib"]
    return {**row, "step_s": row["seconds"] * factor, "peak64_mib": row["before_mib"] + rise * factor}


def duration(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.1f} h"


def projections(rows: dict[str, dict], params) -> list[tuple[str, float, str]]:
    """(stage, seconds, how) on DEVICES devices at batch 64 each."""
    train_images = round(IMAGENET_TRAIN * (1 - params.data.rate_fraction))
    global_steps = math.ceil(train_images / (PRESET_BATCH * DEVICES))
    one_device_steps = math.ceil(train_images / PRESET_BATCH)
    teacher = rows["teacher"]["step_s"]
    blocks = {name: row["step_s"] for name, row in rows.items() if name.startswith("block ")}
    d_epochs, r_epochs = params.distill.epochs, params.retrain.train.epochs
    out = [("teacher (test pass over ImageNet val)", math.ceil(IMAGENET_VAL / (PRESET_BATCH * DEVICES)) * teacher,
            f"{math.ceil(IMAGENET_VAL / (PRESET_BATCH * DEVICES))} steps of the teacher pass")]
    if blocks:
        sequential = sum(d_epochs * global_steps * (teacher + s) for s in blocks.values())
        parallel = max(d_epochs * one_device_steps * (teacher + s) for s in blocks.values())
        scope = "all six blocks" if len(blocks) == len(params.space.blocks) else f"{', '.join(blocks)} only"
        out.append((f"distill, one block after another on {DEVICES} devices ({scope})", sequential,
                    f"{d_epochs} epochs x {global_steps} steps x (teacher pass + block step), per block"))
        out.append((f"distill, blocks side by side, one device each ({scope})", parallel,
                    f"{d_epochs} epochs x {one_device_steps} steps of 64, the slowest block"))
    out.append((f"retrain on {DEVICES} devices", r_epochs * global_steps * rows["retrain"]["step_s"],
                f"{r_epochs} epochs x {global_steps} steps"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=None, help="images per step (default: 64 on a GPU, 8 on the CPU)")
    ap.add_argument("--blocks", type=int, nargs="*", default=None, help="blocks to measure (default: all)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: torch's)")
    args = ap.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch or (PRESET_BATCH if device == "cuda" else 8)
    params = preset()
    blocks = range(len(params.space.blocks)) if args.blocks is None else args.blocks
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({torch.get_num_threads()} torch threads)"
    print(f"{PRESET.name} on {name}, batch {batch}, {load_average()}")
    if batch != PRESET_BATCH:
        print(f"batch {batch}, not the preset's {PRESET_BATCH}: time and the rise of memory are scaled by "
              f"{PRESET_BATCH / batch:g} to it")
    parts = ["teacher", *[f"block {b}" for b in blocks], "retrain"]
    rows = {}
    spawn = mp.get_context("spawn")
    for part in parts:
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            row = at_preset_batch(pool.submit(measure, part, batch, args.repeats, device, args.threads).result())
        rows[part] = row
        memory = "max allocated" if device == "cuda" else "peak resident"
        print(f"{part:8s}: {row['seconds']:.3f} s per step of {batch} ({', '.join(f'{t:.3f}' for t in row['runs'])}),"
              f" {batch / row['seconds']:.1f} images/s; {memory} {row['peak_mib']:.0f} MiB"
              f" ({row['peak_mib'] - row['before_mib']:.0f} over the {row['before_mib']:.0f} before the steps);"
              f" at batch {PRESET_BATCH}: {row['step_s']:.2f} s, {row['peak64_mib']:.0f} MiB")
    print(f"\nprojected wall time on {DEVICES} devices as fast as this {'GPU' if device == 'cuda' else 'CPU'}, "
          f"batch {PRESET_BATCH} each:")
    for stage, seconds, how in projections(rows, params):
        print(f"  {stage}: {duration(seconds)} ({how})")
    print(PAPER)
    print(load_average())


if __name__ == "__main__":
    main()
