"""Rating every candidate of a block: BatchNorm re-estimated on a fixed calibration batch, then scored on the rating
hold-out split by the block supervision's scorer (DNA: mean |Y - Y_hat| / std(Y)).

Candidates are visited depth-first and the features of a shared prefix are computed once: a candidate's
BatchNorm statistics depend only on its own prefix, so this equals rating each candidate on its own.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from dna.progress import progress as progress_of
from dna.spaces.base import Candidates, CellSupernet, SearchSpace

if TYPE_CHECKING:
    from dna.supervision import BlockSupervision, Scorer

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

    def outputs(self, prefix: Path_, calib_outs: list[torch.Tensor] | None,
                outs: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """adapter(out) for each sibling, in turn; `calib_outs` (first walk only) calibrates them."""
        if self.kind == "identity":
            yield from outs
            return
        if self.kind == "conv_bn":
            yield from self._conv_bn(prefix, calib_outs, outs)
            return
        for i, out in enumerate(outs):
            if calib_outs is not None:
                calibrate(self.adapter, calib_outs[i], self.norms)
                self.stats[prefix + (i,)] = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in self.norms]
            else:
                _load_stats(self.norms, self.stats[prefix + (i,)])
            yield self.adapter(out)

    def _conv_bn(self, prefix, calib_outs, outs) -> Iterator[torch.Tensor]:
        conv, bn = self.adapter
        if calib_outs is not None:
            stats = []
            for z in conv(torch.cat(calib_outs)).chunk(len(calib_outs)):
                # what calibrate() does to the BatchNorm: reset, then one cumulative-average update
                mean, var = torch.zeros_like(bn.running_mean), torch.ones_like(bn.running_var)
                F.batch_norm(z, mean, var, None, None, True, 1.0, bn.eps)
                stats.append((mean, var))
            self.stats[prefix] = stats
        for z, (mean, var) in zip(conv(torch.cat(outs)).chunk(len(outs)), self.stats[prefix]):
            yield F.batch_norm(z, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps)


@torch.no_grad()
def rate_cell(cell: CellSupernet, depth: int, calib: torch.Tensor, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
              num_ops: int, *, scorer: Scorer, only: Iterable[Path_] | None = None, progress: bool = True,
              stack_bytes: int = STACK_BYTES) -> dict[Path_, float]:
    """Scores of every candidate of one cell (or of those in `only`), depth-first with prefix reuse; `scorer` (fresh,
    from the supervision) accumulates them.

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
            for key, pred in zip(leaves, adapter.outputs(prefix, calib_outs if c is not None else None, outs)):
                scorer.add_error(key, pred, y)

    first = True
    for x, y in progress_of(_stacked(batches, stack_bytes), "rating", disable=not progress):
        scorer.add_target(y)
        walk((), calib if first else None, x, y)
        first = False
    return scorer.result()


@torch.no_grad()
def rate_candidate_naive(cell: CellSupernet, ops: Path_, calib: torch.Tensor,
                         batches: Iterator[tuple[torch.Tensor, torch.Tensor]], *, scorer: Scorer) -> float:
    """Reference: one candidate rated on its own (its whole path re-calibrated, then evaluated)."""
    path = [choices[i] for choices, i in zip(cell.layers, cell.full_path(ops))]
    net = nn.Sequential(*path, cell.adapter)
    calibrate(net, calib)
    for x, y in batches:
        scorer.add_target(y)
        scorer.add_error(ops, net(x), y)
    return scorer.result()[ops]


def rate_block(space: SearchSpace, supernet: nn.ModuleDict, supervision: BlockSupervision, block: int, *,
               calibration_size: int, batch_size: int, seed: int = 0) -> Candidates:
    """The block's candidates, one row per (candidate, input width), with their scores.

    `supervision` as rating sees it (its for_rating()) gives the batches and the score. BatchNorm is calibrated on
    a seeded, class-stratified sample of the training split (the same for every cell)."""
    calib, _ = supervision.sample(block, "train", calibration_size, seed)
    table = space.candidate_table(block)
    scores = {}
    for cell in space.cells(block):
        num_ops = len(supernet[cell.name].layers[-1])
        got = rate_cell(supernet[cell.name], cell.depth, calib, supervision.pairs(block, "rate", batch_size), num_ops,
                        scorer=supervision.scorer(block))
        scores.update({(cell, ops): s for ops, s in got.items()})
    return table.with_scores(scores[(cell, ops)] for cell, ops in zip(table.cells, table.ops))
