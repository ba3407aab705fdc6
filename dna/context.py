"""What a stage reads of a configured run, in three widening contexts: this one (params, where the files go, the
device, the data), dna.spaces.context.SpaceContext (and the search space), dna.run.Run (and the block supervision,
with the blocks before the one it trains).

A stage names the narrowest it needs in the stage table (dna.stages.Stage.context) and gets a view of the run of that
class: what it reads beyond it is an AttributeError, never a silent import. So its DVC code dependencies, the modules
its function and its context import, hold everything that can change what it writes (flows/code_deps.py).
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

from dna.checkpoint import digest, file_digest
from dna.errors import ConfigError, needed
from dna.paths import Paths, ReplicatePaths

if TYPE_CHECKING:
    import torch

    from dna.config import Params, TrainConfig
    from dna.data import Data


EpochHook = Callable[[dict], None] | None
EVAL_BATCH_SIZE = 256  # images per batch when evaluating a whole split (the test split may not fit in memory)
C = TypeVar("C", bound="Context")


def shared(method: Callable) -> property:
    """A property made once per run and shared by every view of it (Context.view, Context.for_target)."""
    name = method.__name__

    @functools.wraps(method)
    def get(self):
        if name not in self.shared:
            self.shared[name] = method(self)
        return self.shared[name]
    return property(get)


class Context:
    """One configured run as its narrowest stages see it: its params, where its files go, the device and the data.
    Its target's files are those of the first (primary) search target, another's through for_target.

    `replicate` > 0: the same run with its blocks distilled (and rated) again from another seed, into
    rank/replicates/<replicate>/ (dna.paths.ReplicatePaths); everything else is the run's own."""

    def __init__(self, params: Params, replicate: int = 0, paths: Paths | None = None, cache: dict | None = None):
        self.params = params
        self.replicate = replicate
        if paths is None:
            primary = next(iter(params.search.named_targets()))
            paths = Paths(params.out_dir, primary) if not replicate else ReplicatePaths(
                params.out_dir, primary, Paths(params.out_dir).rank_replicates / str(replicate))
        self.paths = paths
        self.shared: dict = {} if cache is None else cache  # what is loaded, shared by the run's views

    def view(self, cls: type[C]) -> C:
        """This run as a context of class `cls` (a narrower or a wider one), sharing what is loaded."""
        return cls(self.params, self.replicate, self.paths, self.shared)

    def for_target(self, target: str):
        """This run at another search target (its network, retraining, export), sharing what is loaded."""
        names = self.params.search.named_targets()
        if target not in names:
            raise ConfigError(f"target {target!r}: the search targets are {', '.join(names)}")
        other = copy.copy(self)
        other.paths = self.paths.at(target)
        return other

    @property
    def distill_seed(self) -> int:
        return self.params.seed + 1_000_003 * self.replicate

    @shared
    def device(self) -> torch.device:
        from dna.ddp import resolve_device

        return resolve_device(self.params.device)

    @shared
    def data(self) -> Data:
        from dna.data import load_data

        return load_data(self.params.data, self.splits(), pin_memory=self.device.type == "cuda")

    def data_for(self, train: TrainConfig) -> Data:
        """The data a classifier trains on: the run's, with timm's RandAugment on its training images when `train`
        asks for it (train.rand_augment)."""
        from dna.data import load_data

        if train.rand_augment is None:
            return self.data
        return load_data(self.params.data, self.splits(), rand_augment=train.rand_augment,
                         pin_memory=self.device.type == "cuda")

    def splits(self) -> Path:
        return needed(self.paths.splits, "data")

    @shared
    def num_classes(self) -> int:
        from dna.data import class_count

        return class_count(self.params.data, self.paths.splits)

    def teacher_fingerprint(self) -> str:
        """What determines the teacher's training, so that a checkpoint of another configuration is not resumed."""
        t = self.params.teacher
        files = [file_digest(f) for f in (t.checkpoint, t.arch) if f] if t.source in ("checkpoint", "arch") else []
        return digest(self.params.seed, self.params.data, t, *files)
