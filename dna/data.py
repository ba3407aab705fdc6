"""Datasets and their fixed, seeded, disjoint splits: train / rate (rating hold-out) / test."""
from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset, Subset, TensorDataset

from dna.checkpoint import atomic_write_text
from dna.errors import ConfigError
from dna.loading import Batches, Decoded, Loading

if TYPE_CHECKING:
    from dna.config import DataConfig

SPLITS = ("train", "rate", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
VERIFY_CHUNK = 4096  # image files decoded per batch of threads (bounds the futures held at once)


@dataclass
class Data:
    train: Dataset
    rate: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    image_size: int
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # per split, aligned with its positions
    class_names: list[str] = field(default_factory=list)  # by label; "0", "1", ... when the data names none
    loading: Loading = field(default_factory=Loading)  # workers, pinned memory, decoded-image cache
    augmented: bool = False  # the train split draws random augmentations

    def split(self, name: str) -> Dataset:
        return getattr(self, name)

    def stratified(self, name: str, count: int, seed: int) -> list[int]:
        """A seeded sample of `count` positions of a split in which every class is represented (one of each first,
        the rest in proportion to the classes' sizes); sorted. The whole split when `count` covers it."""
        labels = self.labels.get(name)
        n = len(self.split(name))
        if count >= n:
            return list(range(n))
        if labels is None:
            raise ValueError(f"the {name} split has no labels to stratify by")
        rng = np.random.default_rng(seed)
        order = rng.permutation(n)
        grouped = order[np.argsort(labels[order], kind="stable")]  # by class, in random order within each
        classes, starts, sizes = np.unique(labels[grouped], return_index=True, return_counts=True)
        within = np.arange(n) - np.repeat(starts, sizes)
        # the j-th member of a class of n_c has key (j + u_c) / n_c: classes interleave in proportion to their size
        key = (within + np.repeat(rng.random(len(classes)), sizes)) / np.repeat(sizes, sizes)
        key[within == 0] = -1.0  # one of each class first
        return sorted(grouped[np.argsort(key, kind="stable")[:count]].tolist())

    def loader(self, name: str, batch_size: int, shuffle: bool = False,
               generator: torch.Generator | None = None, sharded: bool = False) -> Batches:
        """(images, labels) batches of a split; shuffled by `generator` (the same order, and the same augmentations,
        whatever data.num_workers and whether the split is decoded in memory); sharded: this process's part of every
        global batch of `batch_size` (dna.ddp)."""
        return Batches(self.split(name), batch_size, shuffle, generator, self.augmented and name == "train",
                       self.loading, sharded=sharded)

    def images(self, name: str, count: int | None = None, positions: list[int] | None = None) -> torch.Tensor:
        """The first `count` images of a split, or those at `positions`, as one tensor (a fixed batch)."""
        ds = self.split(name)
        if positions is None:
            positions = range(len(ds) if count is None else min(count, len(ds)))
        return torch.stack([ds[i][0] for i in positions])


def has_images(root: str | Path) -> bool:
    for _, _, files in os.walk(root):
        if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files):
            return True
    return False


def _digits(cfg: DataConfig) -> tuple[TensorDataset, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False)
    x = (x - 0.3) / 0.35
    if cfg.channels == 3:
        x = x.expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(digits.target, dtype=torch.long)
    return TensorDataset(x, y), digits.target


def _transform(cfg: DataConfig, train: bool, rand_augment: str | None = None):
    """Training (`train`) or evaluation transforms of an image; in training, timm's RandAugment when asked (a config
    string such as rand-m9-mstd0.5) after the crop and flip, as timm orders them."""
    from torchvision import transforms as T

    steps = [T.Grayscale(1) if cfg.channels == 1 else T.Lambda(lambda im: im.convert("RGB"))]
    if train and cfg.augment:
        steps += [T.RandomResizedCrop(cfg.image_size, scale=(0.35, 1.0)), T.RandomHorizontalFlip()]
    else:
        steps += [T.Resize(int(round(cfg.image_size * 1.14))), T.CenterCrop(cfg.image_size)]
    mean, std = ([0.5], [0.5]) if cfg.channels == 1 else ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    if train and rand_augment:
        from timm.data.auto_augment import rand_augment_transform

        hparams = {"translate_const": int(cfg.image_size * 0.45), "img_mean": tuple(round(255 * m) for m in mean)}
        steps.append(rand_augment_transform(rand_augment, hparams))
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


