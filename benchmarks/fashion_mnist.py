"""Fashion-MNIST from Debian's package `dataset-fashion-mnist` as an image folder, for runs on data harder than the
digits (the rank stage's evidence run): a seeded, class-balanced sample of the training and test files as PNGs in
`<root>/train/<class>/` and `<root>/val/<class>/`, which `data.source: imagefolder` reads (val/ is the test split).

    apt-get install dataset-fashion-mnist      # the IDX files under /usr/share/datasets/fashion-mnist/
    python -m benchmarks.fashion_mnist --root data/fashion-mnist --train-per-class 300 --test-per-class 100

With `--torchvision`, the four files are unpacked instead into `<root>/FashionMNIST/raw/`, where
`data.source: torchvision`, `data.name: FashionMNIST` reads all 70,000 images.
"""
from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np

PACKAGE = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as an array: magic 0x0000 08 NDIM, then NDIM big-endian sizes, then bytes."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    if raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load(split: str, source: Path = PACKAGE) -> tuple[np.ndarray, np.ndarray]:
    images, labels = (read_idx(source / f"{name}.gz") for name in FILES[split])
    return images, labels


def balanced(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                                   for c in range(len(CLASSES))]))


def write_folder(root: Path, train_per_class: int, test_per_class: int, seed: int = 0,
                 source: Path = PACKAGE) -> dict[str, int]:
    from PIL import Image

    counts = {}
    for split, folder, per_class in (("train", "train", train_per_class), ("test", "val", test_per_class)):
        images, labels = load(split, source)
        chosen = balanced(labels, per_class, seed)
        for i in chosen:
            target = root / folder / CLASSES[labels[i]]
            target.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(target / f"{split}_{i:05d}.png")
        counts[folder] = len(chosen)
    return counts


def unpack_for_torchvision(root: Path, source: Path = PACKAGE) -> Path:
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for names in FILES.values():
        for name in names:
            (raw / name).write_bytes(gzip.open(source / f"{name}.gz").read())
    return raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("data/fashion-mnist"))
    parser.add_argument("--source", type=Path, default=PACKAGE, help="folder of the four .gz IDX files")
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torchvision", action="store_true", help="unpack all of it for data.source torchvision")
    args = parser.parse_args(argv)
    if not args.source.is_dir():
        parser.error(f"{args.source} does not exist: apt-get install dataset-fashion-mnist (or give --source)")
    if args.torchvision:
        print(f"unpacked into {unpack_for_torchvision(args.root, args.source)}")
    else:
        counts = write_folder(args.root, args.train_per_class, args.test_per_class, args.seed, args.source)
        print(f"{args.root}: {counts['train']} training and {counts['val']} test images in {len(CLASSES)} classes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
