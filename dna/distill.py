"""Block-wise distillation: train every cell of one block on (target input, target output) pairs, one path per step."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from dna.checkpoint import load_checkpoint
from dna.ddp import rank_and_world, wrap
from dna.engine import Engine
from dna.errors import ConfigError
from dna.recipe import make_optimizer, make_scheduler, step_updates, updates_per_epoch
from dna.spaces.base import Cell, SearchSpace

if TYPE_CHECKING:
    from dna.config import DistillConfig
    from dna.targets import TargetSource

CellLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PathSampler = Callable[[torch.Generator, Cell, int], tuple[int, ...]]


class PairLoss(nn.Module):
    """The criterion of a supervision whose batches are (input, target) pairs: every cell's output against the
    target under `loss` (DNA: the teacher's features under MSE). No weights, no state, nothing after a step."""

    def __init__(self, loss: CellLoss = F.mse_loss):
        super().__init__()
        self.loss = loss

    def losses(self, outputs: list[torch.Tensor], target: torch.Tensor) -> list[torch.Tensor]:
        return [self.loss(output, target) for output in outputs]

    def after_step(self, updates: int) -> None:
        pass


class BlockCells(nn.ModuleDict):
    """The supernets of every cell of a block, keyed by cell name; its forward runs one path of each on the same
    input (one call, as DistributedDataParallel needs to see the step)."""

    def forward(self, x: torch.Tensor, paths: dict[str, tuple[int, ...]]) -> list[torch.Tensor]:
        return [self[name](x, path) for name, path in paths.items()]


def build_block(space: SearchSpace, block: int, shapes: list[tuple[int, int, int]], in_chans: int) -> BlockCells:
    """The supernets of every cell of a block, keyed by cell name."""
    in_chs = in_chans if block == 0 else shapes[block - 1][0]
    return BlockCells({c.name: space.build_cell(c, in_chs, shapes[block][0]) for c in space.cells(block)})


def load_block(space: SearchSpace, block: int, shapes, in_chans: int, path: str | Path) -> nn.ModuleDict:
    supernet = build_block(space, block, shapes, in_chans)
    supernet.load_state_dict(load_checkpoint(path)["model"])
    return supernet.eval()


def uniform_path(generator: torch.Generator, cell: Cell, num_ops: int) -> tuple[int, ...]:
    """One op per layer of the cell, each uniformly at random."""
    return tuple(torch.randint(num_ops, (cell.depth,), generator=generator).tolist())


class FairPaths:
    """FairNAS's strict fairness: in every run of `num_ops` steps of a cell, each of its layers trains each op
    once (per layer and run, a random permutation of the ops), so no op of a layer falls behind another by more than
    one update. `reset()` starts new runs (at each epoch: a resumed epoch samples as an uninterrupted one)."""

    def __init__(self):
        self.queues: dict[Cell, list[tuple[int, ...]]] = {}

    def reset(self) -> None:
        self.queues.clear()

    def __call__(self, generator: torch.Generator, cell: Cell, num_ops: int) -> tuple[int, ...]:
        if not self.queues.get(cell):
            orders = torch.stack([torch.randperm(num_ops, generator=generator) for _ in range(cell.depth)], dim=1)
            self.queues[cell] = [tuple(row.tolist()) for row in orders]
        return self.queues[cell].pop(0)


SAMPLERS: dict[str, Callable[[], PathSampler]] = {"uniform": lambda: uniform_path, "fair": FairPaths}


@dataclass
class DistillResult:
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0


def distill_block(space: SearchSpace, targets: TargetSource, block: int, cfg: DistillConfig, ckpt_path: str | Path, *,
                  in_chans: int, seed: int, fingerprint: str, device: torch.device, train_images: int | None = None,
                  on_epoch: Callable[[dict], None] | None = None, loss: CellLoss | None = None,
                  sample_path: PathSampler | None = None) -> DistillResult:
    """Train one block's cells; every step each cell trains one sampled path on the same batch.

    The supervision's criterion (`targets.criterion(block, cells)`) turns the cells' outputs and the batch's second
    part into one loss per cell; its weights train with the cells, it runs after every optimizer step, and its state
    is checkpointed with them. `loss(output, target)` instead compares each output with the batch's target (a
    PairLoss). `sample_path` picks the path a cell trains at a step (by default the sampler `cfg.sampling` names) from a
    generator reseeded every epoch (and its `reset()`, if it has one, called).
    Cells share no weights, so this equals training each cell on its own, with one pass over the data.
    Checkpoints every epoch; a checkpoint with the same fingerprint is resumed from. `cfg` is the recipe (the paper's:
    Adam, x lr_decay per epoch); `cfg.batch_size` is the global batch, of `train_images` a pass (for a schedule
    updated per optimizer step); with several processes each trains on its part of it (dna.ddp).
    """
    torch.manual_seed(seed * 1009 + block)
    cells = space.cells(block)
    supernet = build_block(space, block, targets.shapes(), in_chans).to(device, memory_format=torch.channels_last)
    criterion = (PairLoss(loss) if loss is not None else targets.criterion(block, supernet)).to(device)
    if rank_and_world()[1] > 1 and any(True for _ in criterion.parameters()):
        raise ConfigError("distillation in several processes trains only the cells data-parallel; this supervision "
                          "trains weights of its own too: distill it in one process (nproc 1)")
    trained = nn.ModuleDict({"cells": supernet, "criterion": criterion})  # parameters in the cells' order first
    optimizer = make_optimizer(trained, cfg, cfg.batch_size)
    if cfg.lr_updates == "step" and not train_images:
        raise ConfigError("distill.lr_updates='step' needs the training images a pass holds (train_images)")
    scheduler = make_scheduler(optimizer, cfg, updates_per_epoch(train_images or 0, cfg.batch_size))
    num_ops = [len(supernet[c.name].layers[-1]) for c in cells]
    paths = torch.Generator()  # seeded alike on every process: all ranks train the same paths at a step
    sample_path = sample_path or SAMPLERS[cfg.sampling]()
    net = wrap(supernet, device, find_unused_parameters=True)

    def batches(epoch: int, shuffle: torch.Generator):
        paths.manual_seed(seed * 200_003 + block * 1_013 + epoch)  # each epoch's paths independent of the last
        if hasattr(sample_path, "reset"):
            sample_path.reset()
        return targets.pairs(block, "train", cfg.batch_size, shuffle=True, generator=shuffle, sharded=True)

    def step(batch):
        x, y = batch
        outputs = net(x, {cell.name: sample_path(paths, cell, n) for cell, n in zip(cells, num_ops)})
        losses = criterion.losses(outputs, y)
        return torch.stack(losses).sum(), {f"loss_{cell.name}": cell_loss.item() * len(x)
                                           for cell, cell_loss in zip(cells, losses)}

    def mean_cell_loss(row: dict) -> dict:
        return {"loss": sum(row[f"loss_{c.name}"] for c in cells) / len(cells)}

    fitted = Engine(net, optimizer, scheduler, batches, step, epochs=cfg.epochs, checkpoint=Path(ckpt_path),
                    fingerprint=fingerprint, seed=seed * 100_003 + block * 1_009, device=device, name=f"block {block}",
                    precision=cfg.precision, end_of_epoch=mean_cell_loss, on_epoch=on_epoch,
                    after_step=[*step_updates(scheduler, cfg), criterion.after_step],
                    states={"criterion": criterion} if criterion.state_dict() else {}).fit()
    return DistillResult(fitted.history, fitted.resumed_from)
