"""A second search space, for tests only: plain conv-BatchNorm-ReLU layers whose op is the kernel size, built from
torch layers rather than timm's EfficientNet. Importing this module registers it as kind "tiny".

Ops are written `conv_k3`; a layer of the architecture file is `cn_r1_k3_s2_c24` (a timm string, so an Arch holds
it), but the network is this module's `TinyNet`, built by the space.
"""
from __future__ import annotations

import itertools
import re

import torch
from pydantic import BaseModel, ConfigDict, field_validator
from torch import nn

from dna.arch import Arch
from dna.config import SpaceConfig
from dna.spaces import SPACES
from dna.spaces.base import Cell, CellSupernet, Choice, Extraction, Ops, Piece, SpaceBase, extract_pairs

OP = re.compile(r"conv_k([1357])")
LAYER = re.compile(r"cn_r1_k(\d+)_s(\d)_c(\d+)")
EXAMPLE = {"kind": "tiny", "stem": 8, "head": 8, "ops": ["conv_k1", "conv_k3"],
           "blocks": [{"stride": 2, "depths": [1, 2], "widths": [8, 16]},
                      {"stride": 1, "depths": [1, 2], "widths": [16]}]}


def conv_bn_relu(in_chs: int, out_chs: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_chs, out_chs, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(out_chs),
                         nn.ReLU())


