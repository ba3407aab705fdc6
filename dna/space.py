"""Search spaces: which candidates each block has, the supernet of each cell, and what candidates cost.

A block is split into cells (one depth and one width each); a candidate of a cell picks one op per layer.
`SearchSpace` is the seam a new kind of space (e.g. vision transformers) plugs into; `MBConvSpace` is the
MBConv space of the DNA paper, built from timm's inverted-residual blocks.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator, Protocol

import numpy as np
import pandas as pd
import torch
from timm.layers import create_classifier, create_conv2d, get_act_layer, get_norm_act_layer
from timm.models._efficientnet_builder import _decode_block_str
from torch import nn

from dna.arch import ACT, Arch, build_layers, count_cost, expand_repeats
from dna.config import SpaceConfig

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


@dataclass(frozen=True)
class Cell:
    block: int
    depth: int
    width: int

    @property
    def name(self) -> str:
        return f"d{self.depth}_w{self.width}"


class CellSupernet(nn.Module):
    """Every op of every layer of one cell; a path (one op index per layer) selects a candidate.

    Layers before `num_fixed` have a single choice (the stem of the first block); `adapter` (a 1x1 conv and a
    BatchNorm, for every cell alike) maps the cell's output to the target for distillation and is not part of the
    final network.
    """

    def __init__(self, layers: list[list[nn.Module]], adapter: nn.Module, num_fixed: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleList(choices) for choices in layers)
        self.adapter = adapter
        self.num_fixed = num_fixed

    def full_path(self, ops: tuple[int, ...]) -> tuple[int, ...]:
        return (0,) * self.num_fixed + tuple(ops)

    def forward(self, x: torch.Tensor, ops: tuple[int, ...]) -> torch.Tensor:
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


def _copy_layer(source: dict[str, torch.Tensor], src: str, target: dict[str, torch.Tensor], dst: str) -> str | None:
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


class SearchSpace(Protocol):
    num_blocks: int

    def cells(self, block: int) -> list[Cell]: ...
    def candidates(self, cell: Cell) -> Iterator[tuple[int, ...]]: ...
    def build_cell(self, cell: Cell, in_chs: int, target_chs: int) -> CellSupernet: ...
    def candidate_table(self, block: int) -> pd.DataFrame: ...
    def stem_table(self) -> pd.DataFrame: ...
    def head_table(self) -> pd.DataFrame: ...
    def arch(self, choice: list[tuple[Cell, tuple[int, ...]]]) -> Arch: ...
    def outside(self, arch: Arch) -> list[str]: ...
    def parse(self, arch: Arch) -> list[tuple[Cell, tuple[int, ...]]]: ...
    def extract(self, arch: Arch, supernets: list[dict[str, torch.Tensor]], model: nn.Module) -> Extraction: ...
    def membership(self, arch: Arch) -> list[tuple[bool, str]]: ...


class MBConvSpace:
    def __init__(self, cfg: SpaceConfig, in_chans: int, image_size: int, num_classes: int):
        self.cfg, self.in_chans, self.image_size, self.num_classes = cfg, in_chans, image_size, num_classes
        self.ops = list(cfg.ops)
        self.num_blocks = len(cfg.blocks)
        self.first_width = _decode_block_str(cfg.first_stage[-1])[0]["out_chs"]

    # candidates ------------------------------------------------------------------------------------------------
    def cells(self, block: int) -> list[Cell]:
        return [Cell(block, d, w) for d, w in self.cfg.blocks[block].cell_choices()]

    def candidates(self, cell: Cell) -> Iterator[tuple[int, ...]]:
        return itertools.product(range(len(self.ops)), repeat=cell.depth)

    def block_size(self, block: int) -> int:
        return sum(len(self.ops) ** c.depth for c in self.cells(block))

    def size(self) -> int:
        return int(np.prod([self.block_size(b) for b in range(self.num_blocks)], dtype=object))

    def in_widths(self, block: int) -> list[int]:
        return [self.first_width] if block == 0 else sorted({c.width for c in self.cells(block - 1)})

    def layer_strings(self, cell: Cell, ops: tuple[int, ...]) -> list[str]:
        stride = self.cfg.blocks[cell.block].stride
        return [layer_string(self.ops[o], stride if i == 0 else 1, cell.width) for i, o in enumerate(ops)]

    def ops_name(self, ops: tuple[int, ...]) -> str:
        return "+".join(self.ops[o] for o in ops)

    def arch(self, choice: list[tuple[Cell, tuple[int, ...]]]) -> Arch:
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
        out = [(arch.stem == cfg.stem, f"stem: {arch.stem} channels, the space has {cfg.stem}"),
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

    def outside(self, arch: Arch) -> list[str]:
        """Where an architecture leaves this space; empty when it is a member."""
        return [why for inside, why in self.membership(arch) if not inside]

    def parse(self, arch: Arch) -> list[tuple[Cell, tuple[int, ...]]]:
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
        target = model.state_dict()
        pairs: list[tuple[int, str, str]] = []  # (block, supernet prefix, network prefix)
        for block, (cell, ops) in enumerate(self.parse(arch)):
            prefix = f"{cell.name}.layers."
            if block == 0:
                pairs += [(0, f"{prefix}0.0.0.", "conv_stem."), (0, f"{prefix}0.0.1.", "bn1.")]
                pairs += [(0, f"{prefix}0.0.2.{j}.", f"blocks.0.{j}.") for j in range(len(self.cfg.first_stage))]
            offset = 1 if block == 0 else 0
            pairs += [(block, f"{prefix}{i + offset}.{op}.", f"blocks.{block + 1}.{i}.") for i, op in enumerate(ops)]
        copied, not_copied, tensors = [], {}, 0
        for block, src, dst in pairs:
            reason = _copy_layer(supernets[block], src, target, dst)
            if reason is None:
                copied.append(dst.rstrip("."))
                tensors += sum(1 for k in target if k.startswith(dst))
            else:
                not_copied[dst.rstrip(".")] = reason
        model.load_state_dict(target)
        covered = tuple(dst for _, _, dst in pairs)
        no_counterpart = sorted({k.rsplit(".", 1)[0] for k in target if not k.startswith(covered)})
        return Extraction(copied, not_copied, no_counterpart, tensors)

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

    # costs -----------------------------------------------------------------------------------------------------
    @cached_property
    def _resolutions(self) -> list[int]:
        """Input side length of each block, and after the last block."""
        *_, shape = count_cost(self.stem(), (1, self.in_chans, self.image_size, self.image_size))
        sizes = [shape[-1]]
        for block in self.cfg.blocks:
            sizes.append((sizes[-1] - 1) // block.stride + 1)
        return sizes

    def _layer_cost(self, block: int, position: int, op: int, in_chs: int, width: int) -> tuple[int, int]:
        stride = self.cfg.blocks[block].stride if position == 0 else 1
        size = self._resolutions[block] if position == 0 else self._resolutions[block + 1]
        layer = build_layers([layer_string(self.ops[op], stride, width)], in_chs)
        params, macs, _ = count_cost(layer, (1, in_chs, size, size))
        return params, macs

    def candidate_table(self, block: int) -> pd.DataFrame:
        """One row per (candidate, input width): cell, ops, widths, parameters and multiply-adds."""
        frames = []
        n = len(self.ops)
        for cell in self.cells(block):
            inner = np.array([self._layer_cost(block, 1, o, cell.width, cell.width) for o in range(n)], dtype=np.int64)
            grid = np.array(list(self.candidates(cell)), dtype=np.int64).reshape(-1, cell.depth)
            rest = inner[grid[:, 1:]].sum(axis=1) if cell.depth > 1 else np.zeros((len(grid), 2), dtype=np.int64)
            names = ["+".join(self.ops[o] for o in row) for row in grid]
            paths = ["-".join(map(str, row)) for row in grid]
            for in_width in self.in_widths(block):
                first = np.array([self._layer_cost(block, 0, o, in_width, cell.width) for o in range(n)],
                                 dtype=np.int64)
                cost = first[grid[:, 0]] + rest
                frames.append(pd.DataFrame({
                    "block": block, "cell": cell.name, "depth": cell.depth, "width": cell.width, "ops": names,
                    "path": paths, "in_width": in_width, "out_width": cell.width, "params": cost[:, 0],
                    "macs": cost[:, 1]}))
        return pd.concat(frames, ignore_index=True)

    def stem_table(self) -> pd.DataFrame:
        params, macs, _ = count_cost(self.stem(), (1, self.in_chans, self.image_size, self.image_size))
        return pd.DataFrame({"in_width": [0], "out_width": [self.first_width], "score": [0.0], "params": [params],
                             "macs": [macs]})

    def head_table(self) -> pd.DataFrame:
        size = self._resolutions[-1]
        rows = []
        for width in sorted({c.width for c in self.cells(self.num_blocks - 1)}):
            params, macs, _ = count_cost(self.head(width), (1, width, size, size))
            rows.append({"in_width": width, "out_width": 0, "score": 0.0, "params": params, "macs": macs})
        return pd.DataFrame(rows)


def build_space(cfg: SpaceConfig, in_chans: int, image_size: int, num_classes: int) -> SearchSpace:
    if cfg.kind == "mbconv":
        return MBConvSpace(cfg, in_chans, image_size, num_classes)
    raise ValueError(f"space.kind={cfg.kind!r} is not implemented")
