"""Teacher features as block supervision (DNA), registered as supervision kind "teacher".

The input of block i is the teacher's feature map at boundary i-1 (the image for block 0) and its target the
teacher's feature map at boundary i; a block learns it under the MSE loss and its candidates are rated by
mean |Y - Y_hat| / std(Y) on the rating split. `TargetSource` is the part of a supervision that distillation reads.

The teacher runs only as far as the last boundary a pass needs. With distill.cache_features it runs once per image
for all blocks: the images are stored in float32 (block 0's input is the image exactly as the loader gives it) and
the features in float16, half the disk and reads, about 3 significant digits, far finer than the errors rated.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Hashable, Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dna.checkpoint import checkpoint_digest, digest, file_digest, staged_dir
from dna.data import Data, eval_view
from dna.ddp import rank_batches
from dna.progress import progress

if TYPE_CHECKING:
    from dna.supervision import SupervisionContext

log = logging.getLogger(__name__)


class TargetSource(Protocol):
    def shapes(self) -> list[tuple[int, int, int]]: ...
    def criterion(self, block: int, cells: nn.ModuleDict) -> nn.Module: ...
    def pairs(self, block: int, split: str, batch_size: int, shuffle: bool = False,
              generator: torch.Generator | None = None,
              sharded: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
    def sample(self, block: int, split: str, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]: ...


FEATURE_DTYPE = np.float16  # of cached features (the images are cached in float32)
MARKER = "cache.json"  # written last into a complete feature cache: its fingerprint, shapes and dtypes


def boundary_features(teacher: nn.Module, x: torch.Tensor, boundaries: list[int]) -> list[torch.Tensor]:
    """The teacher's feature maps at the given stage boundaries, from timm's forward_intermediates, which stops after
    the last of them."""
    kwargs = {"indices": list(boundaries), "intermediates_only": True}
    accepted = inspect.signature(teacher.forward_intermediates).parameters
    if "extra_blocks" in accepted:
        kwargs["extra_blocks"] = True  # index every stage, not only those listed in feature_info
    if "stop_early" in accepted:
        kwargs["stop_early"] = True
    return teacher.forward_intermediates(x, **kwargs)


def teacher_shapes(model_name: str, in_chans: int, image_size: int, boundaries: list[int],
                   output_stride: int = 32) -> list[tuple[int, int, int]]:
    """(channels, height, width) at each boundary, computed on the meta device (no weights, no compute)."""
    import timm

    dilation = {"output_stride": output_stride} if output_stride != 32 else {}
    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False, in_chans=in_chans, num_classes=10, **dilation)
        return _meta_shapes(model.eval(), model_name, in_chans, image_size, boundaries)


def arch_teacher_shapes(arch_file: str | Path, in_chans: int, image_size: int,
                        boundaries: list[int]) -> list[tuple[int, int, int]]:
    """teacher_shapes of the network of an architecture file (teacher.source arch)."""
    from dna.arch import Arch

    with torch.device("meta"):
        model = Arch.load(arch_file).build(10, in_chans)
        return _meta_shapes(model.eval(), f"the network of {arch_file}", in_chans, image_size, boundaries)


def _meta_shapes(model: nn.Module, name: str, in_chans: int, image_size: int,
                 boundaries: list[int]) -> list[tuple[int, int, int]]:
    count = len(model.blocks) + 1 if hasattr(model, "blocks") else None
    if count is not None and max(boundaries) >= count:
        raise ValueError(f"teacher.boundaries={boundaries}: {name} has boundaries 1..{count - 1} (0 is the stem)")
    feats = boundary_features(model, torch.empty(1, in_chans, image_size, image_size), boundaries)
    return [tuple(f.shape[1:]) for f in feats]


class RelativeL1Score:
    """The DNA rating score of every candidate: mean |Y - Y_hat| / std(Y), Y the targets, Y_hat its outputs."""

    def __init__(self):
        self.abs: dict[Hashable, float] = {}
        self.count = 0
        self.total = 0.0
        self.squares = 0.0

    def add_target(self, target: torch.Tensor) -> None:
        y = target.double()
        self.count += y.numel()
        self.total += float(y.sum())
        self.squares += float((y * y).sum())

    def add_error(self, key: Hashable, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.abs[key] = self.abs.get(key, 0.0) + float((pred - target).abs().sum())

    def std(self) -> float:
        mean = self.total / self.count
        return max(self.squares / self.count - mean * mean, 0.0) ** 0.5

    def result(self) -> dict[Hashable, float]:
        std = self.std()
        return {key: s / self.count / std for key, s in self.abs.items()}


class TeacherTargets:
    """`key`: what the features depend on (digested by fingerprint(): it keys the cache)."""

    loss = staticmethod(F.mse_loss)
    uses_teacher = True
    progressive = False  # blocks are independent: they may train in parallel

    def __init__(self, teacher: nn.Module, boundaries: list[int], data: Data, device: torch.device,
                 cache_dir: str | Path | None = None, key: tuple = ()):
        self.teacher, self.boundaries, self.data, self.device = teacher.eval(), list(boundaries), data, device
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.key = key
        self._shapes: list[tuple[int, int, int]] | None = None
        self._warned = False  # about a cache that is there but cannot be read

    @classmethod
    def from_run(cls, run: SupervisionContext) -> TeacherTargets:
        """The run's teacher (the teacher stage's checkpoint) at teacher.boundaries, cached under distill/features
        unless distill.cache_features is off or the training images are augmented (then computed on the fly)."""
        from dna.teacher import load_teacher

        p, paths = run.params, run.paths
        cache = paths.features if p.distill.cache_features and not p.data.augment else None
        # the teacher's weights, the data, the exact splits (a new seed rebuilds the cache) and the boundaries
        key = (checkpoint_digest(paths.teacher), p.data, file_digest(paths.splits), p.teacher.boundaries)
        return cls(load_teacher(p, paths.teacher, run.device), p.teacher.boundaries, run.data, run.device, cache, key)

    def fingerprint(self) -> str:
        """What the targets depend on: the key, and their precision (float16 when cached)."""
        return digest(*self.key, np.dtype(FEATURE_DTYPE).name if self.cache_dir else "float32")

    def prepare(self) -> None:
        self.build_cache(self.fingerprint())

    def criterion(self, block: int, cells: nn.ModuleDict) -> nn.Module:
        from dna.distill import PairLoss

        return PairLoss(self.loss)

    def scorer(self, block: int | None = None) -> RelativeL1Score:
        return RelativeL1Score()

    def for_rating(self) -> TeacherTargets:
        return TeacherTargets(self.teacher, self.boundaries, eval_view(self.data), self.device, self.cache_dir,
                              self.key)

    @torch.no_grad()
    def features(self, x: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """The features at every boundary, or at the first `upto` (the teacher then stops at the last of them)."""
        return boundary_features(self.teacher, x.to(self.device, non_blocking=True), self.boundaries[:upto])

    def levels(self, x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, target) of a block for images x: the teacher runs only up to the block's boundary."""
        x = x.to(self.device, non_blocking=True)
        levels = [x, *self.features(x, upto=block + 1)]
        return levels[block], levels[block + 1]

    def shapes(self) -> list[tuple[int, int, int]]:
        if self._shapes is None:
            x = self.data.images("train", 1)
            self._shapes = [tuple(f.shape[1:]) for f in self.features(x)]
        return self._shapes

    # cache -----------------------------------------------------------------------------------------------------
    def _file(self, split: str, level: int, directory: Path | None = None) -> Path:
        return (directory or self.cache_dir) / f"{split}_{level}.npy"

    def build_cache(self, fingerprint: str, splits: tuple[str, ...] = ("train", "rate"), batch_size: int = 256) -> None:
        """Run the teacher once over each split and store the image and every boundary as memory-mapped arrays.

        The cache is built in a new folder beside cache_dir, its marker (cache.json) written last, and renamed into
        place when complete: a build that is killed, or that runs while others read, leaves the cache as it was."""
        if self.cache_dir is None or marker_fingerprint(self.cache_dir) == fingerprint:
            return
        shapes = [tuple(self.data.images("train", 1).shape[1:])] + self.shapes()
        dtypes = [np.float32] + [FEATURE_DTYPE] * len(self.boundaries)
        with staged_dir(self.cache_dir) as building:
            for split in splits:
                n = len(self.data.split(split))
                arrays = [np.lib.format.open_memmap(self._file(split, lvl, building), mode="w+", dtype=dtype,
                                                    shape=(n, *shape))
                          for lvl, (shape, dtype) in enumerate(zip(shapes, dtypes))]
                start = 0
                for x, _ in progress(self.data.loader(split, batch_size), f"teacher features ({split})"):
                    for lvl, f in enumerate([x, *self.features(x)]):
                        arrays[lvl][start:start + len(x)] = stored(f, dtypes[lvl], split, lvl)
                    start += len(x)
                for a in arrays:
                    a.flush()
            (building / MARKER).write_text(json.dumps({"fingerprint": fingerprint,
                                                       "shapes": [list(s) for s in shapes],
                                                       "dtypes": [np.dtype(d).name for d in dtypes]}))

    def _cached(self, split: str, block: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The cached input and target of a block, or None (they are then computed) unless the cache is complete and
        of these targets: its marker, written last, names their fingerprint. The folder is the same one before its
        marker is read and after its arrays are opened, so a cache renamed into place meanwhile is not read."""
        if self.cache_dir is None:
            return None
        try:
            before = os.stat(self.cache_dir)
            found = marker_fingerprint(self.cache_dir)
            if found != self.fingerprint():
                self._unusable(f"its marker {self.cache_dir / MARKER} is missing" if found is None else
                               f"it holds features of other settings (fingerprint {found})")
                return None
            arrays = (np.load(self._file(split, block), mmap_mode="r"),
                      np.load(self._file(split, block + 1), mmap_mode="r"))
            after = os.stat(self.cache_dir)
        except FileNotFoundError:
            return None
        if (before.st_dev, before.st_ino) != (after.st_dev, after.st_ino):
            self._unusable("it was replaced while being opened")
            return None
        return arrays

    def _unusable(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("teacher-feature cache %s not read: %s; the features are computed as needed (the distill "
                        "stage rebuilds the cache)", self.cache_dir, why)

    # pairs -----------------------------------------------------------------------------------------------------
    def pairs(self, block: int, split: str, batch_size: int, shuffle: bool = False,
              generator: torch.Generator | None = None,
              sharded: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if (cached := self._cached(split, block)) is not None:
            inputs, targets = cached
            n = len(inputs)
            if sharded:
                batches = rank_batches(n, batch_size, generator if shuffle else None)
            else:
                order = torch.randperm(n, generator=generator).numpy() if shuffle else np.arange(n)
                batches = [order[start:start + batch_size] for start in range(0, n, batch_size)]
            for batch in batches:
                idx = np.sort(batch)
                yield self._read(inputs, idx), self._read(targets, idx)
            return
        for x, _ in self.data.loader(split, batch_size, shuffle=shuffle, generator=generator, sharded=sharded):
            yield self.levels(x, block)

    def sample(self, block: int, split: str, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed batch (the calibration batch): `count` pairs of a split drawn with every class represented
        (Data.stratified), not the first ones, which in a class-sorted dataset hold one or two classes."""
        positions = self.data.stratified(split, count, seed)
        if (cached := self._cached(split, block)) is not None:
            inputs, targets = cached
            idx = np.asarray(positions)
            return self._read(inputs, idx), self._read(targets, idx)
        xs, ys = [], []
        for start in range(0, len(positions), 256):
            x, y = self.levels(self.data.images(split, positions=positions[start:start + 256]), block)
            xs.append(x)
            ys.append(y)
        return torch.cat(xs), torch.cat(ys)

    def _read(self, array: np.ndarray, idx: np.ndarray) -> torch.Tensor:
        """Rows of a cached array on the device, in float32 (float16 features travel at half size)."""
        return torch.from_numpy(array[idx]).to(self.device, non_blocking=True).float()


def marker_fingerprint(cache_dir: Path) -> str | None:
    """The fingerprint a complete feature cache's marker names; None when there is no readable marker."""
    try:
        return json.loads((cache_dir / MARKER).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def stored(features: torch.Tensor, dtype, split: str, level: int) -> np.ndarray:
    """Features as the cache stores them; raises when float16 cannot hold them (beyond +-65504)."""
    out = features.cpu().numpy().astype(dtype, copy=False)
    if dtype == np.float16 and not np.isfinite(out).all():
        raise ValueError(f"teacher features of the {split} split at boundary {level} exceed float16's range "
                         f"(largest magnitude {features.abs().max().item():.4g}): they cannot be cached in float16")
    return out