class TinyNet(nn.Module):
    def __init__(self, stem: nn.Module, blocks: list[list[nn.Module]], head: nn.Module):
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(nn.Sequential(*layers) for layers in blocks)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class TinyOptions(BaseModel):
    """The tiny kind's own keys of the space section: no first stage, no join."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    stem: int = 8
    head: int = 8
    ops: list[str] = ["conv_k1", "conv_k3"]

    @field_validator("ops")
    @classmethod
    def _ops(cls, ops: list[str]) -> list[str]:
        for op in ops:
            if not OP.fullmatch(op):
                raise ValueError(f"space.ops: {op!r} is not an op of the tiny space (conv_k1, conv_k3, ...)")
        return ops


@SPACES.register("tiny")
class TinySpace(SpaceBase):
    Options = TinyOptions

    def __init__(self, cfg: SpaceConfig, in_chans: int, image_size: int, num_classes: int):
        self.cfg, self.in_chans, self.image_size, self.num_classes = cfg, in_chans, image_size, num_classes
        self.options: TinyOptions = cfg.options
        self.ops = list(self.options.ops)
        self.kernels = [int(OP.fullmatch(op).group(1)) for op in self.ops]
        self.num_blocks = len(cfg.blocks)

    def cells(self, block: int) -> list[Cell]:
        return [Cell(block, d, w) for d, w in self.cfg.blocks[block].cell_choices()]

    def candidates(self, cell: Cell) -> itertools.product:
        return itertools.product(range(len(self.ops)), repeat=cell.depth)

    def in_widths(self, block: int) -> list[int]:
        return [self.options.stem] if block == 0 else sorted({c.width for c in self.cells(block - 1)})

    def block_resolutions(self) -> list[int]:
        sizes = [(self.image_size - 1) // 2 + 1]
        for block in self.cfg.blocks:
            sizes.append((sizes[-1] - 1) // block.stride + 1)
        return sizes

    # architectures
    def arch(self, choice: Choice) -> Arch:
        stages = [tuple(f"cn_r1_k{self.kernels[o]}_s{self._stride(c.block, i)}_c{c.width}" for i, o in enumerate(ops))
                  for c, ops in choice]
        return Arch(stem=self.options.stem, stages=tuple(stages), head=self.options.head)

    def _stride(self, block: int, position: int) -> int:
        return self.cfg.blocks[block].stride if position == 0 else 1

    def membership(self, arch: Arch) -> list[tuple[bool, str]]:
        opts = self.options
        out = [(arch.stem == opts.stem, f"stem: {arch.stem}"), (arch.head == opts.head, f"head: {arch.head}"),
               (len(arch.stages) == self.num_blocks, f"{len(arch.stages)} stages")]
        for block, layers in enumerate(arch.stages[: self.num_blocks]):
            found = [LAYER.fullmatch(s) for s in layers]
            width = int(found[-1].group(3)) if found[-1] else 0
            out.append((Cell(block, len(layers), width) in self.cells(block), f"block {block}: {len(layers)}x{width}"))
            for i, (s, m) in enumerate(zip(layers, found)):
                ok = bool(m) and int(m.group(1)) in self.kernels and int(m.group(2)) == self._stride(block, i)
                out.append((ok and int(m.group(3)) == width, f"block {block} layer {i}: {s}"))
        return out

    def parse(self, arch: Arch) -> Choice:
        if problems := self.outside(arch):
            raise ValueError("; ".join(problems))
        choice = []
        for block, layers in enumerate(arch.stages):
            found = [LAYER.fullmatch(s) for s in layers]
            cell = Cell(block, len(layers), int(found[-1].group(3)))
            choice.append((cell, tuple(self.kernels.index(int(m.group(1))) for m in found)))
        return choice

    def build(self, arch: Arch, drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> nn.Module:
        choice, width = self.parse(arch), self.options.stem
        blocks = []
        for cell, ops in choice:
            blocks.append([self._layer(cell, i, op, width if i == 0 else cell.width) for i, op in enumerate(ops)])
            width = cell.width
        return TinyNet(self._stem(), blocks, self._head(width))

    def extract(self, arch: Arch, supernets: list[dict[str, torch.Tensor]], model: nn.Module) -> Extraction:
        pairs = []
        for block, (cell, ops) in enumerate(self.parse(arch)):
            offset = 1 if block == 0 else 0
            if block == 0:
                pairs.append((0, f"{cell.name}.layers.0.0.", "stem."))
            pairs += [(block, f"{cell.name}.layers.{i + offset}.{op}.", f"blocks.{block}.{i}.")
                      for i, op in enumerate(ops)]
        return extract_pairs(pairs, supernets, model)

    def build_cell(self, cell: Cell, in_chs: int, target_chs: int) -> CellSupernet:
        layers = [[self._stem()]] if cell.block == 0 else []
        chs = self.options.stem if cell.block == 0 else in_chs
        for i in range(cell.depth):
            layers.append([self._layer(cell, i, op, chs) for op in range(len(self.ops))])
            chs = cell.width
        adapter = nn.Sequential(nn.Conv2d(cell.width, target_chs, 1, bias=False), nn.BatchNorm2d(target_chs))
        return CellSupernet(layers, adapter, num_fixed=1 if cell.block == 0 else 0)

    # pieces
    def _stem(self) -> nn.Module:
        return conv_bn_relu(self.in_chans, self.options.stem, 3, 2)

    def _layer(self, cell: Cell, position: int, op: int, in_chs: int) -> nn.Module:
        return conv_bn_relu(in_chs, cell.width, self.kernels[op], self._stride(cell.block, position))

    def _head(self, in_width: int) -> nn.Module:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_width, self.num_classes))

    def stem_piece(self) -> Piece:
        return Piece("stem", -1, 0, -1, "stem", self.in_chans, self.options.stem, 2, self.image_size)

    def layer_pieces(self, cell: Cell, ops: Ops, in_width: int) -> list[Piece]:
        sizes = self.block_resolutions()
        return [Piece("layer", cell.block, min(i, 1), o, self.ops[o], in_width if i == 0 else cell.width, cell.width,
                      self._stride(cell.block, i), sizes[cell.block] if i == 0 else sizes[cell.block + 1])
                for i, o in enumerate(ops)]

    def head_piece(self, in_width: int) -> Piece:
        size = self.block_resolutions()[-1]
        return Piece("head", self.num_blocks, 0, -1, "head", in_width, self.num_classes, 1, size)

    def piece_module(self, piece: Piece) -> nn.Module:
        if piece.kind == "stem":
            return self._stem()
        if piece.kind == "head":
            return self._head(piece.in_width)
        return conv_bn_relu(piece.in_width, piece.width, self.kernels[piece.op], piece.stride)
