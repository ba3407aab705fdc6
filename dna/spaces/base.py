"""What every search space offers, the types it shares with rating, latency and the search, and the parts of a space
that follow from its pieces.

A block is split into cells (one depth and one width each); a candidate of a cell picks one op per layer. A network
of the space is a chain of pieces (the stem, one piece per layer, the head); its parameters, multiply-adds and
latency are the sums of its pieces'. `SpaceBase` derives the cost tables, the list of pieces to time and the size of
the space from that, so a space only says which pieces a network is made of and how to build each one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING, Iterable, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel
from torch import nn

from dna.arch import Arch, count_cost
from dna.errors import ConfigError

if TYPE_CHECKING:
    from dna.config import SpaceConfig

Ops = tuple[int, ...]


@dataclass(frozen=True)
class Cell:
    """A block's cell: its depth, its width, and the layer that carries the block's stride (`down`)."""

    block: int
    depth: int
    width: int
    down: int = 0

    @property
    def name(self) -> str:
        return f"d{self.depth}_w{self.width}" + (f"_down{self.down}" if self.down else "")


Choice = list[tuple[Cell, Ops]]  # a member network: the cell and ops of each block


class CellSupernet(nn.Module):
    """Every op of every layer of one cell; a path (one op index per layer) selects a candidate.

    Layers before `num_fixed` have a single choice (the stem of the first block); `adapter` maps the cell's output to
    the target for distillation and is not part of the final network.
    """

    def __init__(self, layers: list[list[nn.Module]], adapter: nn.Module, num_fixed: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleList(choices) for choices in layers)
        self.adapter = adapter
        self.num_fixed = num_fixed

    def full_path(self, ops: Ops) -> Ops:
        return (0,) * self.num_fixed + tuple(ops)

    def forward(self, x: torch.Tensor, ops: Ops) -> torch.Tensor:
        for choices, index in zip(self.layers, self.full_path(ops)):
            x = choices[index](x)
        return self.adapter(x)


@dataclass
class Extraction:
    """What extracting a subnet copied: every layer with a counterpart in the supernets, by the network's module
    name; the layers with a counterpart that could not be copied, with the reason (a width or input mismatch);
    and the tensors of the network that have no counterpart at all (the head)."""

    copied: list[str]
    not_copied: dict[str, str]
    no_counterpart: list[str]
    tensors: int

    def summary(self) -> dict:
        return {"supernet_layers_copied": len(self.copied), "supernet_tensors_copied": self.tensors,
                "supernet_not_copied": self.not_copied, "supernet_no_counterpart": self.no_counterpart}


def copy_layer(source: dict[str, torch.Tensor], src: str, target: dict[str, torch.Tensor], dst: str) -> str | None:
    """Copy every tensor under prefix `src` of `source` to prefix `dst` of `target`, or none of them; returns why
    not, or None when copied."""
    theirs = {k[len(src):]: v for k, v in source.items() if k.startswith(src)}
    ours = {k[len(dst):]: v for k, v in target.items() if k.startswith(dst)}
    if set(theirs) != set(ours):
        return f"different tensors: {sorted(set(theirs) ^ set(ours))[:4]}"
    mismatched = [k for k in ours if ours[k].shape != theirs[k].shape]
    if mismatched:
        convs = [k for k in ours if ours[k].dim() == 4]
        first = convs[0] if convs else mismatched[0]
        if convs and ours[first].shape[1] != theirs[first].shape[1] and ours[first].shape[1] > 1:
            return (f"input width {theirs[first].shape[1]} in the supernet, {ours[first].shape[1]} in this network "
                    f"({len(mismatched)} of {len(ours)} tensors differ in shape)")
        k = mismatched[0]
        return f"{k} is {tuple(theirs[k].shape)} in the supernet, {tuple(ours[k].shape)} in this network"
    for k in ours:
        target[dst + k] = theirs[k]
    return None


def extract_pairs(pairs: list[tuple[int, str, str]], supernets: list[dict[str, torch.Tensor]],
                  model: nn.Module) -> Extraction:
    """Copy each (block, supernet prefix, network prefix) layer whole or not at all, and load the result."""
    target = model.state_dict()
    copied, not_copied, tensors = [], {}, 0
    for block, src, dst in pairs:
        reason = copy_layer(supernets[block], src, target, dst)
        if reason is None:
            copied.append(dst.rstrip("."))
            tensors += sum(1 for k in target if k.startswith(dst))
        else:
            not_copied[dst.rstrip(".")] = reason
    model.load_state_dict(target)
    covered = tuple(dst for _, _, dst in pairs)
    no_counterpart = sorted({k.rsplit(".", 1)[0] for k in target if not k.startswith(covered)})
    return Extraction(copied, not_copied, no_counterpart, tensors)


def block_stages(stage_strides: list[int], block_strides: list[int]) -> tuple[list[list[int]], int]:
    """Which stages of a network (by index; stage 0, the fixed first stage, is no block's) make each block of a
    space, from the stride of each stage's first layer and each block's stride: one stage per block, two where a
    strided block's stage starts at stride 1 and the next starts strided (its stride in a later layer: timm strides
    only a stage's first layer). Returns the blocks found, as far as the stages go, and the index of the first stage
    left over."""
    groups, i = [], 1
    for stride in block_strides:
        if i >= len(stage_strides):
            break
        group = [i]
        if stride > 1 and stage_strides[i] == 1 and i + 1 < len(stage_strides) and stage_strides[i + 1] > 1:
            group.append(i + 1)
        groups.append(group)
        i = group[-1] + 1
    return groups, i


@dataclass(frozen=True)
class Piece:
    """A part of a network costed and timed alone: the stem, one layer variant at its position, or the head.

    A layer's position is 0 where it carries the block's stride (at the block's input resolution), 1 after it (at
    the output resolution), 2 before it (at the input resolution, stride 1); with its widths it sets the module
    and its input. Its fields are the columns of the latency profile; `key` finds it there."""

    kind: str  # stem, layer or head
    block: int
    position: int
    op: int
    op_name: str
    in_width: int
    width: int
    stride: int
    resolution: int  # side of its input

    @property
    def key(self) -> tuple:
        return self.kind, self.block, self.position, self.op, self.in_width, self.width

    def input_shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        return batch, self.in_width, self.resolution, self.resolution

    def row(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Candidates:
    """One stage of the search: the stem, the head, or a block's candidates with one row per (candidate, input
    width). Stem and head rows have no cell and no ops. Arrays and tuples are parallel, one entry per row."""

    block: int
    in_width: np.ndarray
    out_width: np.ndarray
    params: np.ndarray
    macs: np.ndarray
    score: np.ndarray
    cells: tuple[Cell, ...] | None = None
    ops: tuple[Ops, ...] | None = None
    names: tuple[str, ...] | None = None  # the ops by name, joined with +
    latency_ms: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.in_width)

    def with_scores(self, score: Iterable[float]) -> Candidates:
        return replace(self, score=np.asarray(list(score), dtype=float))

    def with_latency(self, latency_ms: Iterable[float]) -> Candidates:
        return replace(self, latency_ms=np.asarray(list(latency_ms), dtype=float))

    def choice(self, row: int) -> tuple[Cell, Ops]:
        return self.cells[row], self.ops[row]

    def costs(self) -> pd.DataFrame:
        """The columns the search reads: widths, score and every cost axis."""
        out = {"in_width": self.in_width, "out_width": self.out_width, "score": self.score, "params": self.params,
               "macs": self.macs}
        return pd.DataFrame(out | ({} if self.latency_ms is None else {"latency_ms": self.latency_ms}))

    def to_frame(self) -> pd.DataFrame:
        """The table as written to CSV (a block's ratings: block, cell, depth, width, down, ops, path, widths, costs,
        score)."""
        if self.cells is None:
            return self.costs()
        frame = pd.DataFrame({
            "block": self.block, "cell": [c.name for c in self.cells], "depth": [c.depth for c in self.cells],
            "width": [c.width for c in self.cells], "down": [c.down for c in self.cells], "ops": list(self.names),
            "path": ["-".join(map(str, ops)) for ops in self.ops], "in_width": self.in_width,
            "out_width": self.out_width, "params": self.params, "macs": self.macs, "score": self.score})
        return frame if self.latency_ms is None else frame.assign(latency_ms=self.latency_ms)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> Candidates:
        """A block's table read back from `to_frame`'s columns."""
        block = int(frame["block"].iloc[0])
        downs = frame["down"] if "down" in frame else [0] * len(frame)
        cells = tuple(Cell(block, int(d), int(w), int(s)) for d, w, s in zip(frame["depth"], frame["width"], downs))
        ops = tuple(tuple(int(o) for o in str(path).split("-")) for path in frame["path"])
        latency = frame["latency_ms"].to_numpy(float) if "latency_ms" in frame else None
        score = frame["score"].to_numpy(float) if "score" in frame else np.zeros(len(frame))
        return cls(block, frame["in_width"].to_numpy(np.int64), frame["out_width"].to_numpy(np.int64),
                   frame["params"].to_numpy(np.int64), frame["macs"].to_numpy(np.int64), score, cells, ops,
                   tuple(frame["ops"].astype(str)), latency)


@runtime_checkable
class SpaceCells(Protocol):
    """What a space's candidates are: its blocks' cells, each cell's candidates (one op per layer), the widths a
    block's input may have and the resolutions of the blocks' inputs; `Options` validates the kind's own keys of the
    space section (all but kind and blocks)."""

    kind: str
    Options: type[BaseModel]
    cfg: SpaceConfig
    in_chans: int
    image_size: int
    num_classes: int
    num_blocks: int
    ops: list[str]  # the op names of a layer

    @classmethod
    def check_config(cls, cfg: SpaceConfig) -> None:
        """Raise ValueError, naming the key, for a configuration this kind of space cannot build."""

    def cells(self, block: int) -> list[Cell]: ...
    def candidates(self, cell: Cell) -> Iterable[Ops]: ...
    def in_widths(self, block: int) -> list[int]: ...
    def block_resolutions(self) -> list[int]: ...


@runtime_checkable
class SpacePieces(Protocol):
    """What a network of the space is made of, piece by piece, and how to build each piece: the cost tables, the
    latency profile and the search follow from it (SpaceBase)."""

    def stem_piece(self) -> Piece: ...
    def layer_pieces(self, cell: Cell, ops: Ops, in_width: int) -> list[Piece]: ...
    def head_piece(self, in_width: int) -> Piece: ...
    def piece_module(self, piece: Piece) -> nn.Module: ...


@runtime_checkable
class SpaceNetworks(Protocol):
    """Whole networks: the architecture of a choice and back, whether an architecture is a member, and the network
    it builds (retraining, export, the rank stage)."""

    def arch(self, choice: Choice) -> Arch: ...
    def parse(self, arch: Arch) -> Choice: ...
    def membership(self, arch: Arch) -> list[tuple[bool, str]]: ...
    def build(self, arch: Arch, drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> nn.Module: ...


@runtime_checkable
class SpaceSupernets(Protocol):
    """Block supernets: a cell's supernet, trained by distillation and rated, and a network's weights taken from the
    trained supernets (retrain.init: supernet)."""

    def build_cell(self, cell: Cell, in_chs: int, target_chs: int) -> CellSupernet: ...
    def extract(self, arch: Arch, supernets: list[dict[str, torch.Tensor]], model: nn.Module) -> Extraction: ...


CAPABILITIES: dict[str, type] = {"cells": SpaceCells, "pieces": SpacePieces, "networks": SpaceNetworks,
                                 "supernets": SpaceSupernets}


def capability_members(capability: str) -> list[str]:
    proto = CAPABILITIES[capability]
    methods = [name for name, value in vars(proto).items()
               if not name.startswith("_") and (callable(value) or isinstance(value, classmethod))]
    return methods + list(vars(proto).get("__annotations__", {}))


def offers(space: object) -> list[str]:
    return [name for name, proto in CAPABILITIES.items() if isinstance(space, proto)]


def require(space: object, capability: str, needed_by: str) -> None:
    """Raise ConfigError, before any work, when the space's kind lacks a capability that `needed_by` needs."""
    if not isinstance(space, CAPABILITIES[capability]):
        missing = [name for name in capability_members(capability) if not hasattr(space, name)]
        raise ConfigError(f"space.kind={getattr(space, 'kind', '?')!r} has no {capability} ({', '.join(missing)}), "
                          f"which {needed_by} needs; it offers {', '.join(offers(space)) or 'nothing'}")


