"""The MBConv space of the DNA paper, built from timm's inverted-residual blocks: the stem and a fixed first stage,
then per block a cell (depth, width) and one op per layer (a timm block string without repeat, stride and width).
"""
from __future__ import annotations

import itertools
import re
from functools import cached_property
from typing import Iterator

import torch
from timm.layers import create_classifier, create_conv2d, get_act_layer, get_norm_act_layer
from timm.models._efficientnet_builder import _decode_block_str
from torch import nn

from dna.arch import ACT, DEFAULT_SETTINGS, Arch, build_layers, count_cost, expand_repeats
from dna.arch_families import DEFAULT_FAMILY
from dna.config import SpaceConfig
from dna.spaces import register_space
from dna.spaces.base import Cell, CellSupernet, Choice, Extraction, Ops, Piece, SpaceBase, extract_pairs

_FIXED = re.compile(r"^[rsc]\d")


def layer_string(op: str, stride: int, width: int) -> str:
    """`ir_k5_e3_se0.25` at stride 2 and width 24 -> `ir_r1_k5_s2_e3_c24_se0.25` (timm's block-string form)."""
    kind, *rest = op.split("_")
    kernels = [t for t in rest if t[0] == "k"]
    expansions = [t for t in rest if t[0] == "e"]
    others = [t for t in rest if t[0] not in "ke"]
    return "_".join([kind, "r1", *kernels, f"s{stride}", *expansions, f"c{width}", *others])


def check_op(op: str) -> None:
    hint = ("an op is a timm block string without repeat, stride and width, which the space sets, "
            "e.g. 'ir_k3_e6_se0.25' (type ir/ds/er/cn/uir, kernel k, expansion e, optional se)")
    tokens = op.split("_")
    if any(_FIXED.match(t) for t in tokens[1:]):
        raise ValueError(f"space.ops: {op!r} sets r/s/c; {hint}")
    try:
        _decode_block_str(layer_string(op, 1, 16))
    except Exception:
        raise ValueError(f"space.ops: {op!r} is not a valid op; {hint}") from None
    try:  # timm decodes some strings it cannot build (e.g. mqa_k3_h4_d16_v2)
        with torch.no_grad():
            build_layers([layer_string(op, 1, 16)], 16).eval()(torch.zeros(1, 16, 8, 8))
    except Exception as exc:
        raise ValueError(f"space.ops: {op!r} decodes but timm cannot build it ({type(exc).__name__}: {exc}); "
                         f"{hint}") from None


