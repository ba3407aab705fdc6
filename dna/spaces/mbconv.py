"""The MBConv space of the DNA paper, built from timm's inverted-residual blocks: the stem and a fixed first stage,
then per block a cell (depth, width) and one op per layer (a timm block string without repeat, stride and width, or a
transformer layer: dna.spaces.layer_ops).
"""
from __future__ import annotations

import itertools
from functools import cached_property
from typing import TYPE_CHECKING, Annotated, Iterator

import torch
from pydantic import ConfigDict, Field, field_validator
from timm.layers import create_classifier, create_conv2d, get_act_layer, get_norm_act_layer
from timm.models._efficientnet_builder import _decode_block_str
from torch import nn

from dna.arch import ACT, DEFAULT_SETTINGS, Arch, build_layers, count_cost, expand_repeats
from dna.arch_families import DEFAULT_FAMILY
from dna.fingerprint_keys import Fingerprinted
from dna.spaces.base import Cell, CellSupernet, Choice, Extraction, Ops, Piece, SpaceBase, block_stages, extract_pairs
from dna.spaces.layer_ops import attention_parts, check_op, is_attention, layer_string, op_layers, op_module

if TYPE_CHECKING:
    from dna.config import SpaceConfig

__all__ = ["MBConvOptions", "MBConvSpace", "check_op", "layer_string"]

DEFAULT_OPS = [f"ir_k{k}_e{e}_se0.25" for e in (3, 6) for k in (3, 5, 7)]


