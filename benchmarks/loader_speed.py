"""Loading speed: teacher training on a torchvision dataset of 60,000 28-px images (MNIST's on-disk format).

    python -m benchmarks.loader_speed                  # 60,000 + 10,000 images, 40 steps of 64 per timed run
    python -m benchmarks.loader_speed --steps 20 --repeats 2 --workers 1

There is no network here: the dataset is written locally as the unpacked IDX files torchvision's MNIST reads
(benchmarks/mnist_files.py: scikit-learn's digits enlarged and placed at random, with noise), under a temporary
root, and read with data.source torchvision, name MNIST, download false, at data.image_size 28.

Three ways of loading, timed in one run (interleaved repeats, medians):
- before: the loader as it was, torch's DataLoader over the split in the training process
  (decoding and transforming every image every epoch);
- workers: data.num_workers processes (persistent), no decoded cache (data.cache_mb 0);
- cache: the dataset decoded once into memory (data.cache_mb), batches indexed from it.

Each is timed (1) alone, the loader only, and (2) with the teacher's training step (tinynet_e, as params.yaml's
teacher, through the Engine as `dna teacher` trains it). The cache's one-off decoding is timed and counted in a
first epoch's figure. The batches of the three ways are checked to be identical first.
"""
from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import interleaved, load_average, ratio, set_threads
from benchmarks.mnist_files import write_mnist

BATCH = 64


def make_data(root: Path, workers: int, cache_mb: int):
    from dna.config import DataConfig
    from dna.data import load_data, write_splits

    cfg = DataConfig(source="torchvision", name="MNIST", root=str(root), image_size=28, channels=1,
                     num_workers=workers, cache_mb=cache_mb)
    splits = root / "splits.json"
    if not splits.is_file():
        write_splits(cfg, 0, splits)
    return load_data(cfg, splits)


def before_loader(data, generator):
    """The loader before data.num_workers was read: a DataLoader in the training process."""
    from torch.utils.data import DataLoader

    return DataLoader(data.train, batch_size=BATCH, shuffle=True, generator=generator)


def new_loader(data, generator):
    return data.loader("train", BATCH, shuffle=True, generator=generator)


def loader_only(data, make, steps: int, seed: int = 0) -> None:
    for _ in itertools.islice(make(data, torch.Generator().manual_seed(seed)), steps):
        pass


def teacher_training(data, make, steps: int, scratch: Path, precision: str = "fp32") -> None:
    """`steps` training steps of the teacher (as dna.train.train_classifier makes them) through the Engine."""
    import timm
    import torch.nn.functional as F
    from timm.optim import create_optimizer_v2

    from dna.engine import Engine

    torch.manual_seed(0)
    model = timm.create_model("tinynet_e", num_classes=data.num_classes, in_chans=1, drop_rate=0.1)
    model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=0.005, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)

    def step(batch):
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits, y, label_smoothing=0.1), {"train_accuracy": int((logits.argmax(1) == y).sum())}

    ckpt = scratch / "train_state.pt"
    ckpt.unlink(missing_ok=True)
    Engine(model, optimizer, scheduler, lambda epoch, g: itertools.islice(make(data, g), steps), step, epochs=1,
           checkpoint=ckpt, fingerprint="benchmark", seed=0, device=torch.device("cpu"), name="teacher",
           precision=precision).fit()


def compare(times: dict, baseline: str = "before") -> None:
    """Each case against the baseline: medians, and the fastest runs (the least disturbed on a shared machine)."""
    slow = times[baseline]
    for name in [n for n in times if n != baseline]:
        print(f"  {name} against {baseline}: {ratio(slow, times[name])}; fastest runs "
              f"{min(slow.wall) / min(times[name].wall):.2f}x wall")


def same_batches(cases: dict, steps: int = 3) -> bool:
    firsts = [list(itertools.islice(make(data, torch.Generator().manual_seed(1)), steps))
              for data, make in cases.values()]
    return all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for other in firsts[1:] for a, b in zip(firsts[0], other))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps of 64 images per timed run")
    parser.add_argument("--loader-steps", type=int, default=200, help="batches per timed loader-only run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="data.num_workers of the workers and cache cases")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--bf16", action="store_true", help="also time the cache case under bf16 autocast")
    args = parser.parse_args()
    threads = set_threads(args.threads)
    print(f"start: {load_average()}; torch threads {threads}, data.num_workers {args.workers}")
    with tempfile.TemporaryDirectory(prefix="dna-loader-") as tmp:
        root, scratch = Path(tmp) / "data", Path(tmp) / "scratch"
        scratch.mkdir()
        start = time.perf_counter()
        write_mnist(root)
        print(f"wrote 60,000 + 10,000 28-px images as MNIST IDX files in {time.perf_counter() - start:.1f} s")
        before = make_data(root, 0, 0)
        workers = make_data(root, args.workers, 0)
        cached = make_data(root, args.workers, 4096)
        assert cached.loading.budget.admit(cached.train.dataset)
        start = time.perf_counter()
        cached.train.dataset.decode(args.workers)
        decode_s = time.perf_counter() - start
        print(f"cache: decoded {len(cached.train.dataset):,} images once in {decode_s:.1f} s "
              f"({cached.train.dataset.nbytes() / 2**20:.0f} MiB)")
        cases = {"before": (before, before_loader), "workers": (workers, new_loader), "cache": (cached, new_loader)}
        print(f"identical batches in the three cases: {same_batches(cases)}")
        for data, make in cases.values():  # warm-up: start persistent workers, touch the pages
            loader_only(data, make, 5)

        n_loader, n_train = args.loader_steps * BATCH, args.steps * BATCH
        print(f"\n1. loader only: {args.loader_steps} batches of {BATCH} per run, {args.repeats} interleaved runs")
        times = interleaved({name: (lambda d=d, m=m: loader_only(d, m, args.loader_steps))
                             for name, (d, m) in cases.items()}, args.repeats)
        for name, t in times.items():
            print(f"  {name:10s} {n_loader / t.median():8.0f} images/s  ({t.show()})")
        compare(times)

        print(f"\n2. teacher training (tinynet_e, Engine): {args.steps} steps of {BATCH} per run, "
              f"{args.repeats} interleaved runs")
        training = {name: (lambda d=d, m=m: teacher_training(d, m, args.steps, scratch))
                    for name, (d, m) in cases.items()}
        if args.bf16:
            training["cache+bf16"] = lambda: teacher_training(cached, new_loader, args.steps, scratch, "bf16")
        times = interleaved(training, args.repeats)
        rates = {name: n_train / t.median() for name, t in times.items()}
        for name, t in times.items():
            print(f"  {name:10s} {rates[name]:8.0f} images/s  ({t.show()})")
        compare(times)
        epoch = len(cached.train)
        for label, before, cache in (("medians", rates["before"], rates["cache"]),
                                     ("fastest runs", n_train / min(times["before"].wall),
                                      n_train / min(times["cache"].wall))):
            first = epoch / (decode_s + epoch / cache)
            print(f"  cache, first epoch of {epoch:,} images counting the decoding ({label}): {first:.0f} images/s, "
                  f"{first / before:.2f}x before")
    print(f"end: {load_average()}")


if __name__ == "__main__":
    main()
