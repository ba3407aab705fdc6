"""The vision-transformer space: the MBConv space's stem and blocks with transformer layers only. Per block a cell
(depth, embedding width) and per layer a transformer op (heads, MLP ratio: `mha_h4_e2`); a block that changes
stride or width starts with the join (a strided convolution). See dna.spaces.layer_ops."""
from __future__ import annotations

from typing import TYPE_CHECKING

from dna.spaces.layer_ops import is_attention
from dna.spaces.mbconv import MBConvSpace

if TYPE_CHECKING:
    from dna.config import SpaceConfig


class VitSpace(MBConvSpace):
    @classmethod
    def check_config(cls, cfg: SpaceConfig) -> None:
        convolutional = [op for op in cfg.options.ops if not is_attention(op)]
        if convolutional:
            raise ValueError(f"space.ops: {convolutional} are not transformer ops; a space of kind vit takes "
                             "transformer ops only, e.g. mha_h2_e2, mha_h4_e4_k3 (kind hybrid mixes both)")
        super().check_config(cfg)
