"""Fashion-MNIST from Debian's package as an image folder (benchmarks/fashion_mnist.py), read by the project's own
imagefolder path; here on small IDX files written like the package's, so the test needs no package."""
from __future__ import annotations

import gzip

import numpy as np
import pytest

from benchmarks.fashion_mnist import CLASSES, FILES, PACKAGE, read_idx, unpack_for_torchvision, write_folder


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def package(tmp_path):
    """The package's four files, 6 images of every class per split, each image filled with its own index."""
    source = tmp_path / "package"
    source.mkdir()
    for images, labels in FILES.values():
        count = 6 * len(CLASSES)
        y = np.arange(count) % len(CLASSES)
        x = np.broadcast_to(np.arange(count)[:, None, None], (count, 28, 28))
        (source / f"{images}.gz").write_bytes(gzip.compress(_idx(x)))
        (source / f"{labels}.gz").write_bytes(gzip.compress(_idx(y)))
    return source


def test_idx_files_are_read_as_the_arrays_written(package):
    images, labels = (read_idx(package / f"{name}.gz") for name in FILES["train"])
    assert images.shape == (60, 28, 28) and labels.tolist() == [i % 10 for i in range(60)]
    assert int(images[7, 3, 3]) == 7


def test_a_balanced_folder_the_imagefolder_source_reads(package, tmp_path):
    from dna.config import DataConfig
    from dna.data import load_data, write_splits

    root = tmp_path / "fashion"
    assert write_folder(root, train_per_class=4, test_per_class=2, source=package) == {"train": 40, "val": 20}
    assert sorted(p.name for p in (root / "train").iterdir()) == sorted(CLASSES)
    cfg = DataConfig(source="imagefolder", root=str(root), image_size=16, rate_fraction=0.25, test_fraction=0.1)
    summary = write_splits(cfg, 0, tmp_path / "splits.json")
    assert summary["num_classes"] == 10 and summary["separate_test_set"]
    assert summary["sizes"] == {"train": 30, "rate": 10, "test": 20}
    data = load_data(cfg, tmp_path / "splits.json")
    image, label = data.test[0]
    assert image.shape == (1, 16, 16) and data.class_names == sorted(CLASSES)


def test_unpacked_for_torchvision_where_its_fashion_mnist_looks(package, tmp_path):
    from torchvision.datasets import FashionMNIST

    unpack_for_torchvision(tmp_path / "tv", package)
    assert len(FashionMNIST(str(tmp_path / "tv"), train=False, download=False)) == 60


@pytest.mark.skipif(not PACKAGE.is_dir(), reason="the Debian package dataset-fashion-mnist is not installed")
def test_the_packages_test_split_holds_ten_thousand_images_of_ten_classes():
    images, labels = (read_idx(PACKAGE / f"{name}.gz") for name in FILES["test"])
    assert images.shape == (10_000, 28, 28) and sorted(set(labels.tolist())) == list(range(10))