def _torchvision(cfg: DataConfig, train: bool, augment: bool, rand_augment: str | None = None):
    import inspect

    import torchvision.datasets as tvd

    cls = getattr(tvd, cfg.name)
    kwargs = {"root": cfg.root, "download": cfg.download, "transform": _transform(cfg, augment, rand_augment)}
    if "train" in inspect.signature(cls.__init__).parameters:
        kwargs["train"] = train
    else:
        kwargs["split"] = "train" if train else "test"
    try:
        return cls(**kwargs)
    except Exception as exc:  # torchvision raises RuntimeError, OSError, ValueError... from deep inside
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        where = "download it there (data.download: true, online)" if not cfg.download else "check the download"
        split = "train" if train else "test"
        raise ConfigError(
            f"data.root={cfg.root!r}, data.name={cfg.name!r}: torchvision cannot open the {split} split "
            f"({type(exc).__name__}: {cause}); expected the dataset prepared under data.root as "
            f"torchvision.datasets.{cfg.name} lays it out (for MNIST-like datasets the unpacked files in "
            f"{Path(cfg.root) / cfg.name / 'raw'}), or {where}") from None


def _image_folder(path: Path, cfg: DataConfig, train: bool, rand_augment: str | None = None):
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(path, transform=_transform(cfg, train, rand_augment))
    except Exception as exc:
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"data.root={cfg.root!r}: cannot read {path} as an image folder ({cause}); expected one "
                          f"folder of images per class") from None


def _targets(ds) -> np.ndarray:
    for attr in ("targets", "labels"):
        if hasattr(ds, attr):
            return np.asarray(getattr(ds, attr))
    return np.asarray([ds[i][1] for i in range(len(ds))])


def _sources(cfg: DataConfig, rand_augment: str | None = None) -> tuple[Dataset, Dataset, Dataset | None, np.ndarray]:
    """(training pool, same pool with eval transforms, separate test set or None, labels of the pool); the pool's
    images with timm's RandAugment when `rand_augment` is given (images only: the digits are tensors)."""
    if cfg.source == "digits":
        ds, labels = _digits(cfg)
        return ds, ds, None, labels
    if cfg.source == "torchvision":
        pool = _torchvision(cfg, train=True, augment=True, rand_augment=rand_augment)
        pool_eval, test = _torchvision(cfg, train=True, augment=False), _torchvision(cfg, train=False, augment=False)
        return pool, pool_eval, test, _targets(pool)
    root = Path(cfg.root)
    train_dir = root / "train" if (root / "train").is_dir() else root
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir() and train_dir != root), None)
    pool = _image_folder(train_dir, cfg, True, rand_augment)
    pool_eval = _image_folder(train_dir, cfg, False)
    test = None
    if test_dir:
        _check_test_classes(cfg, train_dir, test_dir, pool.classes)
        test = _image_folder(test_dir, cfg, False)
    return pool, pool_eval, test, np.asarray(pool.targets)


def _check_test_classes(cfg: DataConfig, train_dir: Path, test_dir: Path, classes: list[str]) -> None:
    """The test folder holds the training folder's classes, no more and no fewer: ImageFolder numbers each folder's
    classes by their sorted names, so a class missing from one folder would shift every later label of the other."""
    from torchvision.datasets.folder import find_classes

    tested = find_classes(test_dir)[0]
    missing, extra = sorted(set(classes) - set(tested)), sorted(set(tested) - set(classes))
    if not missing and not extra:
        return
    problems = ([f"{test_dir} lacks the class(es) {', '.join(missing)} of {train_dir}"] if missing else []) + \
        ([f"{test_dir} has class(es) {train_dir} lacks: {', '.join(extra)}"] if extra else [])
    raise ConfigError(f"data.root={cfg.root!r}: the test folder and the training folder must hold the same classes "
                      f"(labels are numbered by the sorted class folders); {'; '.join(problems)}")


def check_source(cfg: DataConfig) -> None:
    """Open a torchvision dataset as the stages will (cheap: no images are decoded); raises ConfigError naming
    data.root and data.name when it cannot be opened."""
    if cfg.source == "torchvision":
        _torchvision(cfg, train=True, augment=False)
        _torchvision(cfg, train=False, augment=False)


def class_names(pool: Dataset, num_classes: int) -> list[str]:
    """The names of the labels 0..num_classes-1: the dataset's `classes` (torchvision datasets, ImageFolder) when
    it names them all, else the labels as text ("0", "1", ...; the digits)."""
    names = getattr(pool, "classes", None)
    if names is not None and len(names) >= num_classes:
        return [str(n) for n in list(names)[:num_classes]]
    return [str(i) for i in range(num_classes)]


