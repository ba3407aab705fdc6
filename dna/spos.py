"""The single-path one-shot (SPOS) baseline: one supernet of whole networks, trained on labels with one uniformly
sampled path per step; a network is rated by its hold-out cross-entropy with the weights it inherits (its accuracy is
kept beside it).

The supernet holds every piece of every network of the space (the space's own pieces: stem, layers, heads) once,
keyed by block, position in the block, op and widths: the first layers of cells of one width share weights whatever
their depth, as in SPOS with a depth choice. A network's path is its stem, layers and head in turn, so with
inherited weights it computes what the network built by the space computes (dropout aside).

Compute rule (`training_epochs`): distillation trains, per step, one path through every cell of every block on a
batch: distill.epochs x (steps per epoch) x (cells of all blocks) block-paths. A whole-network path is one block-path
per block, so SPOS gets distill.epochs x (cells of all blocks) / (blocks) epochs (rounded up) at the same batch size
on the same training split. The teacher's forward passes of distillation are not counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from dna.data import Data
from dna.engine import Engine
from dna.rate import calibrate
from dna.recipe import make_optimizer, make_scheduler, step_updates, updates_per_epoch
from dna.spaces.base import Cell, Choice, Piece, SearchSpace

if TYPE_CHECKING:
    from dna.config import Params


def layer_key(block: int, index: int, piece: Piece) -> str:
    """The supernet's module of a block's index-th layer: one per op, widths and stride (layers of the same index
    share it across cells)."""
    return f"b{block}_p{index}_o{piece.op}_i{piece.in_width}_w{piece.width}_s{piece.stride}"


class SposSupernet(nn.Module):
    """Every stem, layer and head piece of the space once; forward(x, choice) runs one network's path."""

    def __init__(self, space: SearchSpace):
        super().__init__()
        self.space = space
        self.stem = space.piece_module(space.stem_piece())
        layers = {}
        for block in range(space.num_blocks):
            for cell in space.cells(block):
                for in_width in space.in_widths(block):
                    for op in range(len(space.ops)):
                        for index, piece in enumerate(space.layer_pieces(cell, (op,) * cell.depth, in_width)):
                            key = layer_key(block, index, piece)
                            if key not in layers:
                                layers[key] = space.piece_module(piece)
        self.layers = nn.ModuleDict(layers)
        widths = sorted({c.width for c in space.cells(space.num_blocks - 1)})
        self.heads = nn.ModuleDict({str(w): space.piece_module(space.head_piece(w)) for w in widths})

    def keys(self, choice: Choice) -> tuple[list[str], int]:
        """The layer keys of a network's path, and the width its head takes."""
        keys, width = [], self.space.stem_piece().width
        for cell, ops in choice:
            keys += [layer_key(cell.block, i, p) for i, p in enumerate(self.space.layer_pieces(cell, ops, width))]
            width = cell.width
        return keys, width

    def path(self, choice: Choice) -> nn.Sequential:
        """The network's modules in turn (sharing the supernet's weights)."""
        keys, width = self.keys(choice)
        return nn.Sequential(self.stem, *(self.layers[k] for k in keys), self.heads[str(width)])

    def forward(self, x: torch.Tensor, choice: Choice) -> torch.Tensor:
        return self.path(choice)(x)


def uniform_choice(space: SearchSpace, generator: torch.Generator) -> Choice:
    """Per block a cell uniformly at random, then per layer an op uniformly at random."""
    choice = []
    for block in range(space.num_blocks):
        cells = space.cells(block)
        cell: Cell = cells[int(torch.randint(len(cells), (1,), generator=generator))]
        choice.append((cell, tuple(torch.randint(len(space.ops), (cell.depth,), generator=generator).tolist())))
    return choice


def training_epochs(params: Params, space: SearchSpace) -> int:
    """rank.spos.epochs, or the compute of the block supernets (see the module's docstring)."""
    if params.rank.spos.epochs is not None:
        return params.rank.spos.epochs
    cells = sum(len(space.cells(b)) for b in range(space.num_blocks))
    return math.ceil(params.distill.epochs * cells / space.num_blocks)


@dataclass
class SposResult:
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0
    epochs: int = 0
    steps: int = 0  # optimizer steps, one whole-network path each


def train_spos(space: SearchSpace, data: Data, params: Params, ckpt_path: str | Path, *, fingerprint: str,
               device: torch.device, on_epoch: Callable[[dict], None] | None = None) -> tuple[SposSupernet, SposResult]:
    """Train the supernet (resumable from `ckpt_path` when it holds a run of the same fingerprint)."""
    cfg, seed = params.rank.spos, params.seed
    batch_size, epochs = params.distill.batch_size, training_epochs(params, space)
    torch.manual_seed(seed * 7919 + 17)
    supernet = SposSupernet(space).to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(supernet, cfg, batch_size)
    scheduler = make_scheduler(optimizer, cfg, updates_per_epoch(len(data.train), batch_size), epochs=epochs)
    paths = torch.Generator()

    def batches(epoch: int, generator: torch.Generator):
        paths.manual_seed(seed * 300_007 + epoch)  # each epoch's paths independent of the last (resumable)
        return data.loader("train", batch_size, shuffle=True, generator=generator)

    def step(batch):
        x, y = batch
        logits = supernet(x, uniform_choice(space, paths))
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        return loss, {"train_accuracy": int((logits.argmax(1) == y).sum())}

    fitted = Engine(supernet, optimizer, scheduler, batches, step, epochs=epochs, checkpoint=Path(ckpt_path),
                    fingerprint=fingerprint, seed=seed * 100_003 + 7, device=device, name="spos",
                    precision=cfg.precision, after_step=step_updates(scheduler, cfg), on_epoch=on_epoch).fit()
    steps = epochs * math.ceil(len(data.train) / batch_size)
    return supernet, SposResult(fitted.history, fitted.resumed_from, epochs, steps)


@torch.no_grad()
def inherited_scores(supernet: SposSupernet, choice: Choice, calibration: torch.Tensor, loader,
                     device: torch.device) -> tuple[float, float]:
    """A network's mean cross-entropy and accuracy on `loader` with the supernet's weights, its BatchNorm statistics
    re-estimated on the calibration batch first (shared weights carry statistics of the mixture of paths). The loss
    rates it: unlike accuracy on a few hundred images, it does not move in steps of one image or tie."""
    path = supernet.path(choice)
    calibrate(path, calibration.to(device, memory_format=torch.channels_last))
    path.eval()
    loss = correct = total = 0.0
    for x, y in loader:
        logits = path(x.to(device, non_blocking=True)).float().cpu()
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        total += len(y)
    return loss / max(total, 1), correct / max(total, 1)
