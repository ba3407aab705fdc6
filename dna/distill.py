"""Block-wise distillation: train every cell of one block on (target input, target output) pairs, one path per step."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch import nn

from dna.checkpoint import load_checkpoint
from dna.config import DistillConfig
from dna.progress import progress
from dna.spaces.base import SearchSpace
from dna.targets import TargetSource
from dna.train import check_finite, resume_training, save_training

log = logging.getLogger(__name__)


def build_block(space: SearchSpace, block: int, shapes: list[tuple[int, int, int]], in_chans: int) -> nn.ModuleDict:
    """The supernets of every cell of a block, keyed by cell name."""
    in_chs = in_chans if block == 0 else shapes[block - 1][0]
    return nn.ModuleDict({c.name: space.build_cell(c, in_chs, shapes[block][0]) for c in space.cells(block)})


def load_block(space: SearchSpace, block: int, shapes, in_chans: int, path: str | Path) -> nn.ModuleDict:
    supernet = build_block(space, block, shapes, in_chans)
    supernet.load_state_dict(load_checkpoint(path)["model"])
    return supernet.eval()


@dataclass
class DistillResult:
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0


def distill_block(space: SearchSpace, targets: TargetSource, block: int, cfg: DistillConfig, ckpt_path: str | Path, *,
                  in_chans: int, seed: int, fingerprint: str, device: torch.device,
                  on_epoch: Callable[[dict], None] | None = None) -> DistillResult:
    """Train one block's cells; every step each cell trains one uniformly sampled path on the same batch (MSE loss).

    Cells share no weights, so this equals training each cell on its own, with one pass over the data.
    Checkpoints every epoch; a checkpoint with the same fingerprint is resumed from.
    """
    ckpt_path = Path(ckpt_path)
    torch.manual_seed(seed * 1009 + block)
    cells = space.cells(block)
    supernet = build_block(space, block, targets.shapes(), in_chans).to(device, memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(supernet, opt="adam", lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.lr_decay)
    result = DistillResult()
    if state := resume_training(ckpt_path, fingerprint, supernet, optimizer, scheduler):
        result.history, result.resumed_from = list(state["history"]), int(state["epoch"])
        log.info("block %d: resuming after epoch %d", block, result.resumed_from)
    num_ops = [len(supernet[c.name].layers[-1]) for c in cells]
    for epoch in range(result.resumed_from, cfg.epochs):
        supernet.train()
        shuffle = torch.Generator().manual_seed(seed * 100_003 + block * 1_009 + epoch)
        paths = torch.Generator().manual_seed(seed * 200_003 + block * 1_013 + epoch)
        sums = {c.name: 0.0 for c in cells}
        seen = 0
        bar = progress(targets.pairs(block, "train", cfg.batch_size, shuffle=True, generator=shuffle),
                       f"block {block} epoch {epoch + 1}/{cfg.epochs}")
        for step, (x, y) in enumerate(bar):
            x = x.contiguous(memory_format=torch.channels_last)
            losses = []
            for cell, n in zip(cells, num_ops):
                ops = tuple(torch.randint(n, (cell.depth,), generator=paths).tolist())
                losses.append(F.mse_loss(supernet[cell.name](x, ops), y))
            loss = torch.stack(losses).sum()
            check_finite(loss, f"block {block}", epoch + 1, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for cell, cell_loss in zip(cells, losses):
                sums[cell.name] += cell_loss.item() * len(x)
            seen += len(x)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        scheduler.step()
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
               **{f"loss_{name}": total / seen for name, total in sums.items()}}
        row["loss"] = sum(row[f"loss_{c.name}"] for c in cells) / len(cells)
        result.history.append(row)
        save_training(ckpt_path, fingerprint, supernet, optimizer, scheduler, epoch + 1, result.history)
        log.info("block %d epoch %d/%d: mean cell loss %.5f", block, epoch + 1, cfg.epochs, row["loss"])
        if on_epoch:
            on_epoch(row)
    return result
