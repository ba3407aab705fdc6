"""The hybrid space: per layer an MBConv op or a transformer op (dna.spaces.layer_ops), so the search places
attention where it pays; the blocks and cells are the MBConv space's."""
from __future__ import annotations

from typing import TYPE_CHECKING

from dna.spaces.layer_ops import is_attention
from dna.spaces.mbconv import MBConvSpace

if TYPE_CHECKING:
    from dna.config import SpaceConfig


class HybridSpace(MBConvSpace):
    @classmethod
    def check_config(cls, cfg: SpaceConfig) -> None:
        ops = cfg.options.ops
        kinds = {is_attention(op) for op in ops}
        if kinds != {True, False}:
            raise ValueError(f"space.ops: {ops} are all {'transformer' if True in kinds else 'convolutional'} "
                             "ops; a space of kind hybrid mixes both, e.g. [ir_k3_e4, ir_k5_e4, mha_h2_e2]")
        super().check_config(cfg)