def _classes_in_data(cfg: DataConfig) -> tuple[int, str] | None:
    """(number of classes, where it was read) from the dataset itself, or None when it is not on this machine."""
    if cfg.source == "digits":
        from sklearn.datasets import load_digits

        return int(load_digits().target.max()) + 1, "scikit-learn's digits"
    if not cfg.root or not Path(cfg.root).is_dir():
        return None
    if cfg.source == "imagefolder":
        from torchvision.datasets.folder import find_classes

        root = Path(cfg.root)
        classes, _ = find_classes(root / "train" if (root / "train").is_dir() else root)
        return len(classes), f"the class folders of {root}"
    try:
        pool = _torchvision(cfg.model_copy(update={"download": False}), train=True, augment=False)
    except ConfigError:  # torchvision's "Dataset not found": the root exists but holds no copy
        return None
    return int(_targets(pool).max()) + 1, f"{cfg.name} in {cfg.root}"


def class_count(cfg: DataConfig, splits_path: str | Path | None = None) -> int:
    """The number of classes: from the data when it is here (a run's splits, else the dataset), else data.num_classes.

    Raises ConfigError when neither is known, or when data.num_classes disagrees with the data.
    """
    found = None
    if splits_path is not None and Path(splits_path).is_file():
        found = json.loads(Path(splits_path).read_text())["num_classes"], str(splits_path)
    found = found or _classes_in_data(cfg)
    if found is None:
        if cfg.num_classes is None:
            raise ConfigError(f"data.num_classes is not set and the data is not here (data.root={cfg.root!r}) to count "
                              "its classes: set data.num_classes")
        return cfg.num_classes
    count, source = found
    if cfg.num_classes is not None and cfg.num_classes != count:
        raise ConfigError(f"data.num_classes={cfg.num_classes} but the data has {count} classes ({source})")
    return count


def _where(cfg: DataConfig) -> str:
    if cfg.source == "digits":
        return "scikit-learn's digits"
    return f"data.root={cfg.root!r}" + (f", data.name={cfg.name!r}" if cfg.source == "torchvision" else "")


def _class_list(pool: Dataset, labels: np.ndarray) -> list[str]:
    """The names of the pool's classes, those without images included (a torchvision dataset's `classes`)."""
    named = getattr(pool, "classes", None)
    return class_names(pool, max(len(named) if named is not None else 0, int(labels.max()) + 1 if len(labels) else 0))


def check_class_sizes(cfg: DataConfig, labels: np.ndarray, names: list[str], separate_test: bool) -> None:
    """At least two classes, and enough images of each that every split drawn from the pool gets a share of every
    class (one image or more of each: a stratified split needs them); raises ConfigError naming the classes."""
    if len(names) < 2:
        raise ConfigError(f"data: {_where(cfg)} holds {len(names)} class{'' if len(names) == 1 else 'es'}"
                          f"{' (' + ', '.join(names) + ')' if names else ''}; a classifier needs at least two "
                          "(with one, every prediction is right and the test accuracy of 1.0 means nothing)")
    shares = {f"data.rate_fraction={cfg.rate_fraction:g}": cfg.rate_fraction}
    if not separate_test:
        shares[f"data.test_fraction={cfg.test_fraction:g}"] = cfg.test_fraction
    rest = 1.0 - cfg.rate_fraction - (0.0 if separate_test else cfg.test_fraction)
    shares[f"the training split (the rest, {rest:g})"] = rest
    smallest, share = min(shares.items(), key=lambda item: item[1])
    need = math.ceil(1.0 / share - 1e-9)
    counts = np.bincount(labels, minlength=len(names))
    small = [f"{names[c]} ({counts[c]})" for c in np.flatnonzero(counts < need)]
    if small:
        shown = ", ".join(small[:20]) + (f" and {len(small) - 20} more" if len(small) > 20 else "")
        raise ConfigError(f"data: {_where(cfg)}: {len(small)} of {len(names)} classes have fewer than the {need} "
                          f"images each class needs for every split to get one of them ({smallest} takes the "
                          f"smallest share of each class): {shown}; add images, drop those classes or change "
                          f"data.rate_fraction{'' if separate_test else ' / data.test_fraction'}")


def _split(cfg: DataConfig, seed: int, labels: np.ndarray, test: Dataset | None) -> dict[str, list[int]]:
    index = np.arange(len(labels))
    held = cfg.rate_fraction + (0 if test is not None else cfg.test_fraction)
    train, rest = train_test_split(index, test_size=held, random_state=seed, stratify=labels)
    if test is not None:
        return {"train": sorted(train.tolist()), "rate": sorted(rest.tolist()), "test": list(range(len(test)))}
    rate, test_idx = train_test_split(rest, test_size=cfg.test_fraction / held, random_state=seed,
                                      stratify=labels[rest])
    return {"train": sorted(train.tolist()), "rate": sorted(rate.tolist()), "test": sorted(test_idx.tolist())}


