"""A local stand-in for MNIST in its real on-disk format: synthetic digit-like images written as the unpacked IDX
files that torchvision.datasets.MNIST reads from `<root>/MNIST/raw/` (no network needed)."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes: magic (0, 0, 0x08, number of dimensions), the sizes (big-endian), the data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def digit_like(count: int, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """`count` images of scikit-learn's 8x8 handwritten digits, each enlarged to 20 px at a random place of a
    `size`-px canvas with random intensity and noise, and their labels."""
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    pick = rng.integers(len(digits.target), size=count)
    glyphs = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    glyphs = torch.nn.functional.interpolate(glyphs, size=(20, 20), mode="bilinear", align_corners=False)[:, 0]
    images = np.zeros((count, size, size), dtype=np.float32)
    offsets = rng.integers(0, size - 20 + 1, size=(count, 2))
    for i, (k, (dy, dx)) in enumerate(zip(pick, offsets)):
        images[i, dy:dy + 20, dx:dx + 20] = glyphs[k].numpy()
    images = images * rng.uniform(180, 255, size=(count, 1, 1)) + rng.normal(0, 8, size=images.shape)
    return np.clip(images, 0, 255).astype(np.uint8), digits.target[pick].astype(np.uint8)


def write_mnist(root: str | Path, train: int = 60_000, test: int = 10_000, seed: int = 0) -> Path:
    """Write `train` and `test` digit-like images as MNIST's raw IDX files under root/MNIST/raw; returns root."""
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("test", test)):
        images, labels = digit_like(count, seed + (split == "test"))
        image_file, label_file = FILES[split]
        write_idx(raw / image_file, images)
        write_idx(raw / label_file, labels)
    return Path(root)
