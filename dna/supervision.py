"""Block supervision: what each block of the supernet learns to reproduce, and how its candidates are rated.

A supervision prepares its targets once (`prepare`: the features stage), yields batches of pairs for training (block
input, and a target or a second view) and rating (block input, target), defines the training criterion and the
rating score. params.yaml picks one by `supervision.kind`; the stages see only the `BlockSupervision` protocol.
Kinds: "teacher" (DNA, dna/targets.py) and "ssl" (DNA++, teacher-free ensemble bootstrapping, dna/self_supervision.py).

Adding a kind takes one module: a class implementing the protocol, with `from_run(run)`, decorated with
`@SUPERVISIONS.register(kind)` (dna.registry); a kind that ships with dna is registered in `_built_in` instead, so
that its module imports nothing of this one.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Hashable, Iterator, Protocol

from dna.registry import Registry

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from pydantic import BaseModel

    from dna.config import Params, SupervisionConfig
    from dna.data import Data
    from dna.paths import Paths
    from dna.spaces.base import SearchSpace


class Scorer(Protocol):
    """Accumulates the rating of many candidates over rating batches; a lower score is better."""

    def add_target(self, target: torch.Tensor) -> None:
        """Once per rating batch, before the candidates' errors on it."""

    def add_error(self, key: Hashable, pred: torch.Tensor, target: torch.Tensor) -> None:
        """One candidate's prediction on the batch last passed to add_target."""

    def result(self) -> dict[Hashable, float]: ...


class SupervisionContext(Protocol):
    """What a supervision may use of the run it serves (dna.run.Run is one): it reads the blocks before the one it
    trains through `rating` and `trained_supernet`, never by running a stage itself."""

    params: Params
    paths: Paths
    data: Data
    device: torch.device
    space: SearchSpace

    def rating(self, block: int) -> pd.DataFrame:
        """The block's rating (one row per candidate: cell, path, score), made when it is not yet."""

    def trained_supernet(self, block: int, shapes: list[tuple[int, int, int]]) -> torch.nn.Module:
        """The block's supernet as these settings' distillation left it."""


class BlockSupervision(Protocol):
    """What the features, distill and rate stages need of a block supervision.

    Built by `from_run(run)` (a classmethod) from a SupervisionContext: params, paths, data, device, the search
    space, and the blocks of earlier stages.

    Class attributes: `uses_teacher` (False: the teacher stage builds, trains and downloads nothing) and
    `progressive` (True: block i needs blocks 0..i-1 trained and rated, so blocks run one after the other).
    """

    uses_teacher: bool
    progressive: bool

    def fingerprint(self) -> str:
        """What the targets depend on; a block trained against other targets is not resumed."""

    def prepare(self) -> None:
        """Work done once before any block trains (e.g. a cache of targets); a no-op when already done."""

    def shapes(self) -> list[tuple[int, int, int]]:
        """(channels, height, width) of every block's target."""

    def pairs(self, block: int, split: str, batch_size: int, shuffle: bool = False,
              generator: torch.Generator | None = None,
              sharded: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(block input, block target) batches of a split; sharded: this process's part of every global batch
        (dna.ddp.rank_batches), for data-parallel training."""

    def sample(self, block: int, split: str, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed, seeded batch of `count` pairs drawn with every class represented (the calibration batch)."""

    def criterion(self, block: int, cells: torch.nn.ModuleDict) -> torch.nn.Module:
        """What turns a training step's cell outputs into one loss per cell: `losses(outputs, second)` (second: the
        batch's target or second view) and `after_step(updates)`, called after every optimizer step. Its weights
        train with the cells and its state is saved with them (dna.distill.PairLoss: none)."""

    def scorer(self, block: int) -> Scorer:
        """A fresh accumulator of the rating score of the block's candidates."""

    def for_rating(self) -> BlockSupervision:
        """The same supervision as rating sees it: the training split (calibration) without augmentation."""


def _built_in() -> None:
    from dna.self_supervision import SelfSupervised
    from dna.targets import TeacherTargets

    SUPERVISIONS.register("teacher", TeacherTargets)
    SUPERVISIONS.register("ssl", SelfSupervised)


SUPERVISIONS: Registry[type] = Registry("block supervision", "supervision.kind", _built_in)


def supervision_class(kind: str) -> type:
    return SUPERVISIONS.get(kind)


def options_model(kind: str) -> type[BaseModel] | None:
    """The pydantic model of the kind's own keys in the supervision section (its class's `Options`), if any."""
    return getattr(supervision_class(kind), "Options", None)


def options_of(cfg: SupervisionConfig) -> BaseModel | None:
    """The kind's options (supervision.<key> beside kind), validated; None when the kind has none."""
    model = options_model(cfg.kind)
    return None if model is None else model.model_validate(dict(cfg.model_extra or {}))


def uses_teacher(params: Params) -> bool:
    """Whether the block supervision reads a teacher (a kind that is not registered uses one: its own check names
    the kinds). The teacher stage builds, trains and downloads nothing when it does not (DNA++)."""
    try:
        return supervision_class(params.supervision.kind).uses_teacher
    except ValueError:
        return True


def build_supervision(run: SupervisionContext) -> BlockSupervision:
    return supervision_class(run.params.supervision.kind).from_run(run)