def make_splits(cfg: DataConfig, seed: int) -> dict[str, list[int]]:
    """Seeded, stratified, disjoint index lists into the training pool (and the test set when it is separate);
    raises ConfigError when the classes are too few or too small to split (check_class_sizes)."""
    pool, _, test, labels = _sources(cfg)
    check_class_sizes(cfg, labels, _class_list(pool, labels), test is not None)
    return _split(cfg, seed, labels, test)


def _unreadable(path: str) -> str | None:
    """Why an image file does not decode ("path (error)"), or None when it does."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError... per format
        cause = (str(exc).strip().splitlines() or [""])[0].replace(repr(path), "").replace(path, "").strip()
        return f"{path} ({type(exc).__name__}{': ' + cause if cause else ''})"
    return None


def check_images(cfg: DataConfig, *datasets: Dataset | None) -> None:
    """Decode every image file of the datasets once, in threads (PIL decodes without the GIL); raises ConfigError
    naming every file that does not decode, as a loader would fail on it in a later stage."""
    paths = [path for ds in datasets if ds is not None for path, _ in getattr(ds, "samples", ())]
    if not paths:
        return
    bad = []
    with ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as threads:
        for start in range(0, len(paths), VERIFY_CHUNK):
            bad += [why for why in threads.map(_unreadable, paths[start:start + VERIFY_CHUNK]) if why is not None]
    if bad:
        raise ConfigError(f"data: {_where(cfg)}: {len(bad)} of {len(paths)} image files cannot be read: "
                          f"{'; '.join(bad)}; remove or replace them (data.verify: false skips this check)")


def write_splits(cfg: DataConfig, seed: int, path: str | Path) -> dict:
    """The data stage: check the classes and (data.verify) every image, then write the splits."""
    pool, _, test, labels = _sources(cfg)
    names = _class_list(pool, labels)
    check_class_sizes(cfg, labels, names, test is not None)
    if cfg.verify:
        check_images(cfg, pool, test)
    splits = _split(cfg, seed, labels, test)
    num_classes = int(labels.max()) + 1
    summary = {"source": cfg.source, "name": cfg.name, "seed": seed, "num_classes": num_classes,
               "class_names": class_names(pool, num_classes),
               "sizes": {k: len(v) for k, v in splits.items()}, "separate_test_set": test is not None}
    atomic_write_text(path, json.dumps({**summary, "splits": splits}))
    return summary


def random_transforms(cfg: DataConfig, rand_augment: str | None = None) -> bool:
    """Whether the training images are transformed at random (else they are the same every epoch)."""
    return cfg.source != "digits" and (cfg.augment or bool(rand_augment))


def load_data(cfg: DataConfig, splits_path: str | Path, rand_augment: str | None = None,
              pin_memory: bool = False) -> Data:
    """The splits of a run; `rand_augment` (timm's config string) adds RandAugment to the training split's images;
    `pin_memory` when batches go to a GPU."""
    saved = json.loads(Path(splits_path).read_text())
    pool, pool_eval, test, labels = _sources(cfg, rand_augment)
    split_labels = {"train": labels[saved["splits"]["train"]], "rate": labels[saved["splits"]["rate"]],
                    "test": _targets(test) if test is not None else labels[saved["splits"]["test"]]}
    augmented = random_transforms(cfg, rand_augment)
    if cfg.source != "digits" and cfg.cache_mb:
        pool_eval, test = Decoded(pool_eval), Decoded(test) if test is not None else None
    if not augmented:
        pool = pool_eval  # the same images every epoch: one dataset (one decoded copy) for every split
    idx = saved["splits"]
    names = saved.get("class_names") or [str(i) for i in range(saved["num_classes"])]  # older files name none
    return Data(train=Subset(pool, idx["train"]), rate=Subset(pool_eval, idx["rate"]),
                test=test if test is not None else Subset(pool_eval, idx["test"]),
                num_classes=saved["num_classes"], in_chans=cfg.channels, image_size=cfg.image_size,
                labels=split_labels, class_names=list(names),
                loading=Loading(cfg.num_workers, pin_memory, cfg.cache_mb * 2**20), augmented=augmented)


def eval_view(data: Data) -> Data:
    """The same splits with the training split under eval transforms (for teacher features and calibration)."""
    train = data.train
    if isinstance(train, Subset) and isinstance(data.rate, Subset) and train.dataset is not data.rate.dataset:
        train = Subset(data.rate.dataset, train.indices)
    return Data(train, data.rate, data.test, data.num_classes, data.in_chans, data.image_size, data.labels,
                data.class_names, data.loading, augmented=False)
