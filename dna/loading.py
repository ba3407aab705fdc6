"""How a split's batches are made: from tensors in memory, or by DataLoader workers; the decoded-image cache.

Whatever the path, a pass's order comes from the caller's generator alone (the same draws as torch's DataLoader:
one int64, then the permutation), and a randomly augmented sample is drawn under its own seed (that int64 plus its
position), so batches do not depend on the number of workers, and a resumed epoch sees the augmentations of an
uninterrupted one.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import random
import time
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

log = logging.getLogger(__name__)
DECODE_BATCH = 256


@contextlib.contextmanager
def seeded(seed: int):
    """torch's and Python's global random state set from `seed` inside the block, restored after it."""
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)


class Decoded(Dataset):
    """A dataset whose samples (decoded images after deterministic transforms, and labels) are computed once and then
    read from memory. Until `decode` has run, samples come from the dataset it wraps."""

    def __init__(self, base: Dataset):
        self.base = base
        self.images: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.refused = False  # did not fit the memory budget

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        if self.images is None:
            return self.base[i]
        return self.images[i], int(self.labels[i])

    def nbytes(self) -> int:
        """The memory the decoded images take (estimated from the first, before decoding)."""
        if self.images is not None:
            return self.images.nbytes + self.labels.nbytes
        return (self.base[0][0].nbytes + 8) * len(self)

    def decode(self, num_workers: int = 0) -> None:
        start = time.perf_counter()
        images = labels = None
        filled = 0
        # its own generator: decoding, whenever it happens, leaves the global random state (saved in checkpoints) alone
        for x, y in DataLoader(self.base, batch_size=DECODE_BATCH, num_workers=usable_workers(num_workers),
                               generator=torch.Generator()):
            if images is None:
                images = torch.empty((len(self), *x.shape[1:]), dtype=x.dtype)
                labels = torch.empty(len(self), dtype=torch.long)
            images[filled:filled + len(x)], labels[filled:filled + len(y)] = x, y
            filled += len(x)
        self.images, self.labels = images, labels
        log.info("decoded %d images once into memory (%.0f MiB) in %.1f s", len(self), self.nbytes() / 2**20,
                 time.perf_counter() - start)


@dataclass
class Budget:
    """Bytes left for decoded images (data.cache_mb), shared by the datasets of a run."""

    left: int

    def admit(self, dataset: Decoded) -> bool:
        """Whether `dataset` is decoded in memory: decodes it when it fits what is left."""
        if dataset.images is not None:
            return True
        if dataset.refused:
            return False
        size = dataset.nbytes()
        if size > self.left:
            dataset.refused = True
            log.info("%d images (%.0f MiB decoded) do not fit data.cache_mb (%.0f MiB left): decoded every pass",
                     len(dataset), size / 2**20, self.left / 2**20)
            return False
        self.left -= size
        return True


def usable_workers(num_workers: int) -> int:
    """num_workers, or 0 inside a daemonic process (a Dask or multiprocessing pool worker), which cannot have
    children."""
    if num_workers and multiprocessing.current_process().daemon:
        log.info("loading in this process: it is a daemonic worker, which cannot start data.num_workers processes")
        return 0
    return num_workers


def in_memory(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """(images, labels, positions into them or None for all) when a split's samples are tensors already in memory."""
    positions = None
    if isinstance(ds, Subset):
        ds, positions = ds.dataset, torch.as_tensor(ds.indices, dtype=torch.long)
    if isinstance(ds, TensorDataset) and len(ds.tensors) == 2:
        return ds.tensors[0], ds.tensors[1], positions
    if isinstance(ds, Decoded) and ds.images is not None:
        return ds.images, ds.labels, positions
    return None


def decoded_under(ds: Dataset) -> Decoded | None:
    if isinstance(ds, Subset):
        ds = ds.dataset
    return ds if isinstance(ds, Decoded) else None


class Samples(Dataset):
    """A split's samples asked for by (position, seed): with a seed, its random transforms draw from that seed."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, int | None]):
        position, seed = key
        if seed is None:
            return self.ds[position]
        with seeded(seed):
            return self.ds[position]


class Plan:
    """The batch sampler of a reused DataLoader: the batches of the pass about to start, set before each pass."""

    def __init__(self):
        self.batches: list[list[tuple[int, int | None]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class Workers:
    """A DataLoader kept for a split, so its worker processes persist from one pass to the next."""

    def __init__(self, ds: Dataset, num_workers: int, pin_memory: bool, persistent: bool):
        self.ds = ds
        self.plan = Plan()
        self.busy = False
        # its own generator: the DataLoader draws its workers' seeds from it, not from the global random state
        self.loader = DataLoader(Samples(ds), batch_sampler=self.plan, num_workers=num_workers, pin_memory=pin_memory,
                                 persistent_workers=persistent and num_workers > 0, generator=torch.Generator())

    def run(self, batches: list[list[tuple[int, int | None]]]) -> Iterator:
        self.plan.batches = batches
        self.busy = True
        try:
            yield from self.loader
        finally:
            self.busy = False


class Batches:
    """The (images, labels) batches of one split, in the order a generator gives; re-iterable (each pass draws
    its order anew, as a DataLoader does)."""

    def __init__(self, ds: Dataset, batch_size: int, shuffle: bool, generator: torch.Generator | None,
                 augmented: bool, loading: Loading, sharded: bool = False):
        self.ds, self.batch_size, self.shuffle, self.generator = ds, batch_size, shuffle, generator
        self.augmented, self.loading, self.sharded = augmented, loading, sharded

    def __len__(self) -> int:
        return -(-len(self.ds) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.ds)
        seed = None
        if self.shuffle or self.augmented:
            seed = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator))
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        decoded = decoded_under(self.ds)
        if decoded is not None and not self.augmented and self.loading.budget.admit(decoded):
            if decoded.images is None:
                decoded.decode(self.loading.num_workers)
        if self.sharded:
            from dna.ddp import rank_parts

            chunks = rank_parts(order, self.batch_size)
        else:
            chunks = order.split(self.batch_size)
        tensors = None if self.augmented else in_memory(self.ds)
        if tensors is not None:
            yield from self.from_memory(*tensors, chunks)
            return
        batches = [[(i, seed + i if self.augmented else None) for i in chunk.tolist()] for chunk in chunks]
        yield from self.loading.workers(self.ds, self.shuffle).run(batches)

    def from_memory(self, images: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None,
                    chunks: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for chunk in chunks:
            idx = chunk if positions is None else positions[chunk]
            x, y = images[idx], labels[idx]
            yield (x.pin_memory(), y.pin_memory()) if self.loading.pin_memory else (x, y)


class Loading:
    """How a run's splits are loaded: worker processes, pinned memory, the decoded-image budget."""

    def __init__(self, num_workers: int = 0, pin_memory: bool = False, cache_bytes: int = 0):
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.budget = Budget(cache_bytes)
        self._workers: dict[tuple[int, bool], Workers] = {}

    def workers(self, ds: Dataset, persistent: bool) -> Workers:
        """The split's kept DataLoader (persistent workers for training passes), or a new one while it is in use."""
        key = (id(ds), persistent)
        kept = self._workers.get(key)
        if kept is not None and kept.ds is ds and not kept.busy:
            return kept
        made = Workers(ds, usable_workers(self.num_workers), self.pin_memory, persistent)
        if kept is None or not kept.busy:
            self._workers[key] = made
        return made