class SearchSpace(SpaceCells, SpacePieces, SpaceNetworks, SpaceSupernets, Protocol):
    """Everything a space can offer, with what SpaceBase derives from it: a kind implements the capabilities it
    offers (cells and pieces at least: they make the cost tables every search reads), each a small protocol above."""

    def block_size(self, block: int) -> int: ...
    def size(self) -> int: ...
    def outside(self, arch: Arch) -> list[str]: ...
    def pieces(self) -> list[Piece]: ...
    def chain(self, choice: Choice) -> list[Piece]: ...
    def candidate_table(self, block: int) -> Candidates: ...
    def stem_table(self) -> Candidates: ...
    def head_table(self) -> Candidates: ...


class SpaceBase:
    """The parts of a space that follow from its cells, candidates and pieces.

    A layer's piece must depend only on its own op (and the cell, position and input width), as the cost tables
    and the latency profile add pieces up.
    """

    num_blocks: int
    ops: list[str]

    @classmethod
    def check_config(cls, cfg: SpaceConfig) -> None:
        """What the kind's options model cannot check alone (e.g. its options against the blocks); nothing here."""

    def outside(self, arch: Arch) -> list[str]:
        """Where an architecture leaves this space; empty when it is a member."""
        return [why for inside, why in self.membership(arch) if not inside]

    def block_size(self, block: int) -> int:
        return sum(sum(1 for _ in self.candidates(c)) for c in self.cells(block))

    def size(self) -> int:
        return int(np.prod([self.block_size(b) for b in range(self.num_blocks)], dtype=object))

    def ops_name(self, ops: Ops) -> str:
        return "+".join(self.ops[o] for o in ops)

    def chain(self, choice: Choice) -> list[Piece]:
        """The pieces of a member network, stem to head."""
        out, width = [self.stem_piece()], self.stem_piece().width
        for cell, ops in choice:
            out += self.layer_pieces(cell, ops, width)
            width = cell.width
        return out + [self.head_piece(width)]

    def pieces(self) -> list[Piece]:
        """Every distinct piece of the space: the stem, every layer of every cell at every input width with every
        op, and the head after each width of the last block."""
        found = {self.stem_piece().key: self.stem_piece()}
        for block in range(self.num_blocks):
            for cell in self.cells(block):
                for in_width in self.in_widths(block):
                    for op in range(len(self.ops)):
                        found.update((p.key, p) for p in self.layer_pieces(cell, (op,) * cell.depth, in_width))
        for width in sorted({c.width for c in self.cells(self.num_blocks - 1)}):
            found.setdefault(self.head_piece(width).key, self.head_piece(width))
        return list(found.values())

    @cached_property
    def _piece_costs(self) -> dict[tuple, tuple[int, int]]:
        return {}

    def piece_cost(self, piece: Piece) -> tuple[int, int]:
        """(parameters, multiply-adds) of a piece, counted once."""
        if piece.key not in self._piece_costs:
            params, macs, _ = count_cost(self.piece_module(piece), piece.input_shape())
            self._piece_costs[piece.key] = params, macs
        return self._piece_costs[piece.key]

    def _sum_costs(self, pieces: list[Piece]) -> tuple[int, int]:
        costs = [self.piece_cost(p) for p in pieces]
        return sum(c[0] for c in costs), sum(c[1] for c in costs)

    def candidate_table(self, block: int) -> Candidates:
        """One row per (candidate, input width): its cell, ops, widths, parameters and multiply-adds."""
        cells, ops, in_width, costs = [], [], [], []
        for cell in self.cells(block):
            grid = list(self.candidates(cell))
            for width in self.in_widths(block):
                cells += [cell] * len(grid)
                ops += grid
                in_width += [width] * len(grid)
                costs += [self._sum_costs(self.layer_pieces(cell, o, width)) for o in grid]
        cost = np.array(costs, dtype=np.int64).reshape(-1, 2)
        return Candidates(block, np.array(in_width, dtype=np.int64), np.array([c.width for c in cells], np.int64),
                          cost[:, 0], cost[:, 1], np.zeros(len(cells)), tuple(cells), tuple(ops),
                          tuple(self.ops_name(o) for o in ops))

    def stem_table(self) -> Candidates:
        params, macs = self.piece_cost(self.stem_piece())
        return Candidates(-1, np.array([0]), np.array([self.stem_piece().width]), np.array([params]),
                          np.array([macs]), np.zeros(1))

    def head_table(self) -> Candidates:
        widths = sorted({c.width for c in self.cells(self.num_blocks - 1)})
        cost = np.array([self.piece_cost(self.head_piece(w)) for w in widths], dtype=np.int64)
        return Candidates(self.num_blocks, np.array(widths), np.zeros(len(widths), np.int64), cost[:, 0],
                          cost[:, 1], np.zeros(len(widths)))
