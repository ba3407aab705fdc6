"""The ops of a layer and the timm block strings they stand for.

A convolutional op is a timm block string without repeat, stride and width (`ir_k5_e3_se0.25`): one timm layer.
A transformer op (`mha_h4_e2`, `mqa_h4_e2_k3`) is a transformer layer written as timm writes MobileNetV4's hybrid
stages: timm's MobileAttention block (multi-head, or multi-query for `mqa`, self-attention over the feature map's
positions, `h` heads of width/h channels each) followed by its feed-forward block (a UniversalInvertedResidual with
expansion `e`, no depthwise convolution, or a depthwise `k`x`k` one after the expansion, a convolutional feed-forward
that carries position). Where the layer changes stride or width, a join layer (the space's `join` op, a strided
convolution by default) comes first, as stages of a vision transformer are joined.
"""
from __future__ import annotations

import re

import torch
from timm.models._efficientnet_builder import _decode_block_str

from dna.arch import build_layers

ATTENTION = ("mha", "mqa")
_FIXED = re.compile(r"^[rsc]\d")
_ATTENTION_OP = re.compile(r"^(mha|mqa)_h(\d+)_e(\d+(?:\.\d+)?)(?:_k(\d+))?$")
_CONV_HINT = ("an op is a timm block string without repeat, stride and width, which the space sets, "
              "e.g. 'ir_k3_e6_se0.25' (type ir/ds/er/cn/uir, kernel k, expansion e, optional se), or a transformer "
              "layer 'mha_h<heads>_e<mlp ratio>[_k<ffn depthwise kernel>]' (or mqa_..., multi-query)")


def is_attention(op: str) -> bool:
    return op.split("_")[0] in ATTENTION


def layer_string(op: str, stride: int, width: int) -> str:
    """`ir_k5_e3_se0.25` at stride 2 and width 24 -> `ir_r1_k5_s2_e3_c24_se0.25` (timm's block-string form)."""
    kind, *rest = op.split("_")
    kernels = [t for t in rest if t[0] == "k"]
    expansions = [t for t in rest if t[0] == "e"]
    others = [t for t in rest if t[0] not in "ke"]
    return "_".join([kind, "r1", *kernels, f"s{stride}", *expansions, f"c{width}", *others])


def attention_parts(op: str) -> tuple[str, int, str, int]:
    """(block type, heads, MLP ratio as written, feed-forward depthwise kernel) of a transformer op."""
    match = _ATTENTION_OP.match(op)
    if match is None or int(match.group(2)) < 1 or float(match.group(3)) <= 0:
        raise ValueError(f"space.ops: {op!r} is not a valid transformer op; {_CONV_HINT}")
    kind, heads, ratio, kernel = match.groups()
    return kind, int(heads), ratio, int(kernel or 0)


def op_layers(op: str, stride: int, in_width: int, width: int, join: str) -> list[str]:
    """The timm block strings of one layer of op `op`: one for a convolutional op; for a transformer op, the join
    (where stride or width change), the attention block and the feed-forward block."""
    if not is_attention(op):
        return [layer_string(op, stride, width)]
    kind, heads, ratio, kernel = attention_parts(op)
    joined = [layer_string(join, stride, width)] if stride != 1 or in_width != width else []
    attention = f"{kind}_r1_k3_h{heads}_d{width // heads}_s1_c{width}"
    return joined + [attention, f"uir_r1_a0_k{kernel}_s1_e{ratio}_c{width}"]


def op_module(op: str, stride: int, in_width: int, width: int, join: str) -> torch.nn.Module:
    """One layer of op `op` as a module: the timm block itself for a convolutional op, the sequence of its blocks
    for a transformer op."""
    layers = build_layers(op_layers(op, stride, in_width, width, join), in_width)
    return layers[0] if not is_attention(op) else layers


def check_op(op: str) -> None:
    if is_attention(op):
        width = 8 * attention_parts(op)[1]
        strings = op_layers(op, 1, width, width, "cn_k3")
    else:
        if any(_FIXED.match(t) for t in op.split("_")[1:]):
            raise ValueError(f"space.ops: {op!r} sets r/s/c; {_CONV_HINT}")
        strings = [layer_string(op, 1, 16)]
    try:
        for s in strings:
            _decode_block_str(s)
    except Exception:
        raise ValueError(f"space.ops: {op!r} is not a valid op; {_CONV_HINT}") from None
    width = _decode_block_str(strings[0])[0]["out_chs"]
    try:  # timm decodes some strings it cannot build (e.g. mqa_k3_h4_d16_v2)
        with torch.no_grad():
            build_layers(strings, width).eval()(torch.zeros(1, width, 8, 8))
    except Exception as exc:
        raise ValueError(f"space.ops: {op!r} decodes but timm cannot build it ({type(exc).__name__}: {exc}); "
                         f"{_CONV_HINT}") from None