class MBConvOptions(Fingerprinted):
    """The space section's keys of the MBConv kinds (and of their transformer and hybrid kinds)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    stem: Annotated[int, Field(ge=8, multiple_of=8)] = 32
    first_stage: list[str] = ["ds_r1_k3_s1_c16_se0.25"]
    head: Annotated[int, Field(ge=8)] = 256
    ops: list[str] = DEFAULT_OPS
    join: str = "cn_k3"  # the layer before a transformer op that changes stride or width (dna.spaces.layer_ops)

    @field_validator("ops")
    @classmethod
    def _ops(cls, ops: list[str]) -> list[str]:
        if not ops:
            raise ValueError("space.ops must list at least one op")
        if len(set(ops)) != len(ops):
            raise ValueError(f"space.ops lists an op twice: {ops}")
        return ops

    @field_validator("first_stage")
    @classmethod
    def _first_stage(cls, strings: list[str]) -> list[str]:
        if not strings:
            raise ValueError("space.first_stage must list at least one timm block string, e.g. ds_r1_k3_s1_c16_se0.25")
        for s in strings:
            try:
                _decode_block_str(s)
            except Exception:
                raise ValueError(f"space.first_stage: {s!r} is not a full timm block string "
                                 "(type, r, k, s, c, e.g. ds_r1_k3_s1_c16_se0.25)") from None
        return strings

    @field_validator("join")
    @classmethod
    def _join(cls, join: str) -> str:
        if is_attention(join):
            raise ValueError(f"space.join: {join!r} is a transformer op; the join is a convolutional op "
                             "that sets stride and width, e.g. 'cn_k3' (a strided convolution) or 'ir_k3_e4'")
        return join


class MBConvSpace(SpaceBase):
    Options = MBConvOptions

    @classmethod
    def check_config(cls, cfg: SpaceConfig) -> None:
        """Each op and the join built once (timm decodes some strings it cannot build), and every width a multiple
        of each transformer op's heads."""
        options = cfg.options
        for op in [*options.ops, options.join]:
            check_op(op)
        for op in filter(is_attention, options.ops):
            heads = attention_parts(op)[1]
            for b, block in enumerate(cfg.blocks):
                for _, width in block.cell_choices():
                    if width % heads:
                        raise ValueError(f"space.blocks[{b}]: width {width} is not a multiple of the {heads} heads "
                                         f"of op {op!r}; every width of a space with that op must be")

    def __init__(self, cfg: SpaceConfig, in_chans: int, image_size: int, num_classes: int):
        self.cfg, self.in_chans, self.image_size, self.num_classes = cfg, in_chans, image_size, num_classes
        self.options: MBConvOptions = cfg.options
        self.ops = list(self.options.ops)
        self.num_blocks = len(cfg.blocks)
        self.first_width = _decode_block_str(self.options.first_stage[-1])[0]["out_chs"]

    # candidates ------------------------------------------------------------------------------------------------
    def cells(self, block: int) -> list[Cell]:
        cfg = self.cfg.blocks[block]
        return [Cell(block, d, w, down) for d, w in cfg.cell_choices() for down in cfg.down_positions if down < d]

    def candidates(self, cell: Cell) -> Iterator[Ops]:
        return itertools.product(range(len(self.ops)), repeat=cell.depth)

    def in_widths(self, block: int) -> list[int]:
        return [self.first_width] if block == 0 else sorted({c.width for c in self.cells(block - 1)})

    def _stride(self, cell: Cell, position: int) -> int:
        return self.cfg.blocks[cell.block].stride if position == cell.down else 1

    def _op_layers(self, cell: Cell, position: int, op: int, in_width: int) -> list[str]:
        """The timm block strings of op `op` at this position of a cell (in_width: the block's input width)."""
        return op_layers(self.ops[op], self._stride(cell, position), in_width if position == 0 else cell.width,
                         cell.width, self.options.join)

    def layer_strings(self, cell: Cell, ops: Ops, in_width: int) -> list[str]:
        return [s for i, o in enumerate(ops) for s in self._op_layers(cell, i, o, in_width)]

    def arch(self, choice: Choice) -> Arch:
        """The network of a choice: one stage per block, or two where a later layer carries the block's stride (timm
        strides only the first layer of a stage)."""
        stages, width = [tuple(self.options.first_stage)], self.first_width
        for cell, ops in choice:
            layers = self.layer_strings(cell, ops, width)
            split = len(self.layer_strings(cell, ops[:cell.down], width))
            stages += [tuple(layers[:split]), tuple(layers[split:])] if split else [tuple(layers)]
            width = cell.width
        return Arch(stem=self.options.stem, stages=tuple(stages), head=self.options.head)

    def _block_layers(self, arch: Arch) -> tuple[list[list[str]], list[list[str]], list[tuple[str, ...]]]:
        """Each block's layers with each layer's module name in the network (see block_stages), and the stages left
        over."""
        strides = [_decode_block_str(stage[0])[0]["stride"] for stage in arch.stages]
        groups, left = block_stages(strides, [b.stride for b in self.cfg.blocks])
        layers = [[s for i in group for s in arch.stages[i]] for group in groups]
        names = [[f"blocks.{i}.{j}." for i in group for j in range(len(arch.stages[i]))] for group in groups]
        return layers, names, list(arch.stages[left:])

    def _segment(self, block: int, layers: list[str], in_width: int) -> tuple[Cell, list[tuple[int | None, list[str]]]]:
        """Read a block's layers as ops, first to last: its cell, and each op with its layers, or None with the one
        layer where none of this position's ops matches (compared as timm decodes strings, so token order and
        defaults do not matter). Each of the block's stride positions is tried; the one that reads best is kept."""
        decoded = [_decode_block_str(s)[0] for s in layers]
        width = decoded[-1]["out_chs"]
        readings = []
        for down in self.cfg.blocks[block].down_positions:
            cell, at = Cell(block, 0, width, down), 0
            found: list[tuple[int | None, list[str]]] = []
            while at < len(layers):
                for o in range(len(self.ops)):
                    strings = self._op_layers(cell, len(found), o, in_width)
                    if [_decode_block_str(s)[0] for s in strings] == decoded[at:at + len(strings)]:
                        break
                else:
                    o, strings = None, layers[at:at + 1]
                found.append((o, list(layers[at:at + len(strings)])))
                at += len(strings)
            readings.append((sum(o is None for o, _ in found), Cell(block, len(found), width, down), found))
        _, cell, found = min(readings, key=lambda r: r[0])
        return cell, found

    def membership(self, arch: Arch) -> list[tuple[bool, str]]:
        """Stem, head, first stage, then per searched block its cell and per layer its op: (in the space, why)."""
        opts = self.options
        built = (arch.family, arch.settings) == (DEFAULT_FAMILY, DEFAULT_SETTINGS)
        out = [(built, f"family {arch.family}, build {arch.settings.to_dict()}: the space builds {DEFAULT_FAMILY} "
                       f"with {DEFAULT_SETTINGS.to_dict()}"),
               (arch.stem == opts.stem, f"stem: {arch.stem} channels, the space has {opts.stem}"),
               (arch.head == opts.head, f"head: {arch.head} channels, the space has {opts.head}")]
        first = list(arch.stages[0]) if arch.stages else []
        fixed = [layer for s in opts.first_stage for layer in expand_repeats(s)]
        decoded = [[_decode_block_str(s)[0] for s in layers] for layers in (first, fixed)]
        same = decoded[0] == decoded[1]
        out.append((same, f"first stage: {first} " + ("builds" if same else "differs from") + f" the space's {fixed}"))
        searched, _, left = self._block_layers(arch)
        if len(searched) != self.num_blocks or left:
            out.append((False, f"{len(arch.stages) - 1} searched stages make {len(searched)} blocks"
                               + (f" and {len(left)} stages more" if left else "")
                               + f"; the space has {self.num_blocks} blocks"))
        in_width = self.first_width
        for block, layers in enumerate(searched):
            cell, ops = self._segment(block, list(layers), in_width)
            cells = self.cells(block)
            where = f"block {block}: depth {cell.depth} width {cell.width}" + (f" stride at layer {cell.down}"
                                                                               if cell.down else "")
            known = f"cells: {', '.join(c.name for c in cells)}; widths {sorted({c.width for c in cells})}"
            out.append((True, f"{where} is cell {cell.name}") if cell in cells else
                       (False, f"{where} is not a cell of this block ({known})"))
            for i, (op, strings) in enumerate(ops):
                written = strings[0] if len(strings) == 1 else strings
                allowed = ", ".join("+".join(self._op_layers(cell, i, o, in_width))
                                    for o in range(len(self.ops)))
                out.append((True, f"block {block} layer {i}: {written!r} is op {self.ops[op]}") if op is not None else
                           (False, f"block {block} layer {i}: {written!r} is not one of this layer's ops ({allowed})"))
            in_width = cell.width
        return out

    def parse(self, arch: Arch) -> Choice:
        """The (cell, ops) of each block of a member architecture."""
        if problems := self.outside(arch):
            raise ValueError("; ".join(problems))
        choice, in_width = [], self.first_width
        for block, layers in enumerate(self._block_layers(arch)[0]):
            cell, ops = self._segment(block, list(layers), in_width)
            choice.append((cell, tuple(op for op, _ in ops)))
            in_width = cell.width
        return choice

    def extract(self, arch: Arch, supernets: list[dict[str, torch.Tensor]], model: nn.Module) -> Extraction:
        """Load into `model` (arch built as a timm EfficientNet) the supernets' weights of the chosen ops: every
        tensor of every layer that has a counterpart, a layer whole or not at all. The first layer of a block after
        the first sees the target's width at the boundary before in its supernet and the previous block's width
        here: where those differ it is reported, not copied (a transformer op's join is there in one and not in
        the other: its blocks are paired from the last). The adapters have no counterpart."""
        pairs: list[tuple[int, str, str]] = []  # (block, supernet prefix, network prefix)
        in_width, names = self.first_width, self._block_layers(arch)[1]
        for block, (cell, ops) in enumerate(self.parse(arch)):
            prefix = f"{cell.name}.layers."
            if block == 0:
                pairs += [(0, f"{prefix}0.0.0.", "conv_stem."), (0, f"{prefix}0.0.1.", "bn1.")]
                first = sum(len(expand_repeats(s)) for s in self.options.first_stage)  # layers, repeats written out
                pairs += [(0, f"{prefix}0.0.2.{j}.", f"blocks.0.{j}.") for j in range(first)]
            offset, index = (1 if block == 0 else 0), 0
            for i, op in enumerate(ops):
                here = len(self._op_layers(cell, i, op, in_width))
                src = f"{prefix}{i + offset}.{op}."
                if not is_attention(self.ops[op]):
                    pairs.append((block, src, names[block][index]))
                else:
                    there = 1 + max((int(k[len(src):].split(".")[0]) for k in supernets[block] if k.startswith(src)),
                                    default=-1)
                    pairs += [(block, f"{src}{there - k}.", names[block][index + here - k])
                              for k in range(1, min(here, there) + 1)]
                index += here
            in_width = cell.width
        return extract_pairs(pairs, supernets, model)

    def build(self, arch: Arch, drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> nn.Module:
        return arch.build(self.num_classes, self.in_chans, drop_rate=drop_rate, drop_path_rate=drop_path_rate)

    # modules ---------------------------------------------------------------------------------------------------
    def stem(self) -> nn.Sequential:
        """Stem conv, its norm and the fixed first stage, made as EfficientNet makes them."""
        norm_act = get_norm_act_layer(nn.BatchNorm2d, get_act_layer(ACT))
        return nn.Sequential(
            create_conv2d(self.in_chans, self.options.stem, 3, stride=2, padding=""),
            norm_act(self.options.stem, inplace=True),
            build_layers(self.options.first_stage, self.options.stem))

    def head(self, in_width: int) -> nn.Sequential:
        norm_act = get_norm_act_layer(nn.BatchNorm2d, get_act_layer(ACT))
        pool, classifier = create_classifier(self.options.head, self.num_classes, pool_type="avg")
        conv = create_conv2d(in_width, self.options.head, 1, padding="")
        return nn.Sequential(conv, norm_act(self.options.head), pool, classifier)

    def build_cell(self, cell: Cell, in_chs: int, target_chs: int) -> CellSupernet:
        layers: list[list[nn.Module]] = [[self.stem()]] if cell.block == 0 else []
        chs = self.first_width if cell.block == 0 else in_chs
        for i in range(cell.depth):
            layers.append([op_module(op, self._stride(cell, i), chs, cell.width, self.options.join) for op in self.ops])
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
        """Each layer at its position (Piece): the one that carries the stride at the block's input resolution,
        those before it there too, those after it at the output resolution; the first takes the block's input
        width."""
        block, stride = cell.block, self.cfg.blocks[cell.block].stride
        sizes = self._resolutions[block], self._resolutions[block + 1]
        pieces = []
        for i, o in enumerate(ops):
            position = 0 if i == cell.down else 2 if i < cell.down else 1
            pieces.append(Piece("layer", block, position, o, self.ops[o], in_width if i == 0 else cell.width,
                                cell.width, stride if position == 0 else 1, sizes[position == 1]))
        return pieces

    def piece_module(self, piece: Piece) -> nn.Module:
        if piece.kind == "stem":
            return self.stem()
        if piece.kind == "head":
            return self.head(piece.in_width)
        return op_module(self.ops[piece.op], piece.stride, piece.in_width, piece.width, self.options.join)
