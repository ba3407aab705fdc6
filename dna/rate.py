"""Rating every candidate of a block: BatchNorm re-estimated on a fixed calibration batch, then
score = mean |Y - Y_hat| / std(Y) on the rating hold-out split.

Candidates are visited depth-first and the features of a shared prefix are computed once: a candidate's
BatchNorm statistics depend only on its own prefix, so this equals rating each candidate on its own.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from dna.progress import progress as progress_of
from dna.spaces.base import Candidates, CellSupernet, SearchSpace
from dna.targets import TargetSource

Path_ = tuple[int, ...]
STACK_BYTES = 64 * 2**20  # rating batches are stacked into chunks of up to this many bytes


def _norms(module: nn.Module) -> list[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


@torch.no_grad()
def calibrate(module: nn.Module, x: torch.Tensor, norms: list[_BatchNorm] | None = None) -> torch.Tensor:
    """Reset the module's BatchNorm statistics to those of batch x; returns its train-mode output on x.

    `norms` (the module's BatchNorm layers) may be passed to save looking them up on every call.
    """
    norms = _norms(module) if norms is None else norms
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


def _load_stats(norms: list[_BatchNorm], stats) -> None:
    for bn, (mean, var) in zip(norms, stats):
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)


Pair = tuple[torch.Tensor, torch.Tensor]


def _stacked(batches: Iterable[Pair], limit: int) -> Iterator[Pair]:
    """Consecutive batches concatenated into chunks of at most `limit` bytes (a larger batch stays whole)."""
    xs, ys, size = [], [], 0
    for x, y in batches:
        nbytes = x.numel() * x.element_size() + y.numel() * y.element_size()
        if xs and size + nbytes > limit:
            yield _cat(xs), _cat(ys)
            xs, ys, size = [], [], 0
        xs.append(x)
        ys.append(y)
        size += nbytes
    if xs:
        yield _cat(xs), _cat(ys)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class _AdapterLeaves:
    """The adapter at the leaves: calibrated per candidate, applied to all sibling candidates at once.

    For an adapter made of a conv and a BatchNorm, the conv runs once on the stacked outputs of the siblings and
    the BatchNorm is applied to each sibling's part with that sibling's statistics, computed by the same kernel
    calibrate() uses. Any other adapter is calibrated and run per leaf.
    """

    def __init__(self, adapter: nn.Module):
        self.adapter = adapter
        self.kind = "identity" if isinstance(adapter, nn.Identity) else None
        if (isinstance(adapter, nn.Sequential) and len(adapter) == 2 and type(adapter[0]) is nn.Conv2d
                and type(adapter[1]) is nn.BatchNorm2d and adapter[1].affine and adapter[1].track_running_stats):
            self.kind = "conv_bn"
        self.norms = _norms(adapter)
        self.stats: dict[Path_, object] = {}

    def errors(self, prefix: Path_, calib_outs: list[torch.Tensor] | None, outs: list[torch.Tensor],
               y: torch.Tensor) -> list[float]:
        """Sum of |adapter(out) - y| for each sibling; `calib_outs` (first walk only) calibrates them."""
        if self.kind == "identity":
            return [float((out - y).abs().sum()) for out in outs]
        if self.kind == "conv_bn":
            return self._conv_bn(prefix, calib_outs, outs, y)
        errs = []
        for i, out in enumerate(outs):
            if calib_outs is not None:
                calibrate(self.adapter, calib_outs[i], self.norms)
                self.stats[prefix + (i,)] = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in self.norms]
            else:
                _load_stats(self.norms, self.stats[prefix + (i,)])
            errs.append(float((self.adapter(out) - y).abs().sum()))
        return errs

    def _conv_bn(self, prefix, calib_outs, outs, y) -> list[float]:
        conv, bn = self.adapter
        if calib_outs is not None:
            stats = []
            for z in conv(torch.cat(calib_outs)).chunk(len(calib_outs)):
                # what calibrate() does to the BatchNorm: reset, then one cumulative-average update
                mean, var = torch.zeros_like(bn.running_mean), torch.ones_like(bn.running_var)
                F.batch_norm(z, mean, var, None, None, True, 1.0, bn.eps)
                stats.append((mean, var))
            self.stats[prefix] = stats
        errs = []
        for z, (mean, var) in zip(conv(torch.cat(outs)).chunk(len(outs)), self.stats[prefix]):
            out = F.batch_norm(z, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps)
            errs.append(float((out - y).abs().sum()))
        return errs


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
              num_ops: int, only: Iterable[Path_] | None = None, progress: bool = True,
              stack_bytes: int = STACK_BYTES) -> dict[Path_, float]:
    """Scores of every candidate of one cell (or of those in `only`), depth-first with prefix reuse.

    Rating batches are stacked into chunks of up to `stack_bytes` (inputs and targets), and the tree is walked once
    per chunk. The first walk calibrates every node's BatchNorm on its prefix's calibration features and rates the
    first chunk with them; later walks (only when the rating data exceeds one chunk) restore those statistics. At the
    leaves, the adapter is applied to all sibling ops at once when it is a 1x1 conv and a BatchNorm.
    """
    cell.eval()
    layers, fixed = list(cell.layers), cell.num_fixed
    leaf_level = fixed + depth - 1
    norms = {id(m): _norms(m) for choices in layers for m in choices}
    stats: dict[Path_, list] = {}
    adapter = _AdapterLeaves(cell.adapter)
    wanted = None if only is None else {tuple(p[:i]) for p in only for i in range(1, depth + 1)}
    scores = _Scores()

    def ops_at(prefix: Path_) -> Iterable[int]:
        if len(prefix) < fixed:
            return range(1)
        searched = prefix[fixed:]
        return [op for op in range(num_ops) if wanted is None or searched + (op,) in wanted]

    def walk(prefix: Path_, c: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor) -> None:
        level = len(prefix)
        leaves, calib_outs, outs = [], [], []
        for op in ops_at(prefix):
            layer, key = layers[level][op], prefix + (op,)
            c_out = None
            if c is not None:  # first walk: calibrate this node on its prefix's calibration features
                c_out = calibrate(layer, c, norms[id(layer)])
                stats[key] = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in norms[id(layer)]]
            else:
                _load_stats(norms[id(layer)], stats[key])
            out = layer(x)
            if level < leaf_level:
                walk(key, c_out, out, y)
                continue
            leaves.append(key[fixed:])
            calib_outs.append(c_out)
            outs.append(out)
        if leaves:
            errs = adapter.errors(prefix, calib_outs if c is not None else None, outs, y)
            for key, err in zip(leaves, errs):
                scores.abs[key] = scores.abs.get(key, 0.0) + err

    first = True
    for x, y in progress_of(_stacked(batches, stack_bytes), "rating", disable=not progress):
        scores.add_target(y)
        walk((), calib if first else None, x, y)
        first = False
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
               calibration_size: int, batch_size: int, seed: int = 0) -> Candidates:
    """The block's candidates, one row per (candidate, input width), with their scores.

    BatchNorm is calibrated on a seeded, class-stratified sample of the training split (the same for every cell)."""
    calib, _ = targets.sample(block, "train", calibration_size, seed)
    table = space.candidate_table(block)
    scores = {}
    for cell in space.cells(block):
        num_ops = len(supernet[cell.name].layers[-1])
        got = rate_cell(supernet[cell.name], cell.depth, calib, targets.pairs(block, "rate", batch_size), num_ops)
        scores.update({(cell, ops): s for ops, s in got.items()})
    return table.with_scores(scores[(cell, ops)] for cell, ops in zip(table.cells, table.ops))
