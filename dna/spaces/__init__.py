"""Search spaces by kind (`space.kind` in params.yaml): a new kind is one module that defines a space class (see
dna.spaces.base.SearchSpace) decorated with `register_space`, plus its import in `_register_built_in` when it ships
with dna.

Importing this module loads no space (nor torch); the spaces that ship with dna are imported when first asked for.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from dna.config import SpaceConfig
    from dna.spaces.base import SearchSpace

_REGISTERED: dict[str, type] = {}


def register_space(kind: str) -> Callable[[type], type]:
    def register(cls: type) -> type:
        if _REGISTERED.get(kind, cls) is not cls:
            raise ValueError(f"space kind {kind!r} is registered twice ({_REGISTERED[kind].__name__}, {cls.__name__})")
        cls.kind = kind
        _REGISTERED[kind] = cls
        return cls

    return register


def _register_built_in() -> None:
    from dna.spaces import hybrid, mbconv, vit  # noqa: F401


def space_kinds() -> list[str]:
    _register_built_in()
    return sorted(_REGISTERED)


def space_class(kind: str) -> type[SearchSpace]:
    _register_built_in()
    if kind not in _REGISTERED:
        raise ValueError(f"space.kind={kind!r} is not a search space; allowed: {', '.join(space_kinds())}")
    return _REGISTERED[kind]


def build_space(cfg: SpaceConfig, in_chans: int, image_size: int, num_classes: int) -> SearchSpace:
    return space_class(cfg.kind)(cfg, in_chans, image_size, num_classes)
