"""Rating every candidate of a block: BatchNorm re-estimated on a fixed calibration batch, then
score = mean |Y - Y_hat| / std(Y) on the rating hold-out split.

Candidates are visited depth-first and the features of a shared prefix are computed once: a candidate's
BatchNorm statistics depend only on its own prefix, so this equals rating each candidate on its own.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import pandas as pd
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from dna.space import CellSupernet, SearchSpace
from dna.targets import TargetSource

Path_ = tuple[int, ...]


def _norms(module: nn.Module) -> list[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


@torch.no_grad()
def calibrate(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Reset the module's BatchNorm statistics to those of batch x; returns its train-mode output on x."""
    norms = _norms(module)
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
    module.train()
    out = module(x)
    module.eval()
    for bn, m in zip(norms, momenta):
        bn.momentum = m
    return out


def _stats(module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(bn.running_mean.clone(), bn.running_var.clone()) for bn in _norms(module)]


def _load_stats(module: nn.Module, stats) -> None:
    for bn, (mean, var) in zip(_norms(module), stats):
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)


class _Scores:
    """Running sums of |Y - Y_hat| per candidate and of Y's moments."""

    def __init__(self):
        self.abs: dict[Path_, float] = {}
        self.count = 0
        self.total = 0.0
        self.squares = 0.0

    def add_target(self, y: torch.Tensor) -> None:
        y = y.double()
        self.count += y.numel()
        self.total += float(y.sum())
        self.squares += float((y * y).sum())

    def std(self) -> float:
        mean = self.total / self.count
        return max(self.squares / self.count - mean * mean, 0.0) ** 0.5

    def result(self) -> dict[Path_, float]:
        std = self.std()
        return {p: s / self.count / std for p, s in self.abs.items()}


@torch.no_grad()
def rate_cell(cell: CellSupernet, depth: int, calib: torch.Tensor, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
              num_ops: int, only: Iterable[Path_] | None = None, progress: bool = True) -> dict[Path_, float]:
    """Scores of every candidate of one cell (or of those in `only`), depth-first with prefix reuse."""
    cell.eval()
    layers, fixed = list(cell.layers), cell.num_fixed
    stats: dict[Path_, list] = {}
    wanted = None if only is None else {tuple(p[:i]) for p in only for i in range(1, depth + 1)}

    def ops_at(prefix: Path_) -> Iterable[int]:
        if len(prefix) < fixed:
            return range(1)
        searched = prefix[fixed:]
        return [op for op in range(num_ops) if wanted is None or searched + (op,) in wanted]

    def calibrate_tree(prefix: Path_, x: torch.Tensor) -> None:
        level = len(prefix)
        if level == fixed + depth:
            calibrate(cell.adapter, x)
            stats[prefix + (-1,)] = _stats(cell.adapter)
            return
        for op in ops_at(prefix):
            out = calibrate(layers[level][op], x)
            stats[prefix + (op,)] = _stats(layers[level][op])
            calibrate_tree(prefix + (op,), out)

    calibrate_tree((), calib)
    scores = _Scores()

    def evaluate_tree(prefix: Path_, x: torch.Tensor, y: torch.Tensor) -> None:
        level = len(prefix)
        if level == fixed + depth:
            _load_stats(cell.adapter, stats[prefix + (-1,)])
            err = float((cell.adapter(x) - y).abs().sum())
            key = prefix[fixed:]
            scores.abs[key] = scores.abs.get(key, 0.0) + err
            return
        for op in ops_at(prefix):
            _load_stats(layers[level][op], stats[prefix + (op,)])
            evaluate_tree(prefix + (op,), layers[level][op](x), y)

    for x, y in tqdm(batches, desc="rating", leave=False, disable=not progress):
        scores.add_target(y)
        evaluate_tree((), x, y)
    return scores.result()


@torch.no_grad()
def rate_candidate_naive(cell: CellSupernet, ops: Path_, calib: torch.Tensor,
                         batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Reference: one candidate rated on its own (its whole path re-calibrated, then evaluated)."""
    path = [choices[i] for choices, i in zip(cell.layers, cell.full_path(ops))]
    net = nn.Sequential(*path, cell.adapter)
    calibrate(net, calib)
    scores = _Scores()
    for x, y in batches:
        scores.add_target(y)
        scores.abs[ops] = scores.abs.get(ops, 0.0) + float((net(x) - y).abs().sum())
    return scores.result()[ops]


def rate_block(space: SearchSpace, supernet: nn.ModuleDict, targets: TargetSource, block: int, *,
               calibration_size: int, batch_size: int) -> pd.DataFrame:
    """The block's rating table: one row per (candidate, input width) with cell, ops, score, params, macs."""
    calib, _ = targets.first(block, "train", calibration_size)
    table = space.candidate_table(block)
    scores = {}
    for cell in space.cells(block):
        num_ops = len(supernet[cell.name].layers[-1])
        got = rate_cell(supernet[cell.name], cell.depth, calib, targets.pairs(block, "rate", batch_size), num_ops)
        scores.update({(cell.name, "-".join(map(str, p))): s for p, s in got.items()})
    table["score"] = [scores[(c, p)] for c, p in zip(table["cell"], table["path"])]
    return table