@register_space("mbconv")
class MBConvSpace(SpaceBase):
    @classmethod
    def check_config(cls, cfg: SpaceConfig) -> None:
        for op in cfg.ops:
            check_op(op)

    def __init__(self, cfg: SpaceConfig, in_chans: int, image_size: int, num_classes: int):
        self.cfg, self.in_chans, self.image_size, self.num_classes = cfg, in_chans, image_size, num_classes
        self.ops = list(cfg.ops)
        self.num_blocks = len(cfg.blocks)
        self.first_width = _decode_block_str(cfg.first_stage[-1])[0]["out_chs"]

    # candidates ------------------------------------------------------------------------------------------------
    def cells(self, block: int) -> list[Cell]:
        return [Cell(block, d, w) for d, w in self.cfg.blocks[block].cell_choices()]

    def candidates(self, cell: Cell) -> Iterator[Ops]:
        return itertools.product(range(len(self.ops)), repeat=cell.depth)

    def in_widths(self, block: int) -> list[int]:
        return [self.first_width] if block == 0 else sorted({c.width for c in self.cells(block - 1)})

    def layer_strings(self, cell: Cell, ops: Ops) -> list[str]:
        stride = self.cfg.blocks[cell.block].stride
        return [layer_string(self.ops[o], stride if i == 0 else 1, cell.width) for i, o in enumerate(ops)]

    def arch(self, choice: Choice) -> Arch:
        stages = [tuple(self.cfg.first_stage)] + [tuple(self.layer_strings(c, ops)) for c, ops in choice]
        return Arch(stem=self.cfg.stem, stages=tuple(stages), head=self.cfg.head)

    def _layer_choices(self, block: int, position: int, width: int) -> list[str]:
        """The layer string of each op at this position of a block, at this width."""
        stride = self.cfg.blocks[block].stride if position == 0 else 1
        return [layer_string(op, stride, width) for op in self.ops]

    def _layer_op(self, block: int, position: int, width: int, layer: str) -> int | None:
        """Which op a layer is (compared as timm decodes it, so token order and defaults do not matter), or None."""
        made = _decode_block_str(layer)[0]
        choices = self._layer_choices(block, position, width)
        return next((o for o, s in enumerate(choices) if _decode_block_str(s)[0] == made), None)

    def membership(self, arch: Arch) -> list[tuple[bool, str]]:
        """Stem, head, first stage, then per searched block its cell and per layer its op: (in the space, why)."""
        cfg = self.cfg
        built = (arch.family, arch.settings) == (DEFAULT_FAMILY, DEFAULT_SETTINGS)
        out = [(built, f"family {arch.family}, build {arch.settings.to_dict()}: the space builds {DEFAULT_FAMILY} "
                       f"with {DEFAULT_SETTINGS.to_dict()}"),
               (arch.stem == cfg.stem, f"stem: {arch.stem} channels, the space has {cfg.stem}"),
               (arch.head == cfg.head, f"head: {arch.head} channels, the space has {cfg.head}")]
        first = list(arch.stages[0]) if arch.stages else []
        fixed = [layer for s in cfg.first_stage for layer in expand_repeats(s)]
        decoded = [[_decode_block_str(s)[0] for s in layers] for layers in (first, fixed)]
        same = decoded[0] == decoded[1]
        out.append((same, f"first stage: {first} " + ("builds" if same else "differs from") + f" the space's {fixed}"))
        searched = arch.stages[1:]
        if len(searched) != self.num_blocks:
            out.append((False, f"{len(searched)} searched stages, the space has {self.num_blocks} blocks"))
        for block, layers in enumerate(searched[: self.num_blocks]):
            cells = self.cells(block)
            cell = Cell(block, len(layers), _decode_block_str(layers[-1])[0]["out_chs"])
            where = f"block {block}: depth {cell.depth} width {cell.width}"
            known = f"cells: {', '.join(c.name for c in cells)}; widths {sorted({c.width for c in cells})}"
            out.append((True, f"{where} is cell {cell.name}") if cell in cells else
                       (False, f"{where} is not a cell of this block ({known})"))
            for i, s in enumerate(layers):
                op = self._layer_op(block, i, cell.width, s)
                allowed = ", ".join(self._layer_choices(block, i, cell.width))
                out.append((True, f"block {block} layer {i}: {s!r} is op {self.ops[op]}") if op is not None else
                           (False, f"block {block} layer {i}: {s!r} is not one of this layer's ops ({allowed})"))
        return out

    def parse(self, arch: Arch) -> Choice:
        """The (cell, ops) of each block of a member architecture."""
        if problems := self.outside(arch):
            raise ValueError("; ".join(problems))
        choice = []
        for block, layers in enumerate(arch.stages[1:]):
            cell = Cell(block, len(layers), _decode_block_str(layers[-1])[0]["out_chs"])
            choice.append((cell, tuple(self._layer_op(block, i, cell.width, s) for i, s in enumerate(layers))))
        return choice

    def extract(self, arch: Arch, supernets: list[dict[str, torch.Tensor]], model: nn.Module) -> Extraction:
        """Load into `model` (arch built as a timm EfficientNet) the supernets' weights of the chosen ops: every
        tensor of every layer that has a counterpart, a layer whole or not at all. The first layer of a block after
        the first sees the target's width at the boundary before in its supernet and the previous block's width
        here: where those differ it is reported, not copied. The adapters have no counterpart."""
        pairs: list[tuple[int, str, str]] = []  # (block, supernet prefix, network prefix)
        for block, (cell, ops) in enumerate(self.parse(arch)):
            prefix = f"{cell.name}.layers."
            if block == 0:
                pairs += [(0, f"{prefix}0.0.0.", "conv_stem."), (0, f"{prefix}0.0.1.", "bn1.")]
                first = sum(len(expand_repeats(s)) for s in self.cfg.first_stage)  # layers, repeats written out
                pairs += [(0, f"{prefix}0.0.2.{j}.", f"blocks.0.{j}.") for j in range(first)]
            offset = 1 if block == 0 else 0
            pairs += [(block, f"{prefix}{i + offset}.{op}.", f"blocks.{block + 1}.{i}.") for i, op in enumerate(ops)]
        return extract_pairs(pairs, supernets, model)

    def build(self, arch: Arch, drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> nn.Module:
        return arch.build(self.num_classes, self.in_chans, drop_rate=drop_rate, drop_path_rate=drop_path_rate)

    # modules ---------------------------------------------------------------------------------------------------
    def stem(self) -> nn.Sequential:
        """Stem conv, its norm and the fixed first stage, made as EfficientNet makes them."""
        norm_act = get_norm_act_layer(nn.BatchNorm2d, get_act_layer(ACT))
        return nn.Sequential(
            create_conv2d(self.in_chans, self.cfg.stem, 3, stride=2, padding=""),
            norm_act(self.cfg.stem, inplace=True),
            build_layers(self.cfg.first_stage, self.cfg.stem))

    def head(self, in_width: int) -> nn.Sequential:
        norm_act = get_norm_act_layer(nn.BatchNorm2d, get_act_layer(ACT))
        pool, classifier = create_classifier(self.cfg.head, self.num_classes, pool_type="avg")
        conv = create_conv2d(in_width, self.cfg.head, 1, padding="")
        return nn.Sequential(conv, norm_act(self.cfg.head), pool, classifier)

    def build_cell(self, cell: Cell, in_chs: int, target_chs: int) -> CellSupernet:
        stride = self.cfg.blocks[cell.block].stride
        layers: list[list[nn.Module]] = [[self.stem()]] if cell.block == 0 else []
        chs = self.first_width if cell.block == 0 else in_chs
        for i in range(cell.depth):
            strings = [layer_string(op, stride if i == 0 else 1, cell.width) for op in self.ops]
            layers.append([build_layers([s], chs)[0] for s in strings])
            chs = cell.width
        # every cell gets the same kind of head, so the scores of a block's cells are comparable whatever their width
        adapter = nn.Sequential(nn.Conv2d(cell.width, target_chs, 1, bias=False), nn.BatchNorm2d(target_chs))
        return CellSupernet(layers, adapter, num_fixed=1 if cell.block == 0 else 0)

    # pieces --------------------------------------------------------------------------------------------------
    def block_resolutions(self) -> list[int]:
        """Input side length of each block, and after the last block."""
        return list(self._resolutions)

    @cached_property
    def _resolutions(self) -> list[int]:
        *_, shape = count_cost(self.stem(), (1, self.in_chans, self.image_size, self.image_size))
        sizes = [shape[-1]]
        for block in self.cfg.blocks:
            sizes.append((sizes[-1] - 1) // block.stride + 1)
        return sizes

    def stem_piece(self) -> Piece:
        return Piece("stem", -1, 0, -1, "stem", self.in_chans, self.first_width, 2, self.image_size)

    def head_piece(self, in_width: int) -> Piece:
        return Piece("head", self.num_blocks, 0, -1, "head", in_width, self.num_classes, 1, self._resolutions[-1])

    def layer_pieces(self, cell: Cell, ops: Ops, in_width: int) -> list[Piece]:
        """The first layer of a block (position 0: its stride, the previous block's width in) and every later one
        (position 1)."""
        block, stride = cell.block, self.cfg.blocks[cell.block].stride
        first = Piece("layer", block, 0, ops[0], self.ops[ops[0]], in_width, cell.width, stride,
                      self._resolutions[block])
        size = self._resolutions[block + 1]
        return [first] + [Piece("layer", block, 1, o, self.ops[o], cell.width, cell.width, 1, size) for o in ops[1:]]

    def piece_module(self, piece: Piece) -> nn.Module:
        if piece.kind == "stem":
            return self.stem()
        if piece.kind == "head":
            return self.head(piece.in_width)
        return build_layers([layer_string(self.ops[piece.op], piece.stride, piece.width)], piece.in_width)
