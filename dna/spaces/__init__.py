"""Search spaces by kind (`space.kind` in params.yaml), in the registry SPACES (dna.registry): a new kind is one module
that defines a space class (see dna.spaces.base.SearchSpace) decorated with `@SPACES.register(kind)`; a kind that
ships with dna is registered in `_built_in` instead, so that its module imports nothing of this one.

Importing this module loads no space (nor torch); the spaces that ship with dna are imported when first asked for.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from dna.registry import Registry

if TYPE_CHECKING:
    from dna.config import SpaceConfig
    from dna.spaces.base import SearchSpace


def _named(kind: str, cls: type) -> None:
    cls.kind = kind


def _built_in() -> None:
    from dna.spaces.hybrid import HybridSpace
    from dna.spaces.mbconv import MBConvSpace
    from dna.spaces.vit import VitSpace

    for kind, cls in (("mbconv", MBConvSpace), ("hybrid", HybridSpace), ("vit", VitSpace)):
        SPACES.register(kind, cls)


SPACES: Registry[type[SearchSpace]] = Registry("search space", "space.kind", _built_in, on_register=_named)


def space_class(kind: str) -> type[SearchSpace]:
    return SPACES.get(kind)


def build_space(cfg: SpaceConfig, in_chans: int, image_size: int, num_classes: int) -> SearchSpace:
    return space_class(cfg.kind)(cfg, in_chans, image_size, num_classes)
